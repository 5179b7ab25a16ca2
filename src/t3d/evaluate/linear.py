"""L2-regularised logistic regression on frozen features: the linear probe every evaluation of an encoder uses.

    probe = fit_probe(x_train, y_train, x_val, y_val, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0))
    scores = probe.scores(x_test)          # (N, L) probabilities

Features are standardised with the training statistics, one logistic regression per L2 strength is fitted by
full-batch L-BFGS from zero weights, and the strength with the best validation macro AUROC is kept (CLIP's
linear-probe protocol). The same fitter serves ``t3d finetune cls --probe`` and the frozen-encoder probes of
``t3d.evaluate.probes``, so every encoder meets the same probe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from t3d.metrics import auroc_per_class


def fit_logistic(
    head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, l2: float, steps: int, pos_weight=None, on_step=None
) -> list[tuple[int, float]]:
    """L2-regularised logistic regression of ``head`` on (N, F) ``x``, full batch, L-BFGS from zero weights.

    Minimises, per class, ``mean BCE + l2 / 2 * ||w||^2`` (bias not penalised), as scikit-learn's
    ``LogisticRegression(C=1 / (l2 N))`` does (tested): strictly convex, so the answer does not depend on the
    optimiser's implicit bias (Adam on an unregularised probe with fewer studies than feature dimensions fell to
    chance-level validation AUROC). ``on_step(step)`` runs after each iteration.
    """
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    # One iteration per call (``on_step`` after each); max_eval must stay > 1 (its default is 1.25 max_iter = 1):
    # with a single evaluation the strong-Wolfe search can take no step, and the weights stayed at exactly zero.
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=1, max_eval=25, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad(set_to_none=True)
        # Per class: mean BCE over studies + l2/2 |w_c|^2 (summed over classes: L independent regressions, so the
        # strength means the same whatever the number of findings).
        per_class = F.binary_cross_entropy_with_logits(head(x), y, pos_weight=pos_weight, reduction="none").mean(0)
        loss = per_class.sum() + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    curve = []
    for step in range(1, steps + 1):
        curve.append((step, float(optimizer.step(closure).detach())))
        if on_step is not None:
            on_step(step)
    return curve


def mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean AUROC over the classes where it is defined (NaN if none is)."""
    values = auroc_per_class(y, p)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


@dataclass
class LinearProbe:
    """A fitted probe: standardisation, weights and the validation sweep that chose its L2 strength."""

    mean: torch.Tensor
    """(F,) training feature mean."""
    std: torch.Tensor
    """(F,) training feature standard deviation (1 where a feature is constant)."""
    head: torch.nn.Linear
    l2: float
    sweep: list[dict] = field(default_factory=list)
    """Per strength: ``{"l2", "val_auroc"}``."""

    @torch.no_grad()
    def scores(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, L) probabilities for (N, F) features."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return torch.sigmoid(self.head((x - self.mean) / self.std)).numpy()


def standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per feature of (N, F) ``x``; constant features get std 1 (they stay 0)."""
    std = x.std(dim=0, unbiased=False)
    return x.mean(dim=0), torch.where(std > 1e-8, std, torch.ones_like(std))


def fit_probe(
    x_train,
    y_train,
    x_val,
    y_val,
    l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    steps: int = 100,
    score: Callable[[np.ndarray, np.ndarray], float] = mean_auroc,
) -> LinearProbe:
    """Fit one probe per strength of ``l2_grid`` on (N, F) features / (N, L) 0-1 labels; keep the best on validation.

    ``score(y_val, p_val)`` ranks the strengths (default: macro AUROC); a NaN score ranks last, ties keep the
    stronger regularisation. With an empty validation set the middle strength of the grid is used.
    """
    x = torch.as_tensor(np.asarray(x_train), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y_train), dtype=torch.float32).reshape(len(x), -1)
    xv = torch.as_tensor(np.asarray(x_val), dtype=torch.float32).reshape(-1, x.shape[1])
    yv = np.asarray(y_val, dtype=np.float32).reshape(len(xv), y.shape[1])
    mean, std = standardiser(x)
    xs, xvs = (x - mean) / std, (xv - mean) / std
    grid = sorted(float(v) for v in l2_grid)
    if len(xv) == 0:
        grid = [grid[len(grid) // 2]]
    best: tuple[float, float, dict] | None = None
    sweep = []
    for l2 in reversed(grid):  # strongest first: on ties the simpler probe wins
        head = torch.nn.Linear(x.shape[1], y.shape[1])
        fit_logistic(head, xs, y, l2, steps)
        with torch.no_grad():
            val = score(yv, torch.sigmoid(head(xvs)).numpy()) if len(xv) else float("nan")
        sweep.append({"l2": l2, "val_auroc": val})
        rank = val if np.isfinite(val) else -np.inf
        if best is None or rank > best[0]:
            best = (rank, l2, head.state_dict())
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    head.load_state_dict(best[2])
    return LinearProbe(mean, std, head, best[1], sweep)
