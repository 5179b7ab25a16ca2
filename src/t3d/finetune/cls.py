"""``t3d finetune cls``: multi-label finding classification from a pre-trained encoder (docs/method.md §6).

    t3d finetune cls --data findings.csv --init runs/pretrain [--probe] [--fraction 0.1] [--splits splits.json] \
        [--images DIR] [--out runs/cls] [--config cls.yaml] [--steps 300 --sites 4 ...]

Linear probe (``--probe``): the encoder is frozen, every study's features are computed once over its evaluation
grid, and only the linear head is fitted: L2-regularised logistic regression on standardised features, the L2
strength chosen on the validation split. Fine-tuning (default): encoder and head are trained with BCE on K random
foreground crops per study per step (the encoder at ``encoder_lr_scale`` times the head's learning rate). Both are
evaluated on the deterministic crop grid; per-class F1 thresholds are chosen on the validation split; test AUROC,
F1 and accuracy come with bootstrap intervals. The run folder gets config.yaml, splits.json, metrics.json,
report.md, curves.png, roc.png, predictions.csv and checkpoints/classifier.pt.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from t3d.checkpoint import latest_checkpoint, save_checkpoint
from t3d.config import ConfigError, load_config, save_config, to_dict
from t3d.data.cache import StudyCache, write_json_atomic
from t3d.data.crops import CropDataset, WholeVolumeDataset
from t3d.data.grid import GridCropDataset
from t3d.data.labels import prepare_label_cache, read_labels
from t3d.evaluate.joint import default_device
from t3d.evaluate.report import classification_markdown, plot_roc, plot_training_curves, write_metrics
from t3d.finetune.clsdata import split_studies
from t3d.finetune.clsengine import macro_auroc, predict, study_features, train_finetune, train_probe
from t3d.finetune.clsmodel import EncoderSetup, StudyClassifier, encoder_setup
from t3d.finetune.config import ClsConfig
from t3d.metrics import classification_metrics, f1_thresholds

log = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace) -> ClsConfig:
    """YAML <- dotted overrides <- the named flags."""
    cfg = load_config(ClsConfig, args.config, list(getattr(args, "overrides", None) or []))
    names = ("data", "init", "fraction", "images", "splits", "out", "seed")
    flags = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.probe:
        flags["freeze_encoder"] = True
    return replace(cfg, **flags)


def command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run_cls(cfg)
    macro = result["test"]["macro"]["auroc"]
    print(
        f"finetune cls [{result['mode']}, init {result['init_method']}] test macro AUROC {macro['value']:.3f} "
        f"[{macro['low']:.3f}, {macro['high']:.3f}] over {result['test']['n_studies']} studies -> {cfg.out}"
    )
    return 0


def eval_dataset(setup: EncoderSetup, cache: Path, ids: list[str], cfg: ClsConfig):
    """Deterministic study inputs: the crop grid (or the whole volume for a whole-volume encoder)."""
    if setup.whole_volume:
        return WholeVolumeDataset(cache, grid=setup.grid, windows=setup.windows, ids=ids)
    return GridCropDataset(cache, setup.grid, setup.windows, ids=ids, overlap=cfg.eval_overlap, max_crops=cfg.max_crops)


def run_cls(cfg: ClsConfig) -> dict:
    """Prepare data, train (probe or fine-tune), evaluate on the test split and write the run folder."""
    if not cfg.data:
        raise ConfigError("no findings CSV: pass --data FILE (or data: in the config)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    setup = encoder_setup(cfg)
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    table = read_labels(cfg.data, cfg.images or None)
    table = prepare_label_cache(table, cache, setup.preprocess, workers=cfg.preprocess_workers)
    splits = split_studies(
        table.ids, cfg.splits or None, cfg.train_split, cfg.test_split, cfg.val_fraction, cfg.test_fraction,
        cfg.fraction, cfg.seed,
    )  # fmt: skip
    write_json_atomic(out / "splits.json", {**splits, "seed": cfg.seed, "fraction": cfg.fraction})
    labels = {name: table.labels_of(ids) for name, ids in splits.items()}
    log.info("studies: %s", {k: len(v) for k, v in splits.items()})
    model = StudyClassifier(setup.encoder, len(table.classes), cfg.pooling)
    device = default_device()
    if cfg.freeze_encoder:
        history, selected, probs = _probe(model, setup, cache, splits, labels, cfg, device)
    else:
        history, selected, probs = _finetune(model, setup, cache, splits, labels, cfg, device)
    has_val = len(splits["val"]) > 0
    thresholds = f1_thresholds(labels["val"], probs["val"]) if has_val else np.full(len(table.classes), 0.5)
    test = classification_metrics(
        labels["test"], probs["test"], thresholds, table.classes, cfg.n_boot, cfg.seed, cfg.ci, cfg.stratified
    )
    result = {
        "task": "classification",
        "mode": "probe" if cfg.freeze_encoder else "finetune",
        "init": cfg.init,
        "init_method": setup.method,
        "fraction": cfg.fraction,
        "seed": cfg.seed,
        "classes": table.classes,
        "splits": {k: len(v) for k, v in splits.items()},
        "selected_step": selected,
        "probe_l2": history.get("l2"),
        "val": {"macro_auroc": macro_auroc(labels["val"], probs["val"]) if has_val else None},
        "test": test,
        "history": history,
        "encoder_load": setup.load_report,
    }
    _write_outputs(out, cfg, model, setup, table.classes, splits, labels, probs, thresholds, result)
    return result


def _probe(model, setup, cache, splits, labels, cfg, device):
    """Frozen encoder: features of every study once, then the head on those features."""
    for param in model.encoder.parameters():
        param.requires_grad_(False)
    model.to(device)
    order = splits["train"] + splits["val"] + splits["test"]
    feats = probe_features(model, setup, cache, order, cfg, device)
    bounds = np.cumsum([0, len(splits["train"]), len(splits["val"]), len(splits["test"])])
    per_split = {name: feats[bounds[i] : bounds[i + 1]] for i, name in enumerate(("train", "val", "test"))}
    history, l2 = train_probe(model, per_split, labels, cfg, device)
    history["l2"] = l2
    with torch.no_grad():
        probs = {k: torch.sigmoid(model.classify(v.to(device))).cpu().numpy() for k, v in per_split.items()}
    return history, cfg.steps, probs


def probe_features(model: StudyClassifier, setup: EncoderSetup, cache: Path, ids: list[str], cfg: ClsConfig, device):
    """(N, F') frozen study features of ``ids``, stored in ``<cache>/probe_features/<key>.pt`` and reused.

    Probes of one checkpoint at several label fractions and seeds see the same features: they are computed once.
    The key covers the encoder weights (checkpoint file, size, mtime; the seed for random weights) and everything
    that shapes a feature (grid, windows, crops per study, pooling); each entry also records the study's
    preprocessing hash, so a re-preprocessed study is encoded again.
    """
    source = Path(cfg.init)
    if cfg.init != "random" and source.is_dir():
        source = latest_checkpoint(source) or source
    weights = f"{source.resolve()}:{source.stat().st_size}:{source.stat().st_mtime_ns}" if source.is_file() else None
    spec = [weights or f"random:{cfg.seed}:{cfg.arch_from}", setup.grid, setup.windows, setup.whole_volume]
    spec += [cfg.eval_overlap, cfg.max_crops, cfg.pooling]
    path = cache / "probe_features" / f"{hashlib.sha256(repr(spec).encode()).hexdigest()[:16]}.pt"
    stored = torch.load(path, weights_only=True) if path.is_file() else {}
    studies = StudyCache(cache)
    keys = {row["id"]: row["key"] for row in studies.index()}
    version = {i: studies.meta(keys[i]).source_hash for i in ids}
    missing = [i for i in ids if i not in stored or stored[i]["source_hash"] != version[i]]
    if missing:
        data = eval_dataset(setup, cache, missing, cfg)
        feats, got = study_features(model, data, device, cfg.crop_batch, cfg.workers, desc="probe features")
        stored.update({i: {"feature": f.clone(), "source_hash": version[i]} for i, f in zip(got, feats)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(stored, tmp)
        tmp.replace(path)
    log.info("probe features: %d reused, %d computed (%s)", len(ids) - len(missing), len(missing), path)
    return torch.stack([stored[i]["feature"] for i in ids])


def _finetune(model, setup, cache, splits, labels, cfg, device):
    """Encoder + head on random crops; validation and test on the evaluation grid."""
    if setup.whole_volume:
        train_data = WholeVolumeDataset(cache, grid=setup.grid, windows=setup.windows, ids=splits["train"])
    else:
        train_data = CropDataset(cache, setup.crops(cfg.sites), ids=splits["train"], seed=cfg.seed)
    by_id = {i: n for n, i in enumerate(splits["train"])}

    def labels_of(ids: list[str]) -> np.ndarray:
        return labels["train"][[by_id[i] for i in ids]]

    workers = cfg.workers
    val_data = eval_dataset(setup, cache, splits["val"], cfg) if splits["val"] else None

    def validate(m: StudyClassifier):
        return labels["val"], predict(m, val_data, device, cfg.crop_batch, workers, desc="validate")[0]

    history, selected = train_finetune(
        model, train_data, labels_of, validate if val_data else None, cfg, device, cfg.seed, workers
    )
    probs = {"val": validate(model)[1] if val_data else np.zeros((0, len(labels["test"][0])))}
    test_data = eval_dataset(setup, cache, splits["test"], cfg)
    probs["test"] = predict(model, test_data, device, cfg.crop_batch, workers, desc="test")[0]
    probs["train"] = np.zeros((0, probs["test"].shape[1]))
    return history, selected, probs


def _write_outputs(out, cfg, model, setup, classes, splits, labels, probs, thresholds, result) -> None:
    write_metrics(out, result)
    mode = "Linear probe" if cfg.freeze_encoder else "Fine-tuning"
    val_auc = result["val"]["macro_auroc"]
    if cfg.freeze_encoder:
        fit = f"logistic regression, L2 {result['probe_l2']:g} chosen on validation from {list(cfg.probe_l2)}"
    else:
        fit = f"weights of step {result['selected_step']} ({cfg.select})"
    val = f"{val_auc:.3f}" if val_auc is not None and np.isfinite(val_auc) else "n/a"
    preamble = [
        f"init `{cfg.init}` (pre-training method: {setup.method}); label fraction {cfg.fraction}; seed {cfg.seed}",
        f"studies: {len(splits['train'])} train, {len(splits['val'])} validation, {len(splits['test'])} test; "
        f"{fit}; validation macro AUROC {val}",
        "F1 and accuracy use per-class thresholds chosen for the best F1 on the validation split.",
    ]
    (out / "report.md").write_text(classification_markdown(f"{mode}: finding classification", result["test"], preamble))
    plot_training_curves(result["history"], out / "curves.png", f"{mode} from {setup.method}")
    plot_roc(labels["test"], probs["test"], classes, out / "roc.png", f"{mode} (init {setup.method}): test ROC")
    with (out / "predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "split", *[f"p:{c}" for c in classes], *[f"y:{c}" for c in classes]])
        for split in ("val", "test"):
            for i, p, y in zip(splits[split], probs[split], labels[split]):
                writer.writerow([i, split, *[f"{v:.6f}" for v in p], *[int(v) for v in y]])
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": list(classes),
        "thresholds": torch.tensor(np.asarray(thresholds, dtype=np.float32)),
        "config": to_dict(cfg),
        "init_method": setup.method,
        "encoder": {
            "model": to_dict(setup.model),
            "windows": [list(w) for w in setup.windows],
            "preprocess": to_dict(setup.preprocess),
            "whole_volume": setup.whole_volume,
            "grid": list(setup.grid),
        },
        "step": int(result["selected_step"]),
    }
    save_checkpoint(state, out, "classifier")
