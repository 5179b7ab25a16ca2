"""Text-affinity targets Y (docs/method.md §4): which studies the reports say are interchangeable.

    s = features.centred()[batch_ids]                              # (B, Et) L2-normalised, centred frozen reports
    Y = text_affinity_targets(s, threshold=0.9, alpha=0.2, tau_text=0.05)   # (B, B) rows sum to 1, no gradient

``Y = (1 − α) I + α W`` with ``W`` a row softmax of ``(S − 1) / τ_text`` restricted to each study's near-duplicates
``N(i) = {j : S_ij ≥ threshold}`` (``S = s sᵀ``; ``i`` is always in ``N(i)``). Every quantity is a property of a
*pair* of reports, never of the batch: a study whose report has no near-duplicate in the batch gets exactly the
one-hot row ``e_i`` whatever B is, and a study shares at most ``α`` of its mass, split among reports that say (nearly)
the same thing (the many "no acute findings" studies), instead of pushing them apart as false negatives.

Why not a batch-calibrated temperature over all reports: soft cross-entropy against rows that spread a fixed share of
their mass over every other study of the batch is minimised by a small logit gap, i.e. by nearly identical
embeddings; at B = 4 a self-probability of 0.5 is 50 % label smoothing with a faint text tilt.

The floor of a soft cross-entropy against Y is its entropy (``CE(Y, p) = H(Y) + KL(Y ‖ p) ≥ H(Y)``), so
``target_entropy`` (mean row entropy, nats) is logged with every step: "L_align covered x % of the way from log B to
its floor" is ``(log B − L) / (log B − H(Y))``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def text_affinity_targets(s: torch.Tensor, threshold: float, alpha: float, tau_text: float) -> torch.Tensor:
    """Soft targets ``Y = (1 − alpha) I + alpha · softmax_{j ∈ N(i)}((S_ij − 1) / tau_text)``, no gradient.

    s: (B, Et) L2-normalised (and corpus-centred) frozen report embeddings of the *global* batch.
    threshold: cosine in (-1, 1] at or above which two reports are near-duplicates (``N(i)``).
    alpha: share of a row's mass given to its near-duplicates (itself included), in [0, 1).
    tau_text: temperature of the softmax inside ``N(i)`` (> 0).
    Returns (B, B) float32 (float64 for float64 s); row i is the target distribution for study i. S is symmetric, so
    row i is also the target for the reverse (text -> image, or view 1 -> view 0) direction.
    """
    if s.ndim != 2:
        raise ValueError(f"text_affinity_targets: s must be (B, Et), got shape {tuple(s.shape)}")
    if tau_text <= 0:
        raise ValueError(f"text_affinity_targets: tau_text must be > 0, got {tau_text}")
    if not 0 <= alpha < 1 or not -1 < threshold <= 1:
        raise ValueError(f"text_affinity_targets: need 0 <= alpha < 1, -1 < threshold <= 1; got {alpha}, {threshold}")
    s = s.detach()
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    sim = s @ s.T  # (B, B) cosines
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    near = (sim >= threshold) | eye  # a report is its own near-duplicate even after rounding
    within = torch.softmax(((sim - 1.0) / tau_text).masked_fill(~near, float("-inf")), dim=1)
    return (1.0 - alpha) * eye.to(sim.dtype) + alpha * within


def hard_targets(batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Y = I (B, B): each study is only its own positive (InfoNCE / CLIP; the ``t3d-hard``, ``vssl``, ``clip`` runs)."""
    return torch.eye(batch, device=device, dtype=torch.float32)


def target_self_prob(y: torch.Tensor) -> torch.Tensor:
    """Mean diagonal of Y (scalar): 1 for hard targets, lower the more mass is shared (for logging)."""
    return torch.diagonal(y).float().mean()


def target_entropy(y: torch.Tensor) -> torch.Tensor:
    """Mean row entropy H(Y) in nats (scalar): the lowest value a soft cross-entropy against Y can reach (0 = I)."""
    y = y.float()
    return -(y * torch.log(y.clamp_min(1e-30))).sum(dim=1).mean() + 0.0  # + 0.0: no "-0.000" for Y = I


@torch.no_grad()
def near_duplicate_share(s: torch.Tensor, threshold: float) -> float:
    """Fraction of ordered pairs of different reports in ``s`` (N, Et) whose cosine is >= ``threshold`` (logged at
    the start of a run: how many studies share target mass at all)."""
    n = s.shape[0]
    if n < 2:
        return 0.0
    sim = s.detach().float() @ s.detach().float().T
    return float(((sim >= threshold).sum() - (sim.diagonal() >= threshold).sum()) / (n * (n - 1)))
