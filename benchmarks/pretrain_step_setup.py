"""One pre-training step on fixed synthetic inputs, wired exactly as ``t3d.pretrain.main`` wires a real one
(``benchmarks/pretrain_step.py`` times, counts and measures it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from t3d.config import PretrainConfig
from t3d.losses import MethodSpec, PretrainObjective, method_spec
from t3d.pretrain.engine import StepContext, build_optimizer, build_scheduler, train_step
from t3d.pretrain.main import _autocast_dtype
from t3d.pretrain.model import PretrainModel

SENTENCES, TOKENS = 6, 64  # per report, for align=sentence / cross-attention methods


@dataclass
class Step:
    """One method's training step on fixed synthetic inputs; ``run()`` is exactly one ``train_step``."""

    name: str
    ctx: StepContext
    batch: dict
    generator: torch.Generator
    studies: int
    crops: int
    """Crops per step (0 for whole-volume methods)."""
    voxels: int
    """Input voxels per step (all crops, or all volumes)."""

    def run(self, batch: dict | None = None) -> None:
        train_step(self.ctx, [batch or self.batch], self.generator)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)


def synthetic_text(cfg: PretrainConfig, studies: int, text_dim: int, device: torch.device, seed: int):
    """``text_for(batch)`` over random unit-norm features, shaped like ``TextLookup.for_batch``'s output."""
    spec, g = method_spec(cfg.method), torch.Generator().manual_seed(seed)
    feats = {"frozen": F.normalize(torch.randn(studies, text_dim, generator=g), dim=-1)}  # (B, Et)
    if spec.restore and spec.conditioning_for(cfg.model.conditioning) == "cross_attention":
        feats["tokens"] = torch.randn(studies, TOKENS, text_dim, generator=g)  # (B, L, Et)
        feats["token_mask"] = torch.ones(studies, TOKENS, dtype=torch.bool)
    if spec.align == "sentence":
        feats["sent"] = F.normalize(torch.randn(studies, SENTENCES, text_dim, generator=g), dim=-1)  # (B, S, Et)
    feats = {k: v.to(device) for k, v in feats.items()}

    def text_for(batch: dict) -> dict[str, torch.Tensor]:
        idx = batch["index"].to(device)
        out = {k: v[idx] for k, v in feats.items() if k != "sent"}
        if "sent" in feats:
            out["sent"] = feats["sent"][idx].flatten(0, 1)  # (B*S, Et)
            out["sent_owner"] = torch.arange(len(idx), device=device).repeat_interleave(SENTENCES)
        return out

    return text_for


def build_step(
    cfg: PretrainConfig, device: torch.device, text_dim: int, seed: int, spec: MethodSpec | None = None
) -> Step:
    """Model, objective, AdamW, schedule and autocast exactly as ``t3d.pretrain.main`` wires them. ``spec``: a
    method row other than ``cfg.method``'s (a variant that has no name in the table). Tiled methods also get
    ``tiles.max_tiles`` real tiles per study (the padded maximum, none masked)."""
    spec, b = spec or method_spec(cfg.method), cfg.train.batch_size
    torch.manual_seed(seed)
    model = PretrainModel(cfg, spec, text_dim=text_dim).to(device)
    objective = PretrainObjective(cfg.loss, spec).to(device)
    optimizer = build_optimizer(model, cfg.train)
    ctx = StepContext(
        model=model,
        objective=objective,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.train),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"),
        text_for=synthetic_text(cfg, b, text_dim, device, seed),
        device=device,
        cfg=cfg.train,
        autocast_dtype=_autocast_dtype(cfg.train.precision, device),
    )
    g = torch.Generator().manual_seed(seed)
    c, index = cfg.crops.channels, torch.arange(b)
    if spec.whole_volume:
        shape, crops = (b, c, *cfg.clip.grid), 0  # (B, C, D, H, W)
        batch = {"volume": torch.rand(shape, generator=g).to(device), "index": index}
    else:
        shape = (b, cfg.crops.sites, 2, c, *cfg.crops.size)  # (B, K, 2, C, D, H, W)
        batch = {"views": torch.rand(shape, generator=g).to(device), "index": index}
        crops = b * cfg.crops.sites * 2
    if spec.tiles:
        t = cfg.tiles.max_tiles
        batch["tiles"] = torch.rand(b, t, c, *cfg.crops.size, generator=g).to(device)  # (B, T, C, D, H, W)
        batch["tile_pos"] = (torch.rand(b, t, 3, generator=g) * 2 - 1).to(device)
        batch["tile_mask"] = torch.ones(b, t, dtype=torch.bool, device=device)
    return Step(cfg.method, ctx, batch, torch.Generator().manual_seed(seed), b, crops, math.prod(shape) // c)
