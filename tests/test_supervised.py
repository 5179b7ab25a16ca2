"""The ``supervised`` control: ground-truth findings as multi-label targets through the pre-training code path."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pretrain_helpers import pretrain_args, read_log
from t3d.cli import main as cli_main
from t3d.config import ConfigError, DataConfig, PretrainConfig, load_config
from t3d.data.crops import CropDataset
from t3d.data.targets import read_findings
from t3d.losses import PretrainObjective, method_spec
from t3d.pretrain.data import FindingTargets

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ground_truth_and_csv_give_the_same_targets(tiny_cache):
    ids, classes, y = read_findings(tiny_cache.data / "ground_truth.jsonl")
    csv_ids, csv_classes, csv_y = read_findings(tiny_cache.data / "findings.csv")
    assert classes == csv_classes and y.shape == (tiny_cache.num_studies, len(classes))
    order = [csv_ids.index(i) for i in ids]
    assert np.array_equal(y, csv_y[order])
    gt = [json.loads(line) for line in (tiny_cache.data / "ground_truth.jsonl").read_text().splitlines()]
    for record, row in zip(gt, y):
        assert row.sum() == len({f["type"] for f in record["findings"]})
        assert (row.sum() == 0) == record["normal"]
    with pytest.raises(FileNotFoundError, match="ground_truth.jsonl"):
        read_findings(tiny_cache.data / "missing.csv")


def test_supervised_needs_a_findings_file_and_every_study_labelled(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="data.findings"):
        PretrainConfig(method="supervised")
    ids, classes, y = read_findings(tiny_cache.data / "findings.csv")
    partial = tmp_path / "partial.csv"
    with partial.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", *classes])
        writer.writerow([ids[0], "x.nii.gz", *[int(v) for v in y[0]]])
    cfg = PretrainConfig(method="supervised", data=DataConfig(cache=str(tiny_cache.cache), findings=str(partial)))
    with pytest.raises(ValueError, match="no findings in"):
        FindingTargets(cfg, CropDataset(tiny_cache.cache, cfg.crops), torch.device("cpu"))


def test_supervised_control_trains_on_the_findings(tiny_cache, tmp_path):
    run = tmp_path / "run"
    gt = tiny_cache.data / "ground_truth.jsonl"
    args = pretrain_args(tiny_cache.cache, run, "supervised", steps=6, **{"data.findings": gt, "train.lr": 3e-3})
    assert cli_main(args) == 0
    rows = read_log(run)
    assert {"findings", "loss"} <= set(rows[0]) and not {"view", "align", "restore"} & set(rows[0])
    assert all(r["loss"] == pytest.approx(r["findings"]) for r in rows)
    state = torch.load(run / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    assert state["finding_classes"] == read_findings(gt)[1]
    cfg = load_config(PretrainConfig, run / "config.yaml")
    assert PretrainObjective(cfg.loss, method_spec("supervised")).term_names() == ["findings", "loss"]
    # Targets follow the cache rows of the batch, not the dataset order.
    targets = FindingTargets(cfg, CropDataset(tiny_cache.cache, cfg.crops), torch.device("cpu"))
    ids, _, y = read_findings(gt)
    batch_rows = torch.tensor([3, 0])
    index = [row["id"] for row in json_rows(tiny_cache.cache)]
    expected = np.stack([y[ids.index(index[3])], y[ids.index(index[0])]])
    assert np.array_equal(targets.for_batch({"index": batch_rows}).numpy(), expected)


def json_rows(cache):
    return [json.loads(line) for line in (cache / "index.jsonl").read_text().splitlines() if line.strip()]
