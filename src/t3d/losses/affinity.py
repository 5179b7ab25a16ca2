"""Text-affinity targets Y (docs/method.md §4): which studies the reports say belong together.

    s = features.centred()[batch_ids]              # (B, Et) L2-normalised, centred frozen report embeddings
    Y = text_affinity_targets(s, tau_text)         # (B, B) rows sum to 1, no gradient

``Y = row_softmax((s sᵀ − 1) / τ_text)``. The diagonal logit is 0 (cosine 1 with itself) and every other report
enters with weight ``exp(−(1 − cos) / τ_text)``: as τ_text → 0 Y becomes the identity (ordinary InfoNCE), while
reports that say the same thing (cosine ≈ 1, the many "no acute findings" studies) keep sharing probability mass
instead of being pushed apart as false negatives.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def text_affinity_targets(s: torch.Tensor, tau_text: float) -> torch.Tensor:
    """Soft targets ``Y = row_softmax((s sᵀ − 1) / tau_text)``, no gradient (float32, or float64 for float64 s).

    s: (B, Et) L2-normalised (and corpus-centred) frozen report embeddings of the *global* batch.
    Returns (B, B); row i is the target distribution over the batch for study i. S is symmetric, so row i is also
    the target for the reverse (text -> image, or view 1 -> view 0) direction.
    """
    if s.ndim != 2:
        raise ValueError(f"text_affinity_targets: s must be (B, Et), got shape {tuple(s.shape)}")
    if tau_text <= 0:
        raise ValueError(f"text_affinity_targets: tau_text must be > 0, got {tau_text}; calibrate it first")
    s = s.detach()
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    sim = s @ s.T  # (B, B) cosines
    return torch.softmax((sim - 1.0) / tau_text, dim=1)


def hard_targets(batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Y = I (B, B): each study is only its own positive (InfoNCE / CLIP; the ``t3d-hard``, ``vssl``, ``clip`` runs)."""
    return torch.eye(batch, device=device, dtype=torch.float32)


def target_self_prob(y: torch.Tensor) -> torch.Tensor:
    """Mean diagonal of Y (scalar): 1 for hard targets, lower the more mass is shared (for logging)."""
    return torch.diagonal(y).float().mean()


def _batches(n: int, batch_size: int | None, max_batches: int, seed: int) -> list[torch.Tensor]:
    """Random disjoint index sets of ``batch_size`` (one set of all rows when ``batch_size`` is None or >= n)."""
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    count = max(1, min(max_batches, n // batch_size))
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(count)]


@torch.no_grad()
def calibrate_tau_text(
    s: torch.Tensor,
    target_self_prob: float = 0.5,
    lo: float = 1e-3,
    hi: float = 1.0,
    batch_size: int | None = None,
    max_batches: int = 64,
    seed: int = 0,
    iters: int = 60,
) -> float:
    """Pick τ_text so that the mean diagonal of Y equals ``target_self_prob`` (bisection on log τ).

    Why calibrate instead of a fixed τ_text: frozen sentence encoders are anisotropic and put all reports of one
    domain at high cosine — all-MiniLM-L6-v2 on templated chest-CT reports (tests/test_text.py) gives an off-diagonal
    mean cosine of 0.78 (95th percentile 0.90). With uncentred embeddings or a "usual" τ (0.1–1), every row of Y
    is nearly uniform, i.e. every study is a positive of every other and the contrastive terms learn nothing.
    Centring helps; calibrating makes the remaining scale explicit: ``target_self_prob`` = 0.5 means a study keeps
    half of its target mass and shares the rest with studies whose reports say (nearly) the same.

    s: (N, Et) normalised, centred embeddings (a corpus or a batch). Y is computed over the global training batch,
    and the self-probability depends on its size, so pass ``batch_size`` = per-rank batch × world size: Y's
    diagonal is then averaged over up to ``max_batches`` random batches of that size (fixed by ``seed``). With
    ``batch_size=None`` all N rows form one batch.

    The mean diagonal decreases monotonically in τ (each off-diagonal weight exp((cos − 1)/τ) grows with τ), so
    bisection on [lo, hi] converges; if the target lies outside (e.g. many duplicate reports cap the diagonal
    below the target even at ``lo``), the nearest end is returned with a warning.
    """
    if not 0 < target_self_prob < 1:
        raise ValueError(f"calibrate_tau_text: target_self_prob must be in (0, 1), got {target_self_prob}")
    if not 0 < lo < hi:
        raise ValueError(f"calibrate_tau_text: need 0 < lo < hi, got lo={lo}, hi={hi}")
    s = s.detach().float()
    sims = [s[idx] @ s[idx].T for idx in _batches(s.shape[0], batch_size, max_batches, seed)]

    def self_prob(tau: float) -> float:
        return float(torch.stack([torch.softmax((m - 1.0) / tau, dim=1).diagonal().mean() for m in sims]).mean())

    p_lo, p_hi = self_prob(lo), self_prob(hi)
    if p_lo <= target_self_prob:
        log.warning("tau_text: self-probability is %.3f even at tau=%g (duplicate reports?); using %g", p_lo, lo, lo)
        return lo
    if p_hi >= target_self_prob:
        log.warning("tau_text: self-probability is %.3f even at tau=%g; using %g", p_hi, hi, hi)
        return hi
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if self_prob(math.exp(mid)) > target_self_prob:
            a = mid  # diagonal still too peaked: raise tau
        else:
            b = mid
    return math.exp(0.5 * (a + b))
