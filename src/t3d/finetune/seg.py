"""``t3d finetune seg``: organ + tumour segmentation from a pre-trained encoder (docs/method.md §6).

    t3d finetune seg --data Task03_Liver/dataset.json --init runs/pretrain --fraction 0.1 --out runs/seg_t3d_10
    t3d finetune seg --data ... --init random --model.encoder swinvit --model.preset base   # the baseline

What happens: the dataset's studies are preprocessed exactly as in pre-training (orientation, spacing, HU checks;
labels nearest) into a cache; seeded test / validation / training-subset splits are written to ``subset.json``; a
SwinUNETR (swinvit) or encoder-UNet (resnet) is initialised from the checkpoint through
``encoder_state_for_swinunetr`` / ``encoder_state_for_resnet`` with strict key checks; Dice + CE on label-centred
patches; sliding-window validation keeps the best checkpoint (mean Dice); the best checkpoint is scored on the test
set (Dice and HD95 per class, small-lesion Dice). The run folder gets config.yaml, subset.json, log.jsonl,
checkpoints/best.pt, metrics.json, report.md, curves.png and test_overlay.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from t3d.checkpoint import load_checkpoint, save_checkpoint
from t3d.config import ConfigError, load_config, save_config, to_dict
from t3d.data.cache import StudyCache, write_json_atomic
from t3d.data.cases import prepare_cache
from t3d.finetune.config import SegConfig, check_seg_crop
from t3d.finetune.networks import SegSpec, encoder_module
from t3d.finetune.segdata import PatchDataset, check_label_values, lesion_classes, load_volume, make_splits, read_msd
from t3d.finetune.segeval import InferenceSetting, evaluate_cases
from t3d.finetune.segreport import plot_curves, plot_overlay, write_report
from t3d.models.keymap import LoadReport, encoder_state_for_resnet, encoder_state_for_swinunetr, load_into
from t3d.pretrained import SEG_KIND, PretrainedEncoder, load_pretrained

log = logging.getLogger(__name__)


def command(args: argparse.Namespace) -> int:
    cfg = load_config(SegConfig, args.config, args.overrides)
    flags = {"data": args.data, "init": args.init, "fraction": args.fraction, "out": args.out}
    flags["freeze_encoder"] = args.freeze_encoder
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    metrics = run_seg(cfg)
    test = metrics["test"]
    print(
        f"finetune seg [{metrics['init_name']}] -> {cfg.out}\n  best val Dice {metrics['best_val_dice']:.4f} "
        f"(step {metrics['best_step']}); test Dice {test.get('dice_mean', float('nan')):.4f}, "
        f"HD95 {test.get('hd95_mean', float('nan')):.2f} mm"
    )
    return 0


# ----------------------------------------------------------------------------------------------- setup


def resolve_spec(cfg: SegConfig, labels: dict[int, str]) -> tuple[SegSpec, PretrainedEncoder | None]:
    """The network/preprocessing spec and the weights to load: from the checkpoint (``init``); for ``random`` from
    ``arch_from``'s checkpoint (spec only, no weights) or else from ``cfg``."""
    if cfg.init == "random" and not cfg.arch_from:
        crop = cfg.crop_size or (96, 96, 96)
        return SegSpec(cfg.model, cfg.preprocess, cfg.windows, crop, labels), None
    source = cfg.init if cfg.init != "random" else cfg.arch_from
    pre = load_pretrained(source)
    defaults = SegConfig()
    for name, ours, theirs in (
        ("model", cfg.model, pre.model),
        ("preprocess", cfg.preprocess, pre.preprocess),
        ("windows", cfg.windows, pre.windows),
    ):
        if ours != getattr(defaults, name) and ours != theirs:
            log.warning(
                "%s is taken from the checkpoint %s (%s); the configured value is ignored", name, source, theirs
            )
    model = dataclasses.replace(pre.model, grad_checkpointing=cfg.model.grad_checkpointing)
    if cfg.crop_size is None:
        check_seg_crop(pre.crop_size, f"crop size of the checkpoint {source} (set crop_size to override)")
    spec = SegSpec(model, pre.preprocess, pre.windows, cfg.crop_size or pre.crop_size, labels)
    return spec, (pre if cfg.init != "random" else None)


def initialise(net: nn.Module, spec: SegSpec, pre: PretrainedEncoder | None) -> LoadReport | None:
    """Load the pre-trained encoder into ``net`` with strict key checks (ValueError naming keys on mismatch)."""
    if pre is None:
        return None
    if spec.model.encoder == "swinvit":
        report = load_into(net, encoder_state_for_swinunetr(pre.state), prefix="swinViT.", strict=True)
    else:
        report = load_into(encoder_module(net), encoder_state_for_resnet(pre.state), strict=True)
    log.info(
        "initialised %d encoder tensors from %s (missing %d, unexpected %d)",
        report.loaded,
        pre.source,
        len(report.missing),
        len(report.unexpected),
    )
    return report


def build_optimizer(net: nn.Module, cfg: SegConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (encoder at ``lr * encoder_lr_scale``), warmup + cosine to zero."""
    encoder = encoder_module(net)
    if cfg.freeze_encoder:
        encoder.requires_grad_(False)
    enc_ids = {id(p) for p in encoder.parameters()}
    rest = [p for p in net.parameters() if p.requires_grad and id(p) not in enc_ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    enc = [p for p in encoder.parameters() if p.requires_grad]
    if enc:
        groups.append({"params": enc, "lr": cfg.lr * cfg.encoder_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------- run


@dataclass
class SegRun:
    """What the training loop needs besides the model."""

    cfg: SegConfig
    spec: SegSpec
    cache: StudyCache
    splits: dict
    infer: InferenceSetting
    out: Path
    device: torch.device


def run_seg(cfg: SegConfig) -> dict:
    """Fine-tune, select on validation, test; write the run folder; return the metrics (also in metrics.json)."""
    if not cfg.data:
        raise ConfigError("pass --data DATASET_JSON (an MSD-layout dataset.json)")
    start = time.perf_counter()
    out = Path(cfg.out)
    if (out / "checkpoints" / "best.pt").exists():
        raise ValueError(f"{out} already holds a fine-tuning run; choose another --out or delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    save_config(cfg, out / "config.yaml")
    train_cases, test_cases, labels = read_msd(cfg.data)
    spec, pre = resolve_spec(cfg, labels)
    keys = prepare_cache(train_cases + test_cases, cfg.cache or out / "cache", spec.preprocess, cfg.preprocess_workers)
    check_label_values(cfg.cache or out / "cache", keys, labels, cfg.data)
    pool = [c.id for c in train_cases if c.id in keys]
    splits = make_splits(
        pool, [c.id for c in test_cases if c.id in keys], cfg.fraction, cfg.val_fraction, cfg.test_fraction, cfg.seed
    )
    write_json_atomic(out / "subset.json", splits)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = spec.build()
    report = initialise(net, spec, pre)
    net.to(device)
    run = SegRun(
        cfg,
        spec,
        StudyCache(cfg.cache or out / "cache"),
        splits,
        InferenceSetting(spec.windows, spec.crop_size, cfg.sw_batch_size, cfg.overlap, device, cfg.amp),
        out,
        device,
    )
    keyed = {k: [keys[i] for i in ids] for k, ids in splits.items() if k in ("train", "val", "test")}
    train_log, val_log, best = train(net, run, keyed)
    net.load_state_dict(load_checkpoint(out / "checkpoints" / "best.pt")["model"])
    test = test_and_plot(net, run, keyed["test"], labels)
    metrics = {
        "task": "segmentation",
        "data": str(cfg.data),
        "init": cfg.init,
        "init_name": (pre.method or "pretrained") if pre else "random",
        "encoder": spec.model.encoder,
        "preset": spec.model.preset,
        "fraction": cfg.fraction,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "freeze_encoder": cfg.freeze_encoder,
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "n_test": len(splits["test"]),
        "labels": {str(k): v for k, v in labels.items()},
        "best_step": best["step"],
        "best_val_dice": best["dice"],
        "small_lesion_mm": cfg.small_lesion_mm,
        "test": test,
        "val": val_log,
        "init_report": report.as_dict() if report else None,
        "spec": spec.as_dict(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_report(metrics, out / "report.md")
    plot_curves(train_log, val_log, out / "curves.png")
    return metrics


def lesion_set(cfg: SegConfig, labels: dict[int, str]) -> list[int]:
    """The lesion classes of a run: ``lesion_labels``, else those named like lesions."""
    return list(cfg.lesion_labels) if cfg.lesion_labels is not None else lesion_classes(labels)


def build_criterion(cfg: SegConfig, labels: dict[int, str]) -> DiceCELoss:
    """Dice + cross-entropy over every class (background included; channel = label value), the lesion classes
    weighted by ``lesion_loss_weight``."""
    weight = None
    if cfg.lesion_loss_weight != 1.0:
        weight = torch.ones(len(labels))
        weight[[c for c in lesion_set(cfg, labels) if 0 < c < len(labels)]] = cfg.lesion_loss_weight
    return DiceCELoss(
        to_onehot_y=True, softmax=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.ce_weight, weight=weight
    )


def train(net: nn.Module, run: SegRun, keyed: dict[str, list[str]]) -> tuple[list[dict], list[dict], dict]:
    """Patch training with periodic validation; the best model (mean val Dice) is saved as checkpoints/best.pt."""
    cfg, device = run.cfg, run.device
    data = PatchDataset(
        run.cache,
        keyed["train"],
        run.spec.windows,
        run.spec.crop_size,
        cfg.pos_fraction,
        cfg.flip_prob,
        cfg.seed,
        length=cfg.steps * cfg.batch_size,
        flip_axes=cfg.flip_axes,
        class_weights={c: cfg.lesion_weight for c in lesion_set(cfg, run.spec.labels)},
    )
    loader = DataLoader(
        data, batch_size=cfg.batch_size, num_workers=cfg.workers, drop_last=True, pin_memory=device.type == "cuda"
    )
    criterion = build_criterion(cfg, run.spec.labels).to(device)  # class weights live with the logits
    optimizer, scheduler = build_optimizer(net, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    val_keys = keyed["val"][: cfg.max_val_cases or None]
    train_log, val_log, best = [], [], {"step": None, "dice": float("nan")}
    with (run.out / "log.jsonl").open("w") as log_file:
        bar = tqdm(loader, total=cfg.steps, desc="finetune seg", unit="step")
        for step, batch in enumerate(bar, start=1):
            net.train()
            if cfg.freeze_encoder:
                encoder_module(net).eval()  # frozen BatchNorm statistics stay those of pre-training
            x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = criterion(net(x).float(), y)  # (B, C, D, H, W) logits vs (B, 1, D, H, W) labels
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            row = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
            train_log.append(row)
            log_file.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if step % cfg.val_every == 0 or step == cfg.steps:
                val = validate(net, run, val_keys, step)
                val_log.append(val)
                log_file.write(json.dumps(val) + "\n")
                log_file.flush()
                if _improved(val["dice_mean"], best, bool(val_keys)):
                    best = {"step": step, "dice": val["dice_mean"]}
                    save_best(net, run, step, val["dice_mean"])
    return train_log, val_log, best


def _improved(dice: float, best: dict, have_val: bool) -> bool:
    """Without validation studies the last model is kept; NaN never beats a number."""
    if best["step"] is None or not have_val:
        return True
    return math.isfinite(dice) and (not math.isfinite(best["dice"]) or dice > best["dice"])


def validate(net: nn.Module, run: SegRun, keys: list[str], step: int) -> dict:
    if not keys:
        return {"step": step, "dice_mean": float("nan"), "dice_per_class": {}}
    res = evaluate_cases(net, run.cache, keys, run.spec.labels, run.infer, hd95=run.cfg.val_hd95, desc="validate")
    row = {"step": step, "dice_mean": res["dice_mean"], "dice_per_class": res["dice_per_class"]}
    if run.cfg.val_hd95:
        row.update(hd95_mean=res["hd95_mean"], hd95_per_class=res["hd95_per_class"])
    log.info("step %d: validation mean Dice %.4f", step, res["dice_mean"])
    return row


def save_best(net: nn.Module, run: SegRun, step: int, dice: float) -> Path:
    state = {
        "kind": SEG_KIND,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "spec": run.spec.as_dict(),
        "config": to_dict(run.cfg),
        "step": step,
        "val_dice": dice,
    }
    return save_checkpoint(state, run.out, "best")


def test_and_plot(net: nn.Module, run: SegRun, keys: list[str], labels: dict[int, str]) -> dict:
    """Score the (best) model on the test studies; draw the first one with its ground truth."""
    if not keys:
        log.warning("no test studies: metrics.json has no test scores")
        return {}
    cfg = run.cfg
    lesions = lesion_set(cfg, labels)
    res = evaluate_cases(
        net,
        run.cache,
        keys,
        labels,
        run.infer,
        hd95=True,
        lesion_labels=lesions,
        small_lesion_mm=cfg.small_lesion_mm,
        lesion_margin_mm=cfg.lesion_margin_mm,
        keep=1,
        desc="test",
    )
    ((key, pred),) = res.pop("predictions").items()
    image = load_volume(run.cache, key, run.spec.windows[:1])[0].numpy()
    plot_overlay(
        image,
        np.asarray(run.cache.label(key)),
        pred,
        labels,
        run.cache.meta(key).spacing,
        run.out / "test_overlay.png",
        title=f"{key}: ground truth (top) vs prediction (bottom)",
        focus=lesions,
    )
    res["lesion_labels"] = lesions
    return res
