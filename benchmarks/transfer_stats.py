"""Statistics of the transfer benchmark: intervals over seeds x test cases and paired method comparisons.

Every cell of the results table (method, label fraction, metric) rests on S seeds, each scored on the same N held-out
test cases. Two kinds of cell:

- **per-case metrics** (Dice): a value matrix (S, N) with NaN where a case has nothing to score (a case without
  lesions has no lesion Dice) and a weight matrix (S, N) (small-lesion Dice: the number of small lesions in the case,
  so that the cell is the lesion-level mean the segmentation report gives);
- **AUROC**: labels (N, L) and scores (S, N, L); the statistic is the mean over seeds of the macro AUROC.

Intervals are a two-level percentile bootstrap: each replicate resamples seeds with replacement *and* test cases
with replacement (one case draw shared by all seeds of the replicate, as every seed is scored on the same cases),
so seed-to-seed (pre-training + fine-tuning) variation and test-set sampling both widen the interval. With one
seed it reduces to the usual bootstrap over test cases. Where each seed has R fine-tuning runs (``repeats``; the rows
of a per-case matrix are then (seed, run) pairs, seed-major), a replicate also resamples the R runs within each drawn
seed: three levels, so fine-tuning luck widens the interval too.

Paired comparisons (method A - method B) use the *same* seed and case draws for both methods, seeds paired by
seed number (same fine-tuning subset and seed), so the shared difficulty of a case cancels. The two-sided bootstrap
p-value is 2 min(P(delta* <= 0), P(delta* >= 0)). Dice comparisons also get a Wilcoxon signed-rank test over test
cases on the per-case Dice averaged over seeds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

from t3d.metrics import auroc_replicates

# ----------------------------------------------------------------------------------------------- resampling


def resample(n_seeds: int, n_cases: int, n_boot: int, seed: int = 0, repeats: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws: row indices (n_boot, S * R) and case indices (n_boot, N), with replacement.

    Rows are seeds when ``repeats`` is 1; otherwise (seed, run) pairs, seed-major (row = seed * R + run): seeds are
    drawn first, then R runs within each drawn seed. The seed and case draws do not depend on ``repeats``."""
    rng = np.random.default_rng(seed)
    seeds, cases = rng.integers(0, n_seeds, size=(n_boot, n_seeds)), rng.integers(0, n_cases, size=(n_boot, n_cases))
    if repeats == 1:
        return seeds, cases
    runs = rng.integers(0, repeats, size=(n_boot, n_seeds, repeats))
    return (seeds[:, :, None] * repeats + runs).reshape(n_boot, n_seeds * repeats), cases


def weighted_mean(values: np.ndarray, weights: np.ndarray | None = None, axis=None) -> np.ndarray | float:
    """Mean of the finite ``values`` weighted by ``weights`` (default 1); NaN where no finite value has weight."""
    values = np.asarray(values, dtype=float)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    w = np.where(np.isfinite(values), w, 0.0)
    total = w.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, (np.nan_to_num(values) * w).sum(axis=axis) / np.where(total > 0, total, 1), np.nan)
    return float(out) if np.ndim(out) == 0 else out


def mean_replicates(values: np.ndarray, weights: np.ndarray | None, seeds: np.ndarray, cases: np.ndarray) -> np.ndarray:
    """(n_boot,) weighted means of the resampled (S, N) matrices: ``values[seeds[b]][:, cases[b]]`` per replicate."""
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    picked = values[seeds[:, :, None], cases[:, None, :]]  # (B, S, N)
    w = weights[seeds[:, :, None], cases[:, None, :]]
    return weighted_mean(picked.reshape(len(seeds), -1), w.reshape(len(seeds), -1), axis=1)


def macro_auroc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Macro AUROC per seed: labels (N, L), scores (..., N, L) -> (...,); classes with one label value left out;
    NaN where a kept class is undefined (a bootstrap replicate without positives of it)."""
    y = np.asarray(y, dtype=float)
    scores = np.asarray(scores, dtype=float)
    lead = scores.shape[:-2]
    n, num = y.shape
    flat = scores.reshape(-1, n, num)
    per = np.stack(
        [auroc_replicates(np.broadcast_to(y[:, c], (len(flat), n)), flat[:, :, c]) for c in range(num)], axis=-1
    )  # (R, L)
    return per.mean(axis=-1).reshape(lead) if num else np.full(lead, np.nan)


def scored_classes(y: np.ndarray) -> np.ndarray:
    """(L,) bool: classes with both label values among the test cases (those with a defined AUROC)."""
    y = np.asarray(y) > 0.5
    return y.any(axis=0) & (~y).any(axis=0)


def auroc_statistic(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean over seeds of the macro AUROC over the scored classes: y (N, L), scores (S, N, L)."""
    keep = scored_classes(y)
    if not keep.any():
        return float("nan")
    return float(np.mean(macro_auroc(np.asarray(y)[:, keep], np.asarray(scores)[..., keep])))


def auroc_replicates_2level(y: np.ndarray, scores: np.ndarray, seeds: np.ndarray, cases: np.ndarray) -> np.ndarray:
    """(n_boot,) mean-over-seeds macro AUROC of each (seed, case) resample; NaN where a class lost a label value."""
    keep = scored_classes(y)
    if not keep.any():
        return np.full(len(seeds), np.nan)
    y, scores = np.asarray(y)[:, keep], np.asarray(scores, dtype=float)[..., keep]
    yb = y[cases]  # (B, N, L)
    sb = scores[seeds[:, :, None], cases[:, None, :]]  # (B, S, N, L)
    per = np.stack(
        [
            np.stack([auroc_replicates(yb[:, :, c], sb[:, s, :, c]) for c in range(y.shape[1])], -1).mean(-1)
            for s in range(scores.shape[0])
        ],
        axis=1,
    )  # (B, S)
    return per.mean(axis=1)


# ----------------------------------------------------------------------------------------------- intervals


def interval(value: float, replicates: np.ndarray, ci: float = 0.95) -> dict:
    """``{"mean", "low", "high", "n_boot", "n_used"}``: percentile interval of the finite replicates."""
    reps = np.asarray(replicates, dtype=float)
    used = reps[np.isfinite(reps)]
    if not math.isfinite(value) or len(used) == 0:
        return {"mean": value, "low": float("nan"), "high": float("nan"), "n_boot": len(reps), "n_used": len(used)}
    lo, hi = np.quantile(used, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return {"mean": float(value), "low": float(lo), "high": float(hi), "n_boot": len(reps), "n_used": len(used)}


def dice_cell(
    values: np.ndarray, weights: np.ndarray | None, n_boot: int, seed: int = 0, ci: float = 0.95, repeats: int = 1
) -> dict:
    """Interval of a per-case metric over seeds x cases; ``values``/``weights`` (S * R, N), R = ``repeats``
    fine-tuning runs per seed (seed-major rows). ``run_means``: each row's mean (what fine-tuning luck moves)."""
    values = np.asarray(values, dtype=float)
    rows, n = values.shape
    s = _seeds_of(rows, repeats)
    seeds, cases = resample(s, n, n_boot, seed, repeats)
    out = interval(weighted_mean(values, weights), mean_replicates(values, weights, seeds, cases), ci)
    run_means = [weighted_mean(values[i], None if weights is None else np.asarray(weights)[i]) for i in range(rows)]
    return {**out, "n_seeds": s, "n_runs": rows, "n_cases": n, "run_means": run_means}


def _seeds_of(rows: int, repeats: int) -> int:
    if repeats < 1 or rows % repeats:
        raise ValueError(f"{rows} rows are not whole seeds of {repeats} fine-tuning runs each")
    return rows // repeats


def auroc_cell(y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int = 0, ci: float = 0.95) -> dict:
    """Interval of the mean-over-seeds macro AUROC; y (N, L), scores (S, N, L)."""
    scores = np.asarray(scores, dtype=float)
    s, n = scores.shape[:2]
    seeds, cases = resample(s, n, n_boot, seed)
    out = interval(auroc_statistic(y, scores), auroc_replicates_2level(y, scores, seeds, cases), ci)
    return {**out, "n_seeds": s, "n_cases": n}


def seed_t_interval(values: list[float], ci: float = 0.95) -> dict:
    """Mean and Student-t interval over per-seed values (NaN interval for fewer than two seeds)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n_seeds": 0}
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n_seeds": 1}
    half = float(stats.t.ppf(1 - (1 - ci) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n_seeds": len(v)}


# ----------------------------------------------------------------------------------------------- paired tests


def bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided p-value of a bootstrap distribution of differences: 2 min(P(d <= 0), P(d >= 0)), capped at 1."""
    d = np.asarray(deltas, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    return float(min(1.0, 2.0 * min(np.mean(d <= 0), np.mean(d >= 0))))


def paired_delta(
    stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
    point: Callable[[], tuple[float, float]],
    n_seeds: int,
    n_cases: int,
    n_boot: int,
    seed: int = 0,
    ci: float = 0.95,
    repeats: int = 1,
) -> dict:
    """Difference A - B with one set of (seed, run, case) draws for both; ``stat(rows, cases) -> (delta replicates)``
    (rows: see ``resample``)."""
    seeds, cases = resample(n_seeds, n_cases, n_boot, seed, repeats)
    a, b = point()
    deltas = stat(seeds, cases)
    out = interval(a - b, deltas, ci)
    return {
        **out,
        "a_mean": a,
        "b_mean": b,
        "p_boot": bootstrap_p(deltas),
        "n_seeds": n_seeds,
        "n_runs": n_seeds * repeats,
        "n_cases": n_cases,
    }


def paired_dice(
    a: np.ndarray, b: np.ndarray, weights: np.ndarray | None, n_boot: int, seed: int = 0, repeats: int = 1
) -> dict:
    """Paired comparison of a per-case metric: ``a``, ``b``, ``weights`` (S * R, N) on the same seeds, fine-tuning
    runs (row i of both: the same fine-tuning seed) and cases.

    Adds a Wilcoxon signed-rank test over cases on the run-averaged per-case values (cases defined for both)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=float)
    both = np.isfinite(a) & np.isfinite(b)
    a, b = np.where(both, a, np.nan), np.where(both, b, np.nan)  # the same cells count on both sides

    def stat(seeds, cases):
        return mean_replicates(a, w, seeds, cases) - mean_replicates(b, w, seeds, cases)

    n_seeds = _seeds_of(a.shape[0], repeats)
    point = lambda: (weighted_mean(a, w), weighted_mean(b, w))  # noqa: E731
    out = paired_delta(stat, point, n_seeds, a.shape[1], n_boot, seed, repeats=repeats)
    out["per_run_delta"] = [weighted_mean(a[i], w[i]) - weighted_mean(b[i], w[i]) for i in range(a.shape[0])]
    out["wilcoxon"] = wilcoxon_cases(a, b)
    return out


def paired_auroc(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Paired comparison of the mean-over-seeds macro AUROC; scores ``a``, ``b`` (S, N, L), labels y (N, L)."""

    def stat(seeds, cases):
        return auroc_replicates_2level(y, a, seeds, cases) - auroc_replicates_2level(y, b, seeds, cases)

    out = paired_delta(stat, lambda: (auroc_statistic(y, a), auroc_statistic(y, b)), *a.shape[:2], n_boot, seed)
    per_seed = [auroc_statistic(y, a[s : s + 1]) - auroc_statistic(y, b[s : s + 1]) for s in range(a.shape[0])]
    out["per_seed_delta"] = per_seed
    return out


def wilcoxon_cases(a: np.ndarray, b: np.ndarray) -> dict:
    """Wilcoxon signed-rank test (two-sided) over cases of the run-averaged values of (runs, N) ``a`` and ``b``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        ma, mb = np.nanmean(np.asarray(a, float), axis=0), np.nanmean(np.asarray(b, float), axis=0)
    d = (ma - mb)[np.isfinite(ma) & np.isfinite(mb)]
    if len(d) == 0 or not np.any(d != 0):
        return {"statistic": float("nan"), "p": float("nan") if len(d) == 0 else 1.0, "n": int(len(d))}
    res = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return {"statistic": float(res.statistic), "p": float(res.pvalue), "n": int(len(d))}


def verdict(delta: dict, alpha: float = 0.05) -> str:
    """Plain words for a paired difference A - B: a direction needs the bootstrap interval to exclude 0 and, where a
    Wilcoxon test over cases exists, its p below ``alpha`` (a percentile bootstrap over a handful of cases gives
    intervals far too narrow; with fewer than 6 cases the Wilcoxon test cannot reach 0.05)."""
    lo, hi = delta.get("low"), delta.get("high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "undetermined"
    if lo <= 0 <= hi:
        return "no clear difference"
    wil = delta.get("wilcoxon")
    if wil is not None and not wil["p"] < alpha:
        return f"no clear difference (CI excludes 0, Wilcoxon p = {wil['p']:.2f} over {wil['n']} cases)"
    return "A better (CI > 0)" if lo > 0 else "A worse (CI < 0)"
