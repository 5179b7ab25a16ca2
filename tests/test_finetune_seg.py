import importlib.util
import json

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml

from seg_helpers import CROP, LABELS, write_msd, write_pretrain_checkpoint
from t3d.checkpoint import load_checkpoint, save_checkpoint
from t3d.cli import main
from t3d.config import ConfigError, load_config
from t3d.data.cache import StudyCache
from t3d.data.cases import prepare_cache
from t3d.finetune.config import SegConfig
from t3d.finetune.seg import build_criterion, initialise, resolve_spec
from t3d.finetune.segdata import PatchDataset, lesion_classes, make_splits, read_msd

FAST = ["--steps", "3", "--val_every", "2", "--batch_size", "1", "--workers", "0", "--warmup_steps", "1",
        "--lr", "1e-3", "--crop_size", json.dumps(list(CROP)), "--sw_batch_size", "2"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_msd(tmp_path_factory.mktemp("msd"), n_train=6, n_test=2)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ----------------------------------------------------------------------------------------------- data


def test_splits_are_seeded_nested_and_keep_val_and_test_fixed():
    pool = [f"s{i}" for i in range(40)]
    full = make_splits(pool, [], 1.0, 0.2, 0.25, seed=3)
    tenth = make_splits(pool, [], 0.1, 0.2, 0.25, seed=3)
    assert len(full["test"]) == 10 and len(full["val"]) == 6 and len(full["train"]) == 24
    assert tenth["val"] == full["val"] and tenth["test"] == full["test"]
    assert len(tenth["train"]) == 3 and set(tenth["train"]) <= set(full["train"])
    assert not set(full["train"]) & (set(full["val"]) | set(full["test"]))
    assert make_splits(pool, [], 0.1, 0.2, 0.25, seed=3) == tenth
    assert make_splits(pool, [], 0.1, 0.2, 0.25, seed=4)["train"] != tenth["train"]
    labelled_test = make_splits(pool, ["t1", "t2"], 1.0, 0.2, 0.25, seed=3)
    assert labelled_test["test"] == ["t1", "t2"] and len(labelled_test["train"]) == 32
    with pytest.raises(ValueError, match="no training studies"):
        make_splits(["a"], [], 1.0, 0.0, 0.9, seed=0)


def test_read_msd_and_lesion_classes(dataset, tmp_path):
    train, test, labels = read_msd(dataset)
    assert len(train) == 6 and len(test) == 2 and train[0].id == "case_000" and train[0].label.is_file()
    assert labels == {int(k): v for k, v in LABELS.items()} and lesion_classes(labels) == [2]
    bad = tmp_path / "dataset.json"
    bad.write_text(json.dumps({"training": [{"image": "a.nii.gz"}], "labels": {"0": "bg"}}))
    with pytest.raises(ValueError, match=r"training\[0\] needs 'image' and 'label'"):
        read_msd(bad)


def test_patches_are_deterministic_and_find_the_small_lesion(dataset, shared_cache):
    train, _, _ = read_msd(dataset)
    cfg = load_config(SegConfig)
    keys = prepare_cache(train[:2], shared_cache, write_pretrain_config_preprocess(), workers=1)
    cache = StudyCache(shared_cache)
    ds = PatchDataset(cache, list(keys.values()), cfg.windows, CROP, pos_fraction=1.0, flip_prob=0.5, length=20)
    item = ds[3]
    assert item["image"].shape == (len(cfg.windows), *CROP) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, *CROP) and item["label"].dtype == torch.int64
    assert torch.equal(ds[3]["image"], item["image"]) and torch.equal(ds[3]["label"], item["label"])
    # Class-balanced centring: the lesion (a few dozen voxels) is in about half of the patches.
    with_lesion = sum(bool((ds[i]["label"] == 2).any()) for i in range(20))
    assert with_lesion >= 6
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    # Flips only along flip_axes (default AP, never LR: sided labels), image and label together.
    kw = {"pos_fraction": 1.0, "flip_prob": 1.0, "length": 20}
    plain = PatchDataset(cache, list(keys.values()), cfg.windows, CROP, flip_axes=(), **kw)[3]
    ap = PatchDataset(cache, list(keys.values()), cfg.windows, CROP, **kw)[3]
    every = PatchDataset(cache, list(keys.values()), cfg.windows, CROP, flip_axes=("LR", "AP", "SI"), **kw)[3]
    for key in ("image", "label"):
        assert torch.equal(ap[key], plain[key].flip(2))  # (C, X, Y, Z): Y is AP
        assert torch.equal(every[key], plain[key].flip(1, 2, 3))
    with pytest.raises(ConfigError, match="flip_axes"):
        SegConfig(flip_axes=("left",))


def test_lesion_weight_draws_lesion_classes_in_proportion(dataset, shared_cache):
    train, _, _ = read_msd(dataset)
    keys = list(prepare_cache(train[:2], shared_cache, write_pretrain_config_preprocess(), workers=1).values())
    cache, windows = StudyCache(shared_cache), load_config(SegConfig).windows
    kw = {"pos_fraction": 1.0, "flip_prob": 0.0, "length": 60}

    uniform = PatchDataset(cache, keys, windows, CROP, **kw)
    same = PatchDataset(cache, keys, windows, CROP, class_weights={1: 3.0, 2: 3.0}, **kw)  # equal weights: uniform
    assert all(torch.equal(uniform[i]["label"], same[i]["label"]) for i in range(5))
    weighted = PatchDataset(cache, keys, windows, CROP, class_weights={2: 20.0}, **kw)
    rng = np.random.default_rng(0)
    draws = np.bincount([weighted.pick_class([1, 2], rng) for _ in range(2000)], minlength=2) / 2000
    assert abs(draws[1] - 20 / 21) < 0.02  # the lesion class in proportion to its weight
    assert weighted.pick_class([1, 2], rng) in (0, 1) and uniform.class_weights == {}
    with pytest.raises(ConfigError, match="lesion_weight"):
        SegConfig(lesion_weight=0.0)


def test_lesion_loss_weight_weights_the_lesion_classes_of_both_terms():
    labels = {0: "background", 1: "liver", 2: "liver_lesion", 3: "lung_nodule"}
    assert build_criterion(SegConfig(), labels).cross_entropy.weight is None  # unweighted by default
    crit = build_criterion(SegConfig(lesion_loss_weight=5.0), labels)
    assert crit.cross_entropy.weight.tolist() == crit.dice.class_weight.tolist() == [1.0, 1.0, 5.0, 5.0]
    crit = build_criterion(SegConfig(lesion_loss_weight=5.0, lesion_labels=(3,)), labels)
    assert crit.cross_entropy.weight.tolist() == [1.0, 1.0, 1.0, 5.0]
    with pytest.raises(ConfigError, match="lesion_loss_weight"):
        SegConfig(lesion_loss_weight=-1.0)


def write_pretrain_config_preprocess():
    from seg_helpers import pretrain_config

    return pretrain_config().preprocess


def test_seg_config_validates_and_documents(tmp_path):
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump({"lr": 3e-4, "crop_size": [96, 96, 64], "model": {"preset": "small"}}))
    cfg = load_config(SegConfig, path, ["--fraction", "0.1"])
    assert cfg.crop_size == (96, 96, 64) and cfg.fraction == 0.1 and cfg.model.preset == "small"
    with pytest.raises(ConfigError, match="at least one of them >= 64"):
        load_config(SegConfig, None, ["--crop_size", "[32,32,32]"])
    with pytest.raises(ConfigError, match="unknown config key 'epochs'"):
        load_config(SegConfig, None, ["--epochs", "3"])
    with pytest.raises(ConfigError, match="fraction"):
        load_config(SegConfig, None, ["--fraction", "0"])


# ----------------------------------------------------------------------------------------------- CLI runs


def assert_run_outputs(out):
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("init", "encoder", "fraction", "n_train", "n_val", "n_test", "best_step", "best_val_dice", "test",
                "val", "init_report", "spec"):  # fmt: skip
        assert key in metrics
    test = metrics["test"]
    for key in ("dice_mean", "dice_per_class", "hd95_mean", "hd95_per_class", "small_lesion_dice", "small_lesions"):
        assert key in test
    assert set(test["dice_per_class"]) == {"organ", "lesion"} and 0.0 <= test["dice_mean"] <= 1.0
    assert test["small_lesions"] == 2  # one < 10 mm lesion per test case
    assert [row["step"] for row in metrics["val"]] == [2, 3]
    report = (out / "report.md").read_text()
    assert "| organ |" in report and "| lesion |" in report
    for png in ("curves.png", "test_overlay.png"):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    subset = json.loads((out / "subset.json").read_text())
    assert len(subset["train"]) == metrics["n_train"] and subset["test"] == ["case_006", "case_007"]
    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 3 + 2  # 3 steps + 2 validations
    return metrics


def test_finetune_from_checkpoint_loads_the_encoder_and_writes_the_run(dataset, shared_cache, tmp_path):
    pre = write_pretrain_checkpoint(tmp_path / "pre", "resnet", seed=9)
    out = tmp_path / "seg"
    argv = ["finetune", "seg", "--data", str(dataset), "--init", str(pre), "--out", str(out), "--fraction", "0.5",
            "--freeze-encoder", "--cache", str(shared_cache), *FAST]  # fmt: skip
    assert main(argv) == 0
    metrics = assert_run_outputs(out)
    assert metrics["init_report"]["missing"] == [] and metrics["init_report"]["unexpected"] == []
    assert metrics["init_report"]["loaded"] > 10 and metrics["init_name"] == "t3d"
    assert metrics["n_train"] == 3 and metrics["n_val"] == 1  # 6 training cases: 1 val, ceil(half) of the other 5
    assert metrics["spec"]["windows"] == [[-1000.0, 1000.0], [-150.0, 250.0]]  # from the checkpoint
    # Frozen encoder: the best checkpoint holds exactly the pre-trained encoder weights (running stats included).
    best = load_checkpoint(out)
    assert best["kind"] == "t3d-seg"
    source = load_checkpoint(pre)["model"]
    enc = {k[len("encoder.resnet.") :]: v for k, v in best["model"].items() if k.startswith("encoder.resnet.")}
    assert enc and all(torch.equal(v, source[f"encoder.resnet.{k}"]) for k, v in enc.items())
    decoder = best["model"]["head.conv.conv.weight"]
    assert not torch.equal(decoder, torch.zeros_like(decoder))
    assert main(argv) == 2  # refuses to overwrite a finished run


def test_finetune_from_random_init_with_the_architecture_of_a_checkpoint(dataset, shared_cache, tmp_path):
    pre = write_pretrain_checkpoint(tmp_path / "pre", "resnet", seed=2)
    out = tmp_path / "seg_random"
    argv = ["finetune", "seg", "--data", str(dataset), "--init", "random", "--arch_from", str(pre), "--out", str(out),
            "--cache", str(shared_cache), *FAST]  # fmt: skip
    assert main(argv) == 0
    metrics = assert_run_outputs(out)
    assert metrics["init_name"] == "random" and metrics["init_report"] is None
    assert metrics["spec"]["windows"] == [[-1000.0, 1000.0], [-150.0, 250.0]]  # architecture from the checkpoint
    assert metrics["n_train"] == 5 and np.isfinite(metrics["best_val_dice"])
    first = load_checkpoint(out)["model"]["encoder.resnet.conv1.weight"]
    assert not torch.allclose(first, load_checkpoint(pre)["model"]["encoder.resnet.conv1.weight"], atol=0.05)


def test_random_init_spec_comes_from_the_config():
    cfg = load_config(SegConfig, None, ["--model.encoder", "resnet", "--windows", "[[-100, 200]]"])
    spec, pre = resolve_spec(cfg, {0: "background", 1: "organ"})
    assert pre is None and spec.crop_size == (96, 96, 96) and spec.windows == ((-100.0, 200.0),)
    assert spec.model.encoder == "resnet" and spec.num_classes == 2


def test_a_segmentation_run_initialises_the_next_one(tmp_path):
    """Sequential transfer: ``--init`` a ``t3d finetune seg`` run gives its encoder (not its decoder or head) to a
    network with other classes, with the first run's inputs."""
    pre = write_pretrain_checkpoint(tmp_path / "pre", "resnet", seed=2)
    first, _ = resolve_spec(load_config(SegConfig, None, ["--init", str(pre)]), {0: "background", 1: "organ"})
    torch.manual_seed(4)
    net = first.build()
    save_checkpoint({"kind": "t3d-seg", "model": net.state_dict(), "spec": first.as_dict(), "step": 5},
                    tmp_path / "seg", "best")  # fmt: skip
    cfg = load_config(SegConfig, None, ["--init", str(tmp_path / "seg")])
    spec, weights = resolve_spec(cfg, {0: "background", 1: "organ", 2: "lesion"})
    assert spec.windows == first.windows and spec.crop_size == first.crop_size and weights.method == "seg"
    second = spec.build()
    report = initialise(second, spec, weights)
    assert report.missing == [] and report.unexpected == []
    got, want = second.encoder.resnet.state_dict(), net.encoder.resnet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


needs_einops = pytest.mark.skipif(importlib.util.find_spec("einops") is None, reason="MONAI's Swin needs einops")


@needs_einops
def test_swinunetr_is_initialised_from_a_swinvit_pretraining_checkpoint(tmp_path):
    pre = write_pretrain_checkpoint(tmp_path / "pre", "swinvit", seed=1)
    cfg = load_config(SegConfig, None, ["--init", str(pre), "--crop_size", json.dumps(list(CROP))])
    spec, weights = resolve_spec(cfg, {0: "background", 1: "organ", 2: "lesion"})
    net = spec.build()
    report = initialise(net, spec, weights)
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(net.swinViT.state_dict())
    source = load_checkpoint(pre)["model"]
    assert all(torch.equal(v, source[f"encoder.swinViT.{k}"]) for k, v in net.swinViT.state_dict().items())
    with torch.no_grad():
        assert net(torch.zeros(1, 2, *CROP)).shape == (1, 3, *CROP)


@pytest.mark.slow
@needs_einops
def test_finetune_swinunetr_from_swinvit_checkpoint(dataset, shared_cache, tmp_path):
    pre = write_pretrain_checkpoint(tmp_path / "pre", "swinvit", seed=1)
    out = tmp_path / "seg_swin"
    argv = ["finetune", "seg", "--data", str(dataset), "--init", str(pre), "--out", str(out),
            "--cache", str(shared_cache), *FAST]  # fmt: skip
    assert main(argv) == 0
    metrics = assert_run_outputs(out)
    assert metrics["encoder"] == "swinvit" and metrics["init_report"]["missing"] == []
