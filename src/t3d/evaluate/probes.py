"""Linear probes on frozen features: the study-level finding probe and the lesion-level probe (docs/method.md §7).

    study = study_probe(x, y, split, names)                  # x (N, F) study features, y (N, L), split: train/val/test
    lesion = lesion_probe(x, sites, split_of_study, strata_mm=(10.0,))

Both fit ``t3d.evaluate.linear.fit_probe`` (standardised features, L-BFGS logistic regression, L2 strength chosen
on the validation studies) on the training studies and score the held-out test studies. Intervals are percentile
bootstraps over *studies*: for the study probe every row is a study (``t3d.metrics.classification_metrics``); for
the lesion probe the crops of a resampled study travel together (cluster bootstrap), since lesions of one study are
not independent. ``paired_*`` give the difference of two encoders on the same test units with one set of resamples,
which is what the sensitivity gate (``t3d.evaluate.gate``) reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from t3d.evaluate.lesions import CropSite
from t3d.evaluate.linear import fit_probe
from t3d.metrics import (
    auroc,
    auroc_replicates,
    bootstrap_indices,
    classification_metrics,
    percentile_interval,
)

DEFAULT_L2 = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _rows(split: Sequence[str], name: str) -> np.ndarray:
    return np.flatnonzero(np.asarray(split) == name)


def study_probe(
    x,
    y,
    split: Sequence[str],
    names: Sequence[str],
    l2_grid: Sequence[float] = DEFAULT_L2,
    steps: int = 100,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Multi-label finding probe: fit on ``train`` rows, L2 by ``val`` rows, macro and per-finding AUROC on ``test``.

    Returns ``{"metrics": classification_metrics(...), "scores": (N_test, L) list, "labels", "l2", "sweep"}``.
    """
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    train, val, test = (_rows(split, s) for s in ("train", "val", "test"))
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"study probe needs train and test studies, got {len(train)} train, {len(test)} test")
    probe = fit_probe(x[train], y[train], x[val], y[val], l2_grid, steps)
    scores = probe.scores(x[test])
    metrics = classification_metrics(y[test], scores, 0.5, names, n_boot=n_boot, seed=seed, stratified=True)
    return {
        "metrics": metrics,
        "scores": scores.tolist(),
        "labels": y[test].tolist(),
        "l2": probe.l2,
        "sweep": probe.sweep,
    }


def size_stratum(diameter_mm: float, thresholds: Sequence[float]) -> int:
    """Index of the size stratum of a lesion: 0 below ``thresholds[0]``, ..., len(thresholds) above the last."""
    return int(np.searchsorted(np.asarray(thresholds, float), diameter_mm, side="right"))


def stratum_names(thresholds: Sequence[float]) -> list[str]:
    """``small``/``large`` for one threshold, else ``lt<t0>mm``, ``<t0>-<t1>mm``, ..., ``ge<tn>mm``."""
    if len(thresholds) == 1:
        return ["small", "large"]
    edges = [f"{t:g}" for t in thresholds]
    return [f"lt{edges[0]}mm", *[f"{a}-{b}mm" for a, b in zip(edges, edges[1:])], f"ge{edges[-1]}mm"]


def lesion_probe(
    x,
    sites: Sequence[CropSite],
    split_of: dict[str, str],
    thresholds: Sequence[float] = (10.0,),
    l2_grid: Sequence[float] = DEFAULT_L2,
    steps: int = 100,
    n_boot: int = 1000,
    seed: int = 0,
    per_class: bool = True,
) -> dict:
    """Lesion vs location-matched lesion-free crop: AUROC per size stratum on test.

    ``x`` (M, F): features of ``sites``; ``split_of``: study id -> ``train``/``val``/``test``. With ``per_class``
    one probe per lesion class (``CropSite.lesion_class``): a nodule in the lung and a cyst in a kidney differ from
    their surroundings in opposite directions, which one linear direction cannot serve; each probe scores its own
    class's test crops, and the strata pool those scores. Otherwise one probe over every class. A stratum's AUROC
    uses its test positives and the negatives matched to them (same ``group``). Returns ``{"strata": {name: Interval
    dict + positives/negatives}, "all": ..., "test": {"label", "score", "stratum", "study", "site"}, "l2": {class: L2},
    "sweep": {class: sweep}, ...}`` (class ``all`` without ``per_class``).
    """
    x = np.asarray(x, np.float32)
    label = np.array([s.label for s in sites], np.float32)
    split = np.array([split_of.get(s.study, "") for s in sites])
    kind = np.array([str(s.lesion_class) if per_class else "all" for s in sites])
    score = np.full(len(sites), np.nan)
    out: dict = {"strata": {}, "l2": {}, "sweep": {}, "thresholds_mm": list(thresholds), "per_class": per_class}
    for c in sorted(set(kind)):
        train, val, test = (np.flatnonzero((split == s) & (kind == c)) for s in ("train", "val", "test"))
        if len(np.unique(label[train])) < 2:
            if not per_class:
                raise ValueError("lesion probe: the training studies need both lesion and lesion-free crops")
            continue  # a class without training crops of both kinds: its test crops stay unscored (left out)
        probe = fit_probe(x[train], label[train, None], x[val], label[val, None], l2_grid, steps)
        score[test] = probe.scores(x[test])[:, 0]
        out["l2"][c], out["sweep"][c] = probe.l2, probe.sweep
    if not out["l2"]:
        raise ValueError("lesion probe: the training studies need both lesion and lesion-free crops")
    test = np.flatnonzero((split == "test") & np.isfinite(score))
    stratum = np.array([size_stratum(sites[i].diameter_mm, thresholds) for i in test])
    study = np.array([sites[i].study for i in test])
    y, score = label[test], score[test]
    for k, name in enumerate(stratum_names(thresholds)):
        keep = stratum == k
        out["strata"][name] = _stratum_entry(y[keep], score[keep], study[keep], n_boot, seed)
    out["all"] = _stratum_entry(y, score, study, n_boot, seed)
    out["test"] = {"label": y.tolist(), "score": score.tolist(), "stratum": stratum.tolist(), "study": study.tolist()}
    out["test"]["site"] = test.tolist()  # index into ``sites`` of each scored test crop
    return out


def _stratum_entry(y, score, study, n_boot: int, seed: int) -> dict:
    interval = cluster_auroc(y, score, study, n_boot, seed)
    return {**interval, "positives": int((y > 0.5).sum()), "negatives": int((y < 0.5).sum())}


def _cluster_resamples(clusters: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``n_boot`` resamples that draw whole clusters (studies) with replacement."""
    _, inverse = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(inverse.max() + 1)] if len(inverse) else []
    if not members:
        return []
    return [np.concatenate([members[c] for c in row]) for row in bootstrap_indices(len(members), n_boot, seed)]


def cluster_auroc(y, score, clusters, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC of binary ``y`` by ``score`` with a percentile interval over resampled clusters."""
    y, score = np.asarray(y, float), np.asarray(score, float)
    reps = [
        auroc_replicates(y[r][None], score[r][None])[0] for r in _cluster_resamples(np.asarray(clusters), n_boot, seed)
    ]
    return percentile_interval(auroc(y, score), np.asarray(reps)).as_dict()


def paired_cluster_auroc(y, score_a, score_b, clusters, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC(a) - AUROC(b) on the same binary test units, one cluster resampling for both."""
    y, a, b = np.asarray(y, float), np.asarray(score_a, float), np.asarray(score_b, float)
    reps = [
        auroc_replicates(y[r][None], a[r][None])[0] - auroc_replicates(y[r][None], b[r][None])[0]
        for r in _cluster_resamples(np.asarray(clusters), n_boot, seed)
    ]
    return percentile_interval(auroc(y, a) - auroc(y, b), np.asarray(reps)).as_dict()


def paired_macro_auroc(y, score_a, score_b, n_boot: int = 1000, seed: int = 0) -> dict:
    """Macro AUROC(a) - macro AUROC(b) over the classes defined on (N, L) test studies, resampled by study."""
    y, a, b = (np.asarray(v, float) for v in (y, score_a, score_b))
    scored = [c for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    if not scored:
        raise ValueError("paired_macro_auroc: no finding has both positive and negative test studies")
    idx = bootstrap_indices(len(y), n_boot, seed)

    def macro(scores: np.ndarray, rows) -> np.ndarray:
        return np.mean([auroc_replicates(y[rows, c], scores[rows, c]) for c in scored], axis=0)

    full = np.arange(len(y))[None]
    point = float((macro(a, full) - macro(b, full))[0])
    return percentile_interval(point, macro(a, idx) - macro(b, idx)).as_dict()
