"""The ``supervised`` control: ground-truth findings as multi-label targets through the pre-training code path."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pretrain_helpers import pretrain_args, read_log
from t3d.cli import main as cli_main
from t3d.config import (
    ConfigError,
    CropConfig,
    DataConfig,
    ModelConfig,
    PreprocessConfig,
    PretrainConfig,
    load_config,
)
from t3d.data.crops import CropDataset
from t3d.data.preprocess import preprocess_manifest
from t3d.data.targets import finding_label_classes, read_findings
from t3d.losses import PretrainObjective, method_spec
from t3d.models import CellFindingHead
from t3d.pretrain.data import FindingTargets, build_dataset, local_finding_labels
from t3d.pretrain.model import PretrainModel

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
    # Targets follow the cache rows of the batch, not the dataset order (the organ-level findings: study labels).
    targets = FindingTargets(cfg, CropDataset(tiny_cache.cache, cfg.crops), torch.device("cpu"))
    ids, classes, y = read_findings(gt)
    batch_rows = torch.tensor([3, 0])
    index = [row["id"] for row in json_rows(tiny_cache.cache)]
    batch = {"index": batch_rows, "views": torch.zeros(2, 1), "label_voxels": torch.zeros(2, 1, 2, len(LOCAL))}
    expected = np.stack([y[ids.index(index[3])], y[ids.index(index[0])]])
    study_level = [classes.index(c) for c in classes if c not in LOCAL]
    got = targets.for_batch(batch)
    assert got.shape == (2, 1, len(classes))
    assert np.array_equal(got[:, 0, study_level].numpy(), expected[:, study_level])
    assert not got[:, :, [classes.index(c) for c in LOCAL]].any()  # no lesion voxel in either crop


def test_the_cell_finding_head_lets_the_cell_with_the_lesion_decide():
    head = CellFindingHead(4, 2)
    fmap = torch.zeros(3, 4, 8, 8, 4)
    fmap[1, :, 5, 2, 1] = 3.0  # one cell of crop 1 differs
    with torch.no_grad():
        head.cells.weight.zero_()
        head.cells.weight[0, :, 0, 0, 0] = 1.0
        head.cells.bias.zero_()
    logits = head(fmap)
    assert logits.shape == (3, 2) and logits[1, 0] == 12.0 and logits[0, 0] == 0.0 and logits[2, 0] == 0.0
    fmap.requires_grad_(True)
    head(fmap)[1, 0].backward()  # only the deciding cell receives the gradient of its crop
    assert fmap.grad[1, :, 5, 2, 1].abs().sum() > 0 and fmap.grad.abs().sum() == fmap.grad[1, :, 5, 2, 1].abs().sum()


@pytest.mark.parametrize("level", [0, 3])
def test_the_supervised_model_reads_its_finding_level(level):
    model_cfg = ModelConfig(encoder="resnet", preset="tiny", embed_dim=16, finding_level=level)
    data = DataConfig(findings="ground_truth.jsonl")
    cfg = PretrainConfig(method="supervised", data=data, crops=CropConfig(size=(32, 32, 32), sites=2), model=model_cfg)
    model = PretrainModel(cfg, method_spec("supervised"), text_dim=8, num_findings=3).eval()
    x = torch.randn(2, 2, 1, cfg.crops.channels, 32, 32, 32)
    with torch.no_grad():
        out = model({"views": x}, {"frozen": torch.zeros(2, 8), "findings": torch.zeros(2, 2, 3)})
        feats = model.encoder.forward_features(x.flatten(0, 2))
        expected = model.finding_logits(feats).view(2, 2, 3)
    assert out["finding_logits"].shape == (2, 2, 3) and torch.allclose(out["finding_logits"], expected, atol=1e-5)
    if level:
        assert torch.allclose(expected.flatten(0, 1), model.finding_head.cells(feats[level]).amax(dim=(2, 3, 4)))
    with pytest.raises(ConfigError, match="finding_level"):
        ModelConfig(finding_level=6)


LOCAL = {"Liver lesion": 9, "Renal cyst": 10, "Lung nodule": 11, "Kidney stone": 12, "Pleural effusion": 13}


def json_rows(cache):
    return [json.loads(line) for line in (cache / "index.jsonl").read_text().splitlines() if line.strip()]


def supervised_config(cache, findings, **data) -> PretrainConfig:
    crops = CropConfig(size=(32, 32, 32), sites=2)
    return PretrainConfig(method="supervised", data=DataConfig(cache=str(cache), findings=str(findings), **data),
                          crops=crops)  # fmt: skip


def test_per_crop_targets_come_from_the_label_map(tiny_cache):
    """A focal finding is a crop's target exactly when the crop holds voxels of its label class; organ-level
    findings (no label class) stay the study's label."""
    cfg = supervised_config(tiny_cache.cache, tiny_cache.data / "ground_truth.jsonl")
    assert local_finding_labels(cfg) == LOCAL
    ds = build_dataset(cfg, method_spec("supervised"))
    assert ds.count_labels == tuple(LOCAL.values())
    check = CropDataset(tiny_cache.cache, cfg.crops, with_labels=True, count_labels=ds.count_labels)
    targets = FindingTargets(cfg, ds, torch.device("cpu"))
    ids, classes, y = read_findings(cfg.data.findings)
    seen = {True: 0, False: 0}
    for epoch in range(8):
        check.set_epoch(epoch)
        for i in range(len(check)):
            item = check[i]
            counts = torch.stack([(item["labels"][:, 0] == v).flatten(1).sum(1) for v in LOCAL.values()], dim=-1)
            assert torch.equal(item["label_voxels"][:, 0], counts)  # (K, J) voxels of each class in view 0
            batch = {k: v[None] if torch.is_tensor(v) else v for k, v in item.items()}
            batch["index"] = torch.tensor([item["index"]])
            got = targets.for_batch(batch)[0]  # (K, L)
            study = torch.from_numpy(y[ids.index(item["id"])])
            for name, value in LOCAL.items():
                inside = (item["labels"][:, 0] == value).flatten(1).any(1)
                assert torch.equal(got[:, classes.index(name)], inside.float())
                if study[classes.index(name)]:
                    seen[True] += int(inside.sum())
                    seen[False] += int((~inside).sum())
            for name in ("Splenomegaly", "Hepatic steatosis"):
                assert torch.equal(got[:, classes.index(name)], study[classes.index(name)].expand(cfg.crops.sites))
    assert seen[True] and seen[False], seen  # crops with and without the lesion of a positive study were checked


def test_min_voxels_and_study_targets(tiny_cache):
    gt = tiny_cache.data / "ground_truth.jsonl"
    ds = CropDataset(tiny_cache.cache, CropConfig(size=(32, 32, 32), sites=2))
    ids, classes, y = read_findings(gt)
    row, study_id = next((n, r["id"]) for n, r in ds.studies if y[ids.index(r["id"])].any())
    voxels = torch.zeros(1, 2, 2, len(LOCAL), dtype=torch.long)
    voxels[0, 0, 0, 2] = 3  # site 0 holds 3 voxels of the lung-nodule class, site 1 none
    batch = {"index": torch.tensor([row]), "views": torch.zeros(1, 2), "label_voxels": voxels}
    nodule = classes.index("Lung nodule")
    for min_voxels, expected in ((1, [1.0, 0.0]), (3, [1.0, 0.0]), (4, [0.0, 0.0])):
        cfg = supervised_config(tiny_cache.cache, gt, finding_min_voxels=min_voxels)
        assert FindingTargets(cfg, ds, torch.device("cpu")).for_batch(batch)[0, :, nodule].tolist() == expected
    # finding_targets=study: every crop gets the study's findings whatever its label voxels.
    cfg = supervised_config(tiny_cache.cache, gt, finding_targets="study")
    got = FindingTargets(cfg, ds, torch.device("cpu")).for_batch(batch)[0]
    assert np.array_equal(got.numpy(), np.stack([y[ids.index(study_id)]] * 2))


def test_label_maps_missing_is_an_error_naming_the_fix(tiny_cache, tmp_path):
    rows = [json.loads(line) for line in (tiny_cache.data / "reports.jsonl").read_text().splitlines()][:3]
    manifest = tmp_path / "nolabels.jsonl"
    keep = ("id", "image", "findings", "impression")
    manifest.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    cache = tmp_path / "cache"
    preprocess_manifest(manifest, cache, PreprocessConfig(spacing=None, min_size=(32, 32, 32)), root=tiny_cache.data,
                        progress=False)  # fmt: skip
    gt = tiny_cache.data / "ground_truth.jsonl"
    cfg = supervised_config(cache, gt)
    ds = CropDataset(cache, cfg.crops)
    with pytest.raises(ValueError, match="no label map in the cache .*data.finding_targets=study"):
        FindingTargets(cfg, ds, torch.device("cpu"))
    with pytest.raises(ValueError, match="no label map for it"):
        build_dataset(cfg, method_spec("supervised"))[0]
    FindingTargets(supervised_config(cache, gt, finding_targets="study"), ds, torch.device("cpu"))


def test_finding_label_config_is_checked(tiny_cache):
    csv_path = tiny_cache.data / "findings.csv"
    _, classes, _ = read_findings(csv_path)
    assert finding_label_classes(csv_path, classes) == {}  # a CSV names no label classes by itself
    assert finding_label_classes(csv_path, classes, {"Lung nodule": 11}) == {"Lung nodule": 11}
    with pytest.raises(ValueError, match="does not have: Nodule"):
        finding_label_classes(csv_path, classes, {"Nodule": 11})
    for bad in ({"finding_targets": "voxel"}, {"finding_min_voxels": 0}, {"finding_labels": {"Lung nodule": 0}}):
        with pytest.raises(ConfigError, match="data.finding"):
            DataConfig(**bad)
