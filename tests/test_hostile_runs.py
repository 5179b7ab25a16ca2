"""Everyday mistakes around runs get a message naming the file and the fix, exit code 2, and no traceback: refused
resumes write nothing, a damaged latest checkpoint points to the intact earlier one, configs that can only give
NaN or a division by zero are refused at load time, checkpoints that are not t3d's are named as such."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import hostile
from pretrain_helpers import pretrain_args
from t3d.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from t3d.cli import main as cli_main
from t3d.config import ConfigError, PreprocessConfig, PretrainConfig, load_config
from t3d.data.manifest import read_manifest
from t3d.data.preprocess import preprocess_manifest
from t3d.finetune.clsdata import split_studies
from t3d.finetune.segdata import check_label_values
from t3d.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- resume


def test_a_refused_resume_writes_nothing_into_the_run(tiny_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=1)) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert cli_main([*pretrain_args(tiny_cache.cache, run, "t3d-hard", steps=2), "--resume"]) == 2
    assert "config.yaml" in capsys.readouterr().err
    changed = pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=2, **{"model.embed_dim": 32})
    assert cli_main([*changed, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "model.embed_dim" in err and str(run / "config.yaml") in err and "Traceback" not in err
    assert snapshot(run) == before  # config.yaml above all: the fix the message suggests still works
    assert cli_main([*pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=2), "--resume"]) == 0


def test_a_damaged_latest_checkpoint_names_the_intact_earlier_one(tiny_cache, tmp_path, capsys):
    run = tmp_path / "run"
    args = pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=2, **{"train.checkpoint_every": 1})
    assert cli_main(args) == 0
    final = run / "checkpoints" / "final.pt"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    capsys.readouterr()
    more = pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=3, **{"train.checkpoint_every": 1})
    assert cli_main([*more, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "final.pt is not a t3d checkpoint" in err and "Traceback" not in err
    assert f"echo checkpoints/step_0000001.pt > {run / 'latest'}" in err
    (run / "latest").write_text("checkpoints/step_0000001.pt\n")  # what the message says to do
    assert cli_main([*more, "--resume"]) == 0


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "section, key, value", [("train", "log_every", 0), ("train", "checkpoint_every", 0), ("loss", "tau_view", 0)]
)
def test_values_that_can_only_give_nan_or_zero_division_are_refused_at_load(tmp_path, section, key, value):
    path = tmp_path / "bad.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{section}\.{key}.*{path}"):
        load_config(PretrainConfig, path)
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load_config(PretrainConfig, None, [f"--{section}.{key}", str(value)])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1e-4, 2\n  steps: 3\n")
    assert cli_main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- checkpoints


class Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_checkpoint_errors_say_what_the_file_is_and_never_suggest_unsafe_loading(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am a text file\n")
    pickled = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload()}, pickled)
    with pytest.raises(CheckpointError, match="not a t3d checkpoint"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="refused: contains code objects") as refused:
        load_checkpoint(pickled)
    assert "weights_only" not in str(refused.value)
    for path in (text, pickled):
        assert cli_main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "weights_only" not in err and "Traceback" not in err


def test_a_segmentation_checkpoint_without_its_spec_is_named(tmp_path):
    state = {"kind": "t3d-seg", "model": {"w": torch.zeros(2)}, "config": {"data": "dataset.json"}, "step": 1}
    path = save_checkpoint(state, tmp_path / "seg", "best")
    with pytest.raises(ValueError, match="'t3d-seg' checkpoint without its network spec"):
        load_pretrained(path)
    state = {"kind": "t3d-cls", "model": {"w": torch.zeros(2)}, "config": {"data": "dataset.json"}, "step": 1}
    with pytest.raises(ValueError, match="not a t3d pre-training checkpoint .*t3d-cls"):
        load_pretrained(save_checkpoint(state, tmp_path / "cls", "best"))
    text = tmp_path / "weights.safetensors"
    text.write_text("not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_pretrained(text)


# ----------------------------------------------------------------------------------------------- labels and ids


def test_label_values_outside_the_labels_map_name_the_label_file(tmp_path):
    root = tmp_path / "root"
    hostile.good_study(root, "a")
    label = np.zeros(hostile.ct_volume().shape, dtype=np.uint8)
    label[2:5, 2:5, 2:5] = 3
    hostile.write_nifti(root / "a_label.nii.gz", label, spacing=(1.0, 1.0, 2.0))
    manifest = root / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": "a.nii.gz", "label": "a_label.nii.gz", "report": "r"}) + "\n")
    cfg = PreprocessConfig(spacing=None, min_size=(8, 8, 8))
    assert preprocess_manifest(manifest, tmp_path / "cache", cfg, label_key="label", progress=False)["processed"] == 1
    with pytest.raises(
        ValueError, match=r"dataset.json: label values outside its 'labels' map .*a_label.nii.gz.*\[3\]"
    ):
        check_label_values(tmp_path / "cache", {"a": "a"}, {0: "background", 1: "liver"}, "dataset.json")
    check_label_values(tmp_path / "cache", {"a": "a"}, {0: "bg", 1: "x", 2: "y", 3: "z"}, "dataset.json")


def test_a_split_that_shares_no_id_with_the_labels_shows_both_sides_and_the_rule(tmp_path):
    (tmp_path / "reports.csv").write_text("VolumeName,Findings_EN,Impressions_EN\nvolumes/x_1.nii.gz,A.,B.\n")
    assert [s.id for s in read_manifest(tmp_path / "reports.csv")] == ["x_1"]  # folders never enter the id
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"finetune": ["volumes/x_1"], "test": ["volumes/x_2"]}))
    with pytest.raises(ValueError) as err:
        split_studies(["x_1", "x_2"], splits)
    message = str(err.value)
    assert "'volumes/x_2'" in message and "'x_1'" in message and "how ids are made" in message
