"""Projection heads into the joint image/text space and the learnable CLIP temperature (docs/method.md §3, §4).

image_head = ProjectionHead(encoder.embed_channels, cfg.embed_dim)   # pooled crop features -> z (N, E)
align_head = StudyHead(encoder.embed_channels, cfg.embed_dim)       # a study's pooled crop features -> u (B, E)
text_head = ProjectionHead(text_features.pooled.shape[1], cfg.embed_dim)  # centred frozen Et -> t (N, E)
logits = logit_scale() * u @ t.T
finding_head = CellFindingHead(encoder.feature_channels[3], num_findings)  # supervised, finding_level 3
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Bias-free MLP (Linear -> GELU -> Linear) followed by L2 normalisation: (N, in_dim) -> (N, out_dim), unit norm.

    The same class projects pooled image features and frozen (centred) text embeddings (SimCLR / CLIP heads).
    No biases: a bias is an offset shared by every input, and at initialisation it dominates the projection of unit
    inputs (each output coordinate of ``W x`` has the same spread as the bias), so every report would start in one
    narrow cone (mean pairwise cosine ~0.92 for centred report features whose own cosine is ~0) and the image-report
    logits would hardly differ between reports. Without biases the head is odd-ish around 0 and keeps the inputs'
    spread at initialisation (tests/test_heads.py).

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
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"ProjectionHead expects (..., {self.in_dim}) inputs, got shape {tuple(x.shape)}")
        return F.normalize(self.net(x), dim=-1)  # (N, in_dim) -> (N, E)


class StudyHead(nn.Module):
    """The study embedding that meets the report in L_align: ``u = normalise(MLP(mean_k pooled[:, k]))``.

    Its input is the encoder's pooled features of a study's crops (``encoder.pool``), averaged *before* any
    projection: a head of its own, not the mean of the view head's outputs, because L_view trains that head to
    tell crop positions apart, which is the opposite of what a study-level summary needs. Training
    (``PretrainModel``) and evaluation (``t3d.evaluate.joint.image_embeddings``, ``t3d embed``) both call this
    module, so the embedding that was aligned is the one that is evaluated.

    Args:
        in_dim: the encoder's ``embed_channels``.
        out_dim: E, width of the joint space.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = ProjectionHead(in_dim, out_dim)

    def forward(self, pooled: Tensor) -> Tensor:
        if pooled.ndim != 3:
            raise ValueError(f"StudyHead expects (B, K, C) pooled crop features, got shape {tuple(pooled.shape)}")
        return self.proj(pooled.mean(dim=1))  # (B, K, C) -> (B, E), unit norm


class CellFindingHead(nn.Module):
    """Multiple-instance finding head (the ``supervised`` control): a 1x1x1 convolution gives every cell of one
    encoder map a logit per finding; a crop's logit is the largest over its cells, so the cell that holds a small
    lesion decides, and only it receives the gradient of a positive crop.

    Args:
        channels: width of the encoder map it reads.
        num_findings: L, one logit per finding.
    """

    def __init__(self, channels: int, num_findings: int) -> None:
        super().__init__()
        self.cells = nn.Conv3d(channels, num_findings, kernel_size=1)

    def forward(self, fmap: Tensor) -> Tensor:
        """(N, C, d, h, w) encoder map -> (N, L) crop logits."""
        return self.cells(fmap).amax(dim=(2, 3, 4))


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
