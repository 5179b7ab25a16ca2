"""`t3d finetune cls`: findings CSV, splits, the study classifier, probe and fine-tune runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cls_helpers import synth_dataset, write_checkpoint
from t3d.checkpoint import load_checkpoint
from t3d.cli import main
from t3d.config import ModelConfig
from t3d.data.labels import read_labels
from t3d.finetune.clsdata import split_studies
from t3d.finetune.clsengine import macro_auroc, train_probe
from t3d.finetune.clsmodel import StudyClassifier
from t3d.finetune.config import ClsConfig
from t3d.models import build_encoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    return {
        "data": synth_dataset(root / "data", num_studies=16),
        "t3d": write_checkpoint(root / "ck", "t3d"),
        "root": root,
    }


# ----------------------------------------------------------------------------------------------- data


def test_read_labels_resolves_ctrate_layout(tiny):
    table = read_labels(tiny["data"] / "findings.csv")
    lines = (tiny["data"] / "findings.csv").read_text().splitlines()
    assert table.classes == lines[0].split(",")[1:]
    assert table.ids[0] == lines[1].split(",")[0].removesuffix(".nii.gz")
    np.testing.assert_array_equal(table.y[0], [float(v) for v in lines[1].split(",")[1:]])
    assert all(p.is_file() and p.parent.name == "images" for p in table.images)


def test_read_labels_rejects_non_binary_values_and_unknown_layouts(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("VolumeName,Nodule\na.nii.gz,0\nb.nii.gz,maybe\n")
    with pytest.raises(ValueError, match="line 3, column 'Nodule'"):
        read_labels(bad)
    bad.write_text("Name,Nodule\na.nii.gz,0\n")
    with pytest.raises(ValueError, match="VolumeName"):
        read_labels(bad)
    ok = tmp_path / "ok.csv"
    ok.write_text("id,image,Nodule,Cyst\ns1,img/s1.nii.gz,1,0\ns2,img/s2.nii.gz,0.0,1.0\n")
    table = read_labels(ok)
    assert table.ids == ["s1", "s2"] and table.images[0] == tmp_path / "img" / "s1.nii.gz"
    np.testing.assert_array_equal(table.y, [[1, 0], [0, 1]])


def test_splits_follow_the_split_file_and_nest_across_fractions(tiny):
    splits_file = tiny["data"] / "splits.json"
    ids = read_labels(tiny["data"] / "findings.csv").ids
    file = json.loads(splits_file.read_text())
    full = split_studies(ids, splits_file, val_fraction=0.4, seed=3)
    assert sorted(full["test"]) == sorted(file["test"])
    assert sorted(full["train"] + full["val"]) == sorted(file["finetune"]) and not set(full["train"]) & set(full["val"])
    half = split_studies(ids, splits_file, val_fraction=0.4, fraction=0.5, seed=3)
    assert half["val"] == full["val"] and set(half["train"]) < set(full["train"])
    free = split_studies(ids, None, val_fraction=0.25, test_fraction=0.25, seed=1)
    assert free == split_studies(ids, None, val_fraction=0.25, test_fraction=0.25, seed=1)
    assert sorted(free["train"] + free["val"] + free["test"]) == sorted(ids) and len(free["test"]) == 4


# ----------------------------------------------------------------------------------------------- model


def _tiny_encoder():
    return build_encoder(ModelConfig(encoder="resnet", preset="tiny"), in_channels=1, img_size=(32, 32, 32))


def test_classifier_pools_crops_into_study_logits():
    torch.manual_seed(0)
    model = StudyClassifier(_tiny_encoder(), num_classes=3, pooling="meanmax").eval()
    assert model.width == 2 * model.encoder.embed_channels
    crops = torch.rand(2, 3, 1, 32, 32, 32)
    logits = model(crops)
    assert logits.shape == (2, 3)
    # permuting a study's crops does not change its logits (order-free pooling)
    torch.testing.assert_close(model(crops[:, [2, 0, 1]]), logits)


def test_linear_probe_is_l2_logistic_regression_chosen_on_validation():
    from sklearn.linear_model import LogisticRegression

    # 48 training studies, 128 feature dimensions: one finding shifts dimension 0, the other dimension 1.
    torch.manual_seed(0)
    model = StudyClassifier(_tiny_encoder(), num_classes=2)
    rng = np.random.default_rng(1)
    labels = {s: (rng.random((n, 2)) < 0.4).astype(np.float32) for s, n in (("train", 48), ("val", 200))}
    feats = {}
    for split, y in labels.items():
        x = 3.0 + rng.normal(size=(len(y), model.width))
        x[:, :2] += 3.0 * y
        feats[split] = torch.tensor(x, dtype=torch.float32)
    cfg = ClsConfig(steps=60, val_every=30, probe_l2=(1e-4, 0.1, 100.0))
    history, l2 = train_probe(model, feats, labels, cfg, torch.device("cpu"))
    assert [v["step"] for v in history["val"]] == [30, 60]
    sweep = {r["l2"]: r["val_auroc"] for r in history["l2_sweep"]}
    assert l2 == 0.1 == max(sweep, key=sweep.get) and sweep[100.0] == 0.5  # too strong: all-zero weights
    assert history["train"][-1][1] < history["train"][0][1]
    with torch.no_grad():
        p_val = torch.sigmoid(model.classify(feats["val"])).numpy()
    # scikit-learn's objective C * sum(loss) + |w|^2 / 2 is ours (mean loss + l2 / 2 |w|^2) with C = 1 / (l2 N).
    xt, xv = feats["train"].numpy(), feats["val"].numpy()
    mu, sd = xt.mean(0), xt.std(0)
    for c in range(2):
        ref = LogisticRegression(C=1.0 / (0.1 * 48), max_iter=2000, tol=1e-8).fit((xt - mu) / sd, labels["train"][:, c])
        np.testing.assert_allclose(p_val[:, c], ref.predict_proba((xv - mu) / sd)[:, 1], atol=2e-3)
    assert macro_auroc(labels["val"], p_val) > 0.7


# ----------------------------------------------------------------------------------------------- CLI


def _run(tiny, out_name: str, *extra: str) -> tuple[dict, object]:
    out = tiny["root"] / out_name
    args = ["finetune", "cls", "--data", str(tiny["data"] / "findings.csv"), "--out", str(out)]
    args += ["--n_boot", "30", "--workers", "0", "--max_crops", "2", "--cache", str(tiny["root"] / "cache"), *extra]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text()), out


def test_linear_probe_command(tiny, capsys):
    metrics, out = _run(tiny, "probe", "--init", str(tiny["t3d"]), "--probe", "--steps", "20", "--val_every", "10")
    assert "test macro AUROC" in capsys.readouterr().out
    for name in ("metrics.json", "report.md", "curves.png", "roc.png", "predictions.csv", "config.yaml"):
        assert (out / name).is_file(), name
    assert metrics["mode"] == "probe" and metrics["init_method"] == "t3d"
    assert metrics["splits"]["train"] > 0 and metrics["splits"]["test"] == round(0.2 * 16)
    test = metrics["test"]
    assert set(test["macro"]) == {"auroc", "f1", "accuracy"} and test["bootstrap"]["n_boot"] == 30
    assert set(test["per_class"]) == set(metrics["classes"])
    assert [v["step"] for v in metrics["history"]["val"]] == [10, 20]
    assert metrics["probe_l2"] in ClsConfig().probe_l2
    # The encoder stayed frozen: its weights equal the pre-training checkpoint's.
    saved = load_checkpoint(out / "checkpoints" / "classifier.pt")
    pre = load_checkpoint(tiny["t3d"])["model"]
    for key, value in saved["model"].items():
        if key.startswith("encoder.") and "num_batches_tracked" not in key:
            torch.testing.assert_close(value, pre[key], msg=key)
    assert "| **macro**" in (out / "report.md").read_text()
    # A second probe of the same checkpoint (another label fraction) reuses the stored study features.
    (stored,) = (tiny["root"] / "cache" / "probe_features").glob("*.pt")
    assert len(torch.load(stored, weights_only=True)) == 16
    before = stored.stat().st_mtime_ns
    again, _ = _run(tiny, "probe_half", "--init", str(tiny["t3d"]), "--probe", "--steps", "5", "--fraction", "0.5")
    assert stored.stat().st_mtime_ns == before
    assert again["splits"]["train"] == round(0.5 * metrics["splits"]["train"])


def test_finetune_command_trains_the_encoder(tiny):
    metrics, out = _run(
        tiny, "finetune", "--init", str(tiny["t3d"]), "--steps", "3", "--val_every", "2", "--batch_size", "2",
        "--sites", "2", "--splits", str(tiny["data"] / "splits.json"), "--select", "last",
    )  # fmt: skip
    assert metrics["mode"] == "finetune" and metrics["selected_step"] == 3
    assert [s for s, _ in metrics["history"]["train"]] == [1, 2, 3]
    assert [v["step"] for v in metrics["history"]["val"]] == [2, 3]
    test_ids = json.loads((tiny["data"] / "splits.json").read_text())["test"]
    assert metrics["test"]["n_studies"] == len(test_ids)
    saved = load_checkpoint(out / "checkpoints" / "classifier.pt")["model"]
    pre = load_checkpoint(tiny["t3d"])["model"]
    changed = [
        k for k, v in saved.items() if k.startswith("encoder.") and v.is_floating_point() and not torch.equal(v, pre[k])
    ]
    assert changed  # the encoder was fine-tuned, not frozen


def test_random_init_with_the_architecture_of_a_checkpoint(tiny):
    metrics, _ = _run(
        tiny, "random", "--init", "random", "--arch_from", str(tiny["t3d"]), "--probe", "--steps", "5",
        "--pooling", "meanmax", "--fraction", "0.5",
    )  # fmt: skip
    assert metrics["init_method"] == "random" and metrics["fraction"] == 0.5
    saved = load_checkpoint(tiny["root"] / "random" / "checkpoints" / "classifier.pt")
    assert saved["model"]["head.weight"].shape[1] == 2 * 128  # meanmax over the tiny ResNet's 128 channels
    assert saved["encoder"]["windows"] == [[-1000.0, 1000.0], [-150.0, 250.0]]


def test_missing_labels_csv_is_a_clear_error(tiny, capsys):
    assert main(["finetune", "cls", "--init", "random", "--out", str(tiny["root"] / "none")]) == 2
    assert "--data" in capsys.readouterr().err
