"""The pre-training loop: one screen of ``train_step`` plus the bookkeeping around it.

``train_step`` does forward, loss, backward, clip, step for one optimiser step (with gradient accumulation); the
loop around it logs, checkpoints and shows progress. Tiled methods run each micro-batch through GradCache
(``t3d.pretrain.gradcache``) and average gradients over ranks themselves. Wiring (data, text features, model) is
in ``main.py``.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from t3d import distributed as dist
from t3d.config import TrainConfig
from t3d.pretrain.gradcache import gradcache_step

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and the temperature (as in CLIP/MAE recipes)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_steps``, then cosine decay to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepContext:
    """What ``train_step`` needs besides the batch; built once by ``main.py``."""

    model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    text_for: Any
    """Callable(batch) -> dict of frozen text features for the batch's studies (on device)."""
    device: torch.device
    cfg: TrainConfig
    autocast_dtype: torch.dtype | None = None
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(ctx: StepContext, micro_batches: list[dict], generator: torch.Generator) -> dict[str, float]:
    """One optimiser step over ``len(micro_batches)`` accumulated micro-batches. Returns the logged terms."""
    ctx.model.train()
    core = getattr(ctx.model, "module", ctx.model)
    tiled = getattr(getattr(core, "spec", None), "tiles", False)
    totals: dict[str, torch.Tensor] = {}
    finite = True

    def backward(loss: torch.Tensor) -> None:
        nonlocal finite
        loss = loss / len(micro_batches)
        if not torch.isfinite(loss):
            finite = False  # keep going so that every DDP rank runs the same collectives
        ctx.scaler.scale(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)).backward()

    no_sync = getattr(ctx.model, "no_sync", None)
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, ctx.device)
        # Tiled steps back-propagate several times per micro-batch outside DDP's reducer: gradients are averaged
        # over ranks once below instead.
        sync = i == len(micro_batches) - 1 and not tiled
        with nullcontext() if sync or no_sync is None else no_sync():
            if tiled:
                chunk = core.cfg.tiles.chunk
                text = ctx.text_for(batch)
                losses = gradcache_step(
                    core, ctx.objective, batch, text, generator, backward, chunk, lambda: _autocast(ctx)
                )
            else:
                with _autocast(ctx):
                    losses = ctx.objective(ctx.model(batch, ctx.text_for(batch), generator=generator))
                backward(losses["loss"])
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.detach().float() / len(micro_batches)
    if tiled:
        dist.all_reduce_gradients(core.parameters())
    # A non-finite loss on any rank skips the step on every rank (same decision everywhere).
    finite = bool(dist.all_reduce_mean(torch.tensor(float(finite), device=ctx.device)).item() == 1.0)
    ctx.scaler.unscale_(ctx.optimizer)
    max_norm = ctx.cfg.grad_clip if ctx.cfg.grad_clip > 0 else float("inf")  # 0 = no clipping, norm still logged
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), max_norm)
    if finite and torch.isfinite(grad_norm):
        ctx.scaler.step(ctx.optimizer)
        core = getattr(ctx.model, "module", ctx.model)
        if getattr(core, "logit_scale", None) is not None:
            core.logit_scale.clamp_()  # keep 1/tau within [1, 100] as CLIP does
    else:
        ctx.skipped_steps += 1
        log.warning("non-finite loss or gradient: step skipped (%d skipped so far)", ctx.skipped_steps)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scheduler.step()
    # Each rank's contrastive terms cover its own rows of the global batch: log their mean over ranks (one reduce).
    keys = list(totals)
    logged = dict(zip(keys, dist.all_reduce_mean(torch.stack([totals[k] for k in keys])).tolist()))
    logged["grad_norm"] = float(grad_norm)
    logged["lr"] = ctx.optimizer.param_groups[0]["lr"]
    logged["skipped_steps"] = ctx.skipped_steps
    return logged


def _autocast(ctx: StepContext):
    if ctx.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)


class RunLog:
    """JSONL log + TensorBoard events of a run; on resume the JSONL is cut back to the checkpoint's step."""

    def __init__(self, run_dir: Path, resume_step: int = 0, enabled: bool = True):
        self.path = run_dir / "log.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if self.path.is_file():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (GPU) or peak resident set size of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Throughput:
    """Crops per second over the last logging window."""

    def __init__(self):
        self.t0, self.count = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.count += n

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.count / max(now - self.t0, 1e-9)
        self.t0, self.count = now, 0
        return rate
