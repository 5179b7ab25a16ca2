"""Projection heads into the joint image/text space and the learnable CLIP temperature (docs/method.md §3, §4).

image_head = ProjectionHead(encoder.embed_channels, cfg.embed_dim)   # pooled crop features -> z (N, E)
text_head = ProjectionHead(text_features.pooled.shape[1], cfg.embed_dim)  # centred frozen Et -> t (N, E)
logits = logit_scale() * u @ t.T
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """MLP (Linear -> GELU -> Linear) followed by L2 normalisation: (N, in_dim) -> (N, out_dim), unit norm.

    The same class projects pooled image features and frozen (centred) text embeddings (SimCLR / CLIP heads).

    Args:
        in_dim: input width (encoder ``embed_channels`` or the text encoder's Et).
        out_dim: E, width of the joint space.
        hidden: hidden width (default ``max(in_dim, out_dim)``).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"ProjectionHead needs positive widths, got in_dim={in_dim}, out_dim={out_dim}")
        hidden = hidden or max(in_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"ProjectionHead expects (..., {self.in_dim}) inputs, got shape {tuple(x.shape)}")
        return F.normalize(self.net(x), dim=-1)  # (N, in_dim) -> (N, E)


class LogitScale(nn.Module):
    """Learnable inverse temperature 1/tau, parameterised as log(1/tau) (CLIP, Radford et al. 2021).

    ``forward()`` returns the scalar multiplier for cosine logits, clamped to [1, max_scale]. As in open_clip,
    call ``clamp_()`` after each optimiser step so the parameter itself stays in range and its gradient never
    vanishes at the clamp.

    Args:
        tau: initial temperature (``loss.tau_align``, e.g. 0.07 -> scale 14.3).
        max_scale: upper bound of 1/tau (CLIP: 100).
        learnable: False freezes tau (a buffer instead of a parameter).
    """

    def __init__(self, tau: float = 0.07, max_scale: float = 100.0, learnable: bool = True) -> None:
        super().__init__()
        if not 1.0 / max_scale <= tau <= 1.0:
            raise ValueError(f"LogitScale: tau={tau} must lie in [1/max_scale, 1] = [{1.0 / max_scale:.4g}, 1]")
        self.max_log = math.log(max_scale)
        value = torch.tensor(math.log(1.0 / tau), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def forward(self) -> Tensor:
        return self.log_scale.clamp(0.0, self.max_log).exp()  # () scalar, 1/tau

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep log(1/tau) in [0, log(max_scale)] (call after ``optimizer.step()``)."""
        self.log_scale.clamp_(0.0, self.max_log)

    @property
    def tau(self) -> float:
        return float(1.0 / self.forward().detach())
