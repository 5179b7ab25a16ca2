"""Training loops of the study classifier: full fine-tuning on random crops, and a linear probe on cached features.

Fine-tuning validates every ``val_every`` steps (validation BCE and macro AUROC on the deterministic evaluation
crops), records the curves and returns the weights of the best validation point (``select: best``) or the last.
The linear probe is L2-regularised logistic regression (L-BFGS) per L2 strength of ``probe_l2``, validated the same
way; the strength with the best validation macro AUROC is kept.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from t3d.evaluate.joint import encode_studies
from t3d.evaluate.linear import fit_logistic
from t3d.finetune.clsmodel import StudyClassifier
from t3d.metrics import auroc_per_class

log = logging.getLogger(__name__)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``steps`` (as pre-training)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-label binary cross-entropy, mean over studies and classes."""
    return F.binary_cross_entropy_with_logits(logits.float(), y.float(), pos_weight=pos_weight)


def class_pos_weight(y_train: np.ndarray) -> torch.Tensor:
    """negatives / positives per class (1 where a class has no positives), for ``pos_weight``."""
    pos = y_train.sum(axis=0)
    return torch.tensor(np.where(pos > 0, (len(y_train) - pos) / np.maximum(pos, 1), 1.0), dtype=torch.float32)


def macro_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean AUROC over classes where it is defined (NaN if none is)."""
    values = auroc_per_class(y, p)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


@torch.no_grad()
def study_features(model: StudyClassifier, dataset: Dataset, device, crop_batch: int, workers: int = 0, desc="study"):
    """(N, F') pooled study features of every study of ``dataset`` (grid crops, eval mode) and their ids."""
    model.eval()
    per_study, ids = encode_studies(dataset, model.crop_features, device, crop_batch, workers, desc=desc)
    return torch.stack([model.pool_study(f) for f in per_study]), ids


@torch.no_grad()
def predict(model: StudyClassifier, dataset: Dataset, device, crop_batch: int, workers: int = 0, desc="predict"):
    """(N, L) probabilities for the studies of ``dataset`` and their ids."""
    feats, ids = study_features(model, dataset, device, crop_batch, workers, desc)
    return torch.sigmoid(model.classify(feats.to(device))).float().cpu().numpy(), ids


class Tracker:
    """Curves and the best validation point: score = macro AUROC (validation loss where AUROC is undefined)."""

    def __init__(self, model: torch.nn.Module, select: str):
        self.model, self.select = model, select
        self.history: dict[str, list] = {"train": [], "val": []}
        self.best_score, self.best_step, self.best_state = -math.inf, 0, None

    def validate(self, step: int, y_val: np.ndarray, p_val: np.ndarray) -> None:
        loss = float(F.binary_cross_entropy(torch.from_numpy(p_val).clamp(1e-7, 1 - 1e-7), torch.from_numpy(y_val)))
        auc = macro_auroc(y_val, p_val)
        self.history["val"].append({"step": step, "loss": loss, "auroc": auc})
        score = auc if np.isfinite(auc) else -loss
        if self.select == "best" and score > self.best_score:
            self.best_score, self.best_step = score, step
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})

    def finish(self, step: int) -> int:
        """Load the selected weights into the model; return the step they come from."""
        if self.select == "best" and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            return self.best_step
        return step


def train_probe(model: StudyClassifier, feats: dict[str, torch.Tensor], labels: dict[str, np.ndarray], cfg, device):
    """Linear probe on cached (N, F') study features: logistic regression for each L2 strength in
    ``cfg.probe_l2``, the strength with the best validation macro AUROC kept (CLIP's linear-probe protocol).

    ``feats``/``labels``: per split ``train``/``val``. Features are standardised with the train statistics.
    Returns (history of the kept strength + the sweep, its L2 strength).
    """
    model.norm.fit(feats["train"])
    model.to(device)
    x, y = model.norm(feats["train"].to(device)), torch.from_numpy(labels["train"]).to(device)
    x_val, has_val = model.norm(feats["val"].to(device)), len(labels["val"]) > 0
    pos_weight = class_pos_weight(labels["train"]).to(device) if cfg.pos_weight else None
    grid = list(cfg.probe_l2) if has_val else [sorted(cfg.probe_l2)[len(cfg.probe_l2) // 2]]
    best: tuple[float, float, dict, dict] | None = None
    sweep = []
    for l2 in tqdm(grid, desc="linear probe (L2 sweep)", unit="fit"):
        tracker = Tracker(model.head, "last")

        def on_step(step: int, tracker=tracker) -> None:
            if has_val and (step % cfg.val_every == 0 or step == cfg.steps):
                with torch.no_grad():
                    tracker.validate(step, labels["val"], torch.sigmoid(model.head(x_val)).cpu().numpy())

        tracker.history["train"] = fit_logistic(model.head, x, y, l2, cfg.steps, pos_weight, on_step)
        last = tracker.history["val"][-1] if has_val else {"auroc": float("nan"), "loss": float("nan")}
        sweep.append({"l2": l2, "val_auroc": last["auroc"], "val_loss": last["loss"]})
        score = last["auroc"] if np.isfinite(last["auroc"]) else -last["loss"]
        if best is None or score > best[0]:
            best = (score, l2, copy.deepcopy(model.head.state_dict()), tracker.history)
    _, l2, state, history = best
    model.head.load_state_dict(state)
    log.info("linear probe: L2 %.0e kept (validation sweep %s)", l2, sweep)
    return {**history, "l2_sweep": sweep}, l2


def train_finetune(
    model: StudyClassifier,
    train_data: Dataset,
    labels_of: Callable[[list[str]], np.ndarray],
    validate: Callable[[StudyClassifier], tuple[np.ndarray, np.ndarray]] | None,
    cfg,
    device,
    seed: int = 0,
    workers: int = 0,
):
    """Fine-tune encoder and head with BCE on ``train_data`` items (crops ``views`` or a whole ``volume``).

    ``validate(model) -> (y_val, p_val)`` runs every ``cfg.val_every`` steps (None: no validation split).
    """
    model.to(device)
    enc = list(model.encoder.parameters())
    head = list(model.head.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": enc, "lr": cfg.lr * cfg.encoder_lr_scale}, {"params": head, "lr": cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    pos_weight = class_pos_weight(labels_of(list(train_ids(train_data)))).to(device) if cfg.pos_weight else None
    tracker = Tracker(model, cfg.select if validate is not None else "last")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp else None
    step, epoch = 0, 0
    bar = tqdm(total=cfg.steps, desc="fine-tune", unit="step")
    while step < cfg.steps:
        train_data.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = DataLoader(train_data, batch_size=cfg.batch_size, shuffle=True, generator=gen, num_workers=workers)
        for batch in loader:
            model.train()
            crops = batch_crops(batch).to(device, non_blocking=True)  # (B, K, C, D, H, W)
            y = torch.from_numpy(labels_of(list(batch["id"]))).to(device)
            with autocast or nullcontext():
                logits = model(crops)
            loss = bce(logits, y, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            step += 1
            tracker.history["train"].append((step, loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if validate is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                tracker.validate(step, *validate(model))
            if step >= cfg.steps:
                break
        epoch += 1
    bar.close()
    return tracker.history, tracker.finish(cfg.steps)


def batch_crops(batch: dict) -> torch.Tensor:
    """A training batch's inputs as (B, K, C, D, H, W): view 0 of each crop site, or the whole volume as K = 1."""
    if "views" in batch:
        return batch["views"][:, :, 0]  # (B, K, 2, C, D, H, W) -> (B, K, C, D, H, W)
    return batch["volume"][:, None]


def train_ids(dataset: Dataset) -> list[str]:
    """Study ids of a crop/volume dataset (``studies`` rows)."""
    return [row["id"] for _, row in dataset.studies]
