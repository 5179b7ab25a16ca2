"""Soft-target contrastive losses of TCL (docs/method.md §4), distributed-aware.

Every function receives this rank's *local* samples, gathers the other side from all ranks with gradients
(``t3d.distributed.gather_with_grad``) and computes its local rows of the global (world·B × world·B) logits.
Y may be the global (world·B, world·B) target matrix (its local rows are taken at offset ``rank() * B``) or
already this rank's rows (B, world·B). In one process both are simply (B, B). The returned loss is the mean over
local rows; under DDP this gives the gradient of the global-batch mean loss (see ``t3d.distributed``).

Logits are computed in at least float32 (autocast may hand us bf16 embeddings; float64 stays float64). Call them
outside autocast (``PretrainObjective`` does): under autocast the matmuls would run in bf16 again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t3d.distributed import all_gather_no_grad, gather_with_grad, rank, world_size


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (softmax over a few hundred logits needs it); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``−Σ_j targets[i, j] · log_softmax(logits)[i, j]``; logits, targets (R, C) -> scalar.

    With one-hot targets this is ``F.cross_entropy``.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"soft_cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    return -(targets * F.log_softmax(_upcast(logits), dim=-1)).sum(dim=-1).mean()


def local_target_rows(y: torch.Tensor, b_local: int) -> torch.Tensor:
    """This rank's rows (B, world·B) of Y, given global (world·B, world·B) or already-local (B, world·B) targets."""
    world = world_size()
    b_global = b_local * world
    if y.ndim != 2 or y.shape[1] != b_global or y.shape[0] not in (b_local, b_global):
        raise ValueError(
            f"targets Y have shape {tuple(y.shape)}; expected ({b_global}, {b_global}) for the global batch or "
            f"({b_local}, {b_global}) for this rank's rows (local batch {b_local}, world size {world})"
        )
    if y.shape[0] == b_local:
        return y
    start = rank() * b_local
    return y[start : start + b_local]


def _symmetric(logits_ab: torch.Tensor, logits_ba: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Average of both directions' soft CE; row i of either direction has target Y[i] (S is symmetric)."""
    return 0.5 * (soft_cross_entropy(logits_ab, y) + soft_cross_entropy(logits_ba, y))


def view_loss(z0: torch.Tensor, z1: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """L_view: the two views of one site are positives, other studies' views negatives (soft, by Y).

    z0, z1: (B, E) normalised embeddings of view 0 / view 1 of one site, or (B, K, E) for K sites at once (the
    loss is then averaged over sites; each site is a separate B-way problem). y: targets (see module doc).
    tau: temperature. Logits ``z0 · gather(z1)ᵀ / τ`` and ``z1 · gather(z0)ᵀ / τ``, soft CE against Y, averaged.
    """
    if z0.shape != z1.shape or z0.ndim not in (2, 3):
        raise ValueError(f"view_loss: z0 {tuple(z0.shape)} and z1 {tuple(z1.shape)} must both be (B, E) or (B, K, E)")
    z0, z1 = _upcast(z0), _upcast(z1)
    if z0.ndim == 2:
        z0, z1 = z0[:, None], z1[:, None]
    y_local = local_target_rows(y, z0.shape[0])
    g0, g1 = gather_with_grad(z0), gather_with_grad(z1)  # (world*B, K, E)
    logits01 = torch.einsum("ike,jke->kij", z0, g1) / tau  # (K, B, world*B)
    logits10 = torch.einsum("ike,jke->kij", z1, g0) / tau
    losses = [_symmetric(logits01[k], logits10[k], y_local) for k in range(z0.shape[1])]
    return torch.stack(losses).mean()


def align_loss(u: torch.Tensor, t: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """L_align: study image embedding vs projected report embedding, soft CLIP loss in both directions.

    u: (B, E) normalised study embeddings (``PretrainModel.study_embedding``: the study head over the pooled
    features of the study's crops, the whole volume for ``clip``; tiled methods: the attention pooling of its tiles).
    t: (B, E) normalised projected report embeddings. logit_scale: 1/τ as a multiplier (scalar tensor, already
    exponentiated as in open_clip's ``ClipLoss``: pass ``log_scale.exp()``), so it stays learnable.
    """
    if u.shape != t.shape or u.ndim != 2:
        raise ValueError(f"align_loss: u {tuple(u.shape)} and t {tuple(t.shape)} must both be (B, E)")
    u, t = _upcast(u), _upcast(t)
    y_local = local_target_rows(y, u.shape[0])
    gu, gt = gather_with_grad(u), gather_with_grad(t)  # (world*B, E)
    return _symmetric(logit_scale * u @ gt.T, logit_scale * t @ gu.T, y_local)


def sentence_similarity(
    crop_z: torch.Tensor,
    sent: torch.Tensor,
    sent_owner: torch.Tensor,
    n_reports: int | None = None,
    crop_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Report-to-study scores: mean over a report's sentences of the best-matching crop (max over crops).

    crop_z: (B', M, E) normalised crop embeddings of B' studies; sent: (S, E) normalised sentence embeddings of
    B reports; sent_owner: (S,) long, report index in [0, B) of each sentence; n_reports: B (default: max owner
    + 1); crop_mask: (B', M) bool, False = padding that never wins the max (tiles of a smaller study).
    Returns (B, B') with entry [j, i] = mean_{sentences of report j} max_m <crop_z[i, m], sentence>.
    """
    b_reports = n_reports if n_reports is not None else int(sent_owner.max()) + 1
    scores = torch.einsum("se,ime->sim", sent, crop_z)  # (S, B', M)
    if crop_mask is not None:
        scores = scores.masked_fill(~crop_mask.bool()[None], float("-inf"))
    per_sentence = scores.amax(dim=2)  # (S, B')
    sums = per_sentence.new_zeros(b_reports, crop_z.shape[0]).index_add(0, sent_owner, per_sentence)
    counts = torch.bincount(sent_owner, minlength=b_reports).to(per_sentence.dtype)
    return sums / counts.clamp_min(1)[:, None]


def sentence_align_loss(
    crop_z: torch.Tensor,
    sent: torch.Tensor,
    sent_owner: torch.Tensor,
    y: torch.Tensor,
    logit_scale: torch.Tensor | float,
    crop_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_align with ``align: sentence``: fine-grained study–report scores, soft CE in both directions.

    crop_z: (B, M, E) normalised crop embeddings of this rank's studies (M = K sites × 2 views); sent: (S, E)
    normalised projected sentence embeddings of this rank's reports; sent_owner: (S,) long, *local* study index in
    [0, B) of each sentence (every study needs at least one sentence). logit_scale: 1/τ multiplier. crop_mask:
    (B, M) bool, False = padding (the tiles of the tiled study path), see ``sentence_similarity``.

    Distributed without padding sentences (their number differs per rank): each rank scores its own reports
    against the gathered crops of every study (its text->image rows), and these rows are gathered with gradients
    to read the image->text rows of its own studies (columns of the global score matrix).
    """
    if crop_z.ndim != 3 or sent.ndim != 2 or sent_owner.ndim != 1 or sent.shape[0] != sent_owner.shape[0]:
        raise ValueError(
            f"sentence_align_loss: expected crop_z (B, M, E), sent (S, E), sent_owner (S,); got "
            f"{tuple(crop_z.shape)}, {tuple(sent.shape)}, {tuple(sent_owner.shape)}"
        )
    b = crop_z.shape[0]
    counts = torch.bincount(sent_owner, minlength=b)
    if counts.numel() > b or bool((counts == 0).any()):
        raise ValueError(
            f"sentence_align_loss: sent_owner must give every local study 0..{b - 1} at least one sentence "
            f"(sentence counts per study: {counts.tolist()}); an empty report needs at least its full text as one "
            "sentence"
        )
    crop_z, sent = _upcast(crop_z), _upcast(sent)
    y_local = local_target_rows(y, b)
    all_mask = None if crop_mask is None else all_gather_no_grad(crop_mask.to(torch.uint8)).bool()
    text_rows = sentence_similarity(gather_with_grad(crop_z), sent, sent_owner, b, all_mask)  # (B, world*B)
    scores = gather_with_grad(text_rows)  # (world*B reports, world*B studies)
    start = rank() * b
    image_rows = scores[:, start : start + b].T  # (B studies, world*B reports)
    return _symmetric(logit_scale * image_rows, logit_scale * text_rows, y_local)
