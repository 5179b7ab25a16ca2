"""Downstream metrics (docs/method.md §6): thin wrappers over MONAI with the conventions we report.

Segmentation (label maps of integer classes, 0 = background):

    dice = dice_per_class(pred, target, num_classes)                 # (num_classes - 1,), NaN where class absent
    hd95 = hd95_per_class(pred, target, num_classes, spacing=(0.8, 0.8, 1.5))   # mm
    lesions = small_lesion_scores(pred, target, lesion_labels=[3], spacing=..., max_diameter_mm=10.0)

Conventions: background is never scored; a class absent from the ground truth gives NaN (not 1, not 0) and is left
out of means (``nanmean``); HD95 is in millimetres (voxel spacing passed to MONAI) and is NaN when either the
prediction or the ground truth lacks the class (MONAI's convention; the mean over cases then ignores it, and the
number of cases it covers is reported next to it).

Classification (multi-label, one 0/1 column per finding; scikit-learn for AUROC): see the second section,
``classification_metrics(y_true, y_score, thresholds, names, n_boot=1000)`` -> per-class and macro AUROC / F1 /
accuracy with study-level bootstrap intervals.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import precision_recall_curve, roc_auc_score

# ----------------------------------------------------------------------------------------------- segmentation


def _as_batch(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) integer label map -> (1, 1, X, Y, Z) long tensor."""
    t = labels.long() if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels).astype(np.int64))
    if t.ndim != 3:
        raise ValueError(f"expected a 3D label map (X, Y, Z), got shape {tuple(t.shape)}")
    return t[None, None]


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(1, 1, X, Y, Z) -> (1, num_classes, X, Y, Z) float."""
    return torch.nn.functional.one_hot(labels[:, 0].clamp(0, num_classes - 1), num_classes).movedim(-1, 1).float()


def dice_per_class(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice 2|P∩G| / (|P| + |G|) of each foreground class between two (X, Y, Z) label maps (MONAI ``DiceMetric``).

    Returns float64 (num_classes - 1,) for classes 1..num_classes-1; NaN where the class is absent from ``target``.
    """
    p, g = _as_batch(pred), _as_batch(target)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape[2:])} and ground truth {tuple(g.shape[2:])} differ in shape")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=num_classes)
    return metric(p, g)[0].double().numpy()


def hd95_per_class(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float],
    percentile: float = 95.0,
) -> np.ndarray:
    """Symmetric ``percentile`` Hausdorff distance in mm of each foreground class (MONAI ``HausdorffDistanceMetric``).

    Surfaces are the voxels removed by one binary erosion; distances are Euclidean with the voxel ``spacing`` (mm,
    per axis of the label maps). Returns float64 (num_classes - 1,); NaN where the class is missing from the
    prediction or the ground truth.
    """
    p, g = _as_batch(pred), _as_batch(target)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape[2:])} and ground truth {tuple(g.shape[2:])} differ in shape")
    metric = HausdorffDistanceMetric(include_background=False, percentile=percentile, reduction="none")
    with warnings.catch_warnings():
        # MONAI warns for every empty class (we turn those into NaN on purpose) and about its own deprecations.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        out = metric(_one_hot(p, num_classes), _one_hot(g, num_classes), spacing=[float(s) for s in spacing])
    out = out[0].double().numpy()
    present = np.array([bool((p == c).any() and (g == c).any()) for c in range(1, num_classes)])
    out[~present | ~np.isfinite(out)] = np.nan
    return out


@dataclass
class LesionScore:
    """One ground-truth lesion (connected component of a lesion class) and how well the prediction covers it."""

    label: int
    """Class value of the lesion in the label map."""
    diameter_mm: float
    """Equivalent-sphere diameter (6 V / pi)^(1/3) of the component, V in mm^3."""
    voxels: int
    dice: float
    """Dice of (pred == label) vs (target == label) inside the component's bounding box grown by the margin."""
    detected: bool
    """Whether any predicted voxel of the class overlaps the component."""

    def as_dict(self) -> dict:
        return asdict(self)


def equivalent_diameter_mm(voxels: int, spacing: Sequence[float]) -> float:
    """Diameter (mm) of the sphere with the volume of ``voxels`` voxels of size ``spacing`` (mm)."""
    volume = voxels * float(np.prod(spacing))
    return (6.0 * volume / math.pi) ** (1.0 / 3.0)


def small_lesion_scores(
    pred: np.ndarray,
    target: np.ndarray,
    lesion_labels: Sequence[int],
    spacing: Sequence[float],
    max_diameter_mm: float = 10.0,
    margin_mm: float = 5.0,
) -> list[LesionScore]:
    """Dice restricted to the small lesions of ``target`` ("small-lesion Dice", the clip-vs-T3D test of
    docs/method.md §7).

    For each class in ``lesion_labels``, the ground truth is split into 26-connected components; each component
    whose equivalent diameter is below ``max_diameter_mm`` is scored by the Dice of prediction vs ground truth of
    that class inside the component's bounding box grown by ``margin_mm`` on every side. Whole-volume Dice is
    dominated by large structures; this asks whether the 4-9 mm findings were found and outlined. A missed lesion
    scores 0, a false positive far away from every small lesion does not count here (it does in the class Dice).

    Args:
        pred, target: (X, Y, Z) integer label maps on the same grid.
        lesion_labels: class values that are lesions (tumours, nodules, ...).
        spacing: voxel size in mm per axis.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in shape")
    margin = [int(math.ceil(margin_mm / float(s))) for s in spacing]
    structure = ndimage.generate_binary_structure(3, 3)
    scores = []
    for label in lesion_labels:
        components, count = ndimage.label(target == label, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            diameter = equivalent_diameter_mm(int(sizes[index]), spacing)
            if box is None or diameter >= max_diameter_mm:
                continue
            grown = tuple(
                slice(max(sl.start - m, 0), min(sl.stop + m, n)) for sl, m, n in zip(box, margin, target.shape)
            )
            p, g = pred[grown] == label, target[grown] == label
            denom = p.sum() + g.sum()
            dice = float(2.0 * np.logical_and(p, g).sum() / denom) if denom else float("nan")
            detected = bool(np.logical_and(p, components[grown] == index).any())
            scores.append(LesionScore(int(label), diameter, int(sizes[index]), dice, detected))
    return scores


def summarise_lesions(scores: Sequence[LesionScore]) -> dict:
    """Lesion-level mean Dice and detection rate over all small lesions of a test set (NaN when there are none)."""
    if not scores:
        return {"small_lesion_dice": float("nan"), "small_lesion_detection": float("nan"), "small_lesions": 0}
    return {
        "small_lesion_dice": float(np.nanmean([s.dice for s in scores])),
        "small_lesion_detection": float(np.mean([s.detected for s in scores])),
        "small_lesions": len(scores),
    }


# ----------------------------------------------------------------------------------------------- classification
#
# Multi-label classification (one 0/1 column per finding) scored per class with scikit-learn, and study-level
# bootstrap confidence intervals:
#
#     thresholds = f1_thresholds(y_val, p_val)                   # (L,) chosen on the validation split
#     report = classification_metrics(y_test, p_test, thresholds, names, n_boot=1000, seed=0)
#     report["macro"]["auroc"]    # {"value", "low", "high", "n_boot", "n_used"}
#
# Conventions: a class whose test labels are all 0 (or all 1) has no AUROC and no F1: it reports NaN with a note and
# is left out of the macro means. Bootstrap replicates resample *studies* (rows); a replicate in which a class has a
# single label value is skipped for that class's AUROC and, for the macro AUROC, whenever any scored class is
# degenerate in it; ``n_used`` says how many replicates each interval rests on.


@dataclass
class Interval:
    """A point estimate with its percentile bootstrap confidence interval."""

    value: float
    low: float
    high: float
    n_boot: int
    """Replicates drawn."""
    n_used: int
    """Replicates in which the metric was defined (the interval is taken over these)."""

    def as_dict(self) -> dict:
        return asdict(self)


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of one class (``sklearn.metrics.roc_auc_score``); NaN when only one label occurs."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, np.asarray(y_score)))


def auroc_per_class(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """(N, L) labels and scores -> (L,) AUROC, NaN for classes with a single label value."""
    y_true, y_score = _check_multilabel(y_true, y_score)
    return np.array([auroc(y_true[:, c], y_score[:, c]) for c in range(y_true.shape[1])])


def f1_thresholds(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Per class, the score threshold that maximises F1 on (validation) data: (N, L), (N, L) -> (L,).

    Candidate thresholds are the observed scores (``sklearn.metrics.precision_recall_curve``); a study is called
    positive when ``score >= threshold``. A class without positives gets the threshold 0.5.
    """
    y_true, y_score = _check_multilabel(y_true, y_score)
    out = np.full(y_true.shape[1], 0.5)
    for c in range(y_true.shape[1]):
        if y_true[:, c].sum() == 0:
            continue
        precision, recall, thresholds = precision_recall_curve(y_true[:, c], y_score[:, c])
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        out[c] = float(thresholds[int(np.argmax(f1[:-1]))])  # the last (P=1, R=0) point has no threshold
    return out


def f1_per_class(y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(L,) F1 = 2TP / (2TP + FP + FN) of ``score >= threshold`` per class; NaN for classes without positives.

    Vectorised (it runs once per bootstrap replicate); equal to ``sklearn.metrics.f1_score`` per column (tested).
    """
    y_true, y_score = _check_multilabel(y_true, y_score)
    pred, pos = y_score >= np.asarray(thresholds)[None, :], y_true > 0.5
    tp = (pred & pos).sum(axis=0)
    wrong = (pred != pos).sum(axis=0)  # FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pos.any(axis=0), 2.0 * tp / (2.0 * tp + wrong), np.nan)


def accuracy_per_class(y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(L,) fraction of studies whose call ``score >= threshold`` matches the label, per class."""
    y_true, y_score = _check_multilabel(y_true, y_score)
    return ((y_score >= np.asarray(thresholds)[None, :]) == (y_true > 0.5)).mean(axis=0)


def auroc_replicates(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """AUROC of each row of (B, N) labels and scores at once: (B,), NaN where a row has a single label value.

    The Mann-Whitney identity AUROC = (sum of positive ranks - n1 (n1 + 1) / 2) / (n1 n0), with tied scores given
    their average rank (``scipy.stats.rankdata``), which is exactly ``roc_auc_score`` (tested); used for bootstrap
    replicates, where one scikit-learn call per class and replicate would take minutes.
    """
    y = np.asarray(y_true) > 0.5
    ranks = rankdata(np.asarray(y_score, dtype=float), axis=1)
    n1 = y.sum(axis=1).astype(float)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def bootstrap_indices(n: int, n_boot: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n) row indices drawn with replacement; with ``strata`` (n,) each stratum keeps its size."""
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    out = np.empty((n_boot, n), dtype=np.int64)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        out[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return out


def rarest_label_strata(y_true: np.ndarray) -> np.ndarray:
    """Stratum of each study for multi-label stratified resampling: its rarest positive class, -1 if none.

    Resampling within these strata keeps the number of positives of rare classes close to the test set's, so far
    fewer replicates are degenerate (a 1-in-100 class disappears from 37 % of plain resamples).
    """
    y = np.asarray(y_true) > 0.5
    prevalence = np.where(y.sum(axis=0) > 0, y.sum(axis=0), np.inf)
    rank = np.where(y, prevalence[None, :], np.inf)
    return np.where(y.any(axis=1), np.argmin(rank, axis=1), -1)


def percentile_interval(value: float, replicates: np.ndarray, ci: float = 0.95) -> Interval:
    """Percentile interval of the finite ``replicates`` around the point estimate ``value``."""
    replicates = np.asarray(replicates, dtype=float)
    used = replicates[np.isfinite(replicates)]
    if not np.isfinite(value) or len(used) == 0:
        return Interval(float(value), float("nan"), float("nan"), len(replicates), len(used))
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(used, [alpha, 1.0 - alpha])
    return Interval(float(value), float(low), float(high), len(replicates), len(used))


def classification_metrics(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: np.ndarray | float,
    names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    stratified: bool = False,
) -> dict:
    """AUROC, F1 and accuracy per class and macro, each with a bootstrap ``ci`` interval over studies.

    Args:
        y_true: (N, L) 0/1 labels; y_score: (N, L) scores (probabilities, or any monotone score for AUROC).
        thresholds: (L,) or a scalar; a study is called positive when ``score >= threshold`` (for F1, accuracy).
        names: L class names.
        n_boot: bootstrap replicates (0: point estimates only, intervals NaN).
        stratified: resample within ``rarest_label_strata`` instead of plainly.

    Returns ``{"per_class": {name: {"auroc", "f1", "accuracy": Interval dicts, "threshold", "positives",
    "negatives", "note"}}, "macro": {"auroc", "f1", "accuracy"}, "scored_classes": [...], "notes": [...]}``.
    """
    y_true, y_score = _check_multilabel(y_true, y_score)
    n, num = y_true.shape
    if len(names) != num:
        raise ValueError(f"{len(names)} class names for {num} label columns")
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (num,))
    scored = (y_true.sum(axis=0) > 0) & (y_true.sum(axis=0) < n)  # both label values present

    full = np.stack(  # (3, L): auroc, f1, accuracy
        [auroc_per_class(y_true, y_score), f1_per_class(y_true, y_score, thr), accuracy_per_class(y_true, y_score, thr)]
    )
    idx = bootstrap_indices(n, n_boot, seed, rarest_label_strata(y_true) if stratified else None)  # (n_boot, N)
    reps = _replicates(y_true, y_score, thr, idx)  # (n_boot, 3, L)
    full[:2, ~scored] = reps[:, :2, ~scored] = np.nan
    metrics = ("auroc", "f1", "accuracy")
    per_class, notes = {}, []
    for c, name in enumerate(names):
        entry = {m: percentile_interval(full[i, c], reps[:, i, c], ci).as_dict() for i, m in enumerate(metrics)}
        positives = int(y_true[:, c].sum())
        entry.update(threshold=float(thr[c]), positives=positives, negatives=n - positives, note="")
        if not scored[c]:
            entry["note"] = f"{'no positives' if positives == 0 else 'no negatives'} in this set: AUROC/F1 undefined"
            notes.append(f"{name}: {entry['note']}, left out of the macro means")
        per_class[name] = entry
    macro = {}
    for i, m in enumerate(metrics):
        cols = scored if m != "accuracy" else np.ones(num, dtype=bool)
        value = float(full[i, cols].mean()) if cols.any() else float("nan")
        # A replicate counts only if every scored class is defined in it (NaN propagates through the mean).
        macro[m] = percentile_interval(value, reps[:, i, cols].mean(axis=1) if cols.any() else reps[:, i, 0], ci)
        macro[m] = macro[m].as_dict()
    return {
        "per_class": per_class,
        "macro": macro,
        "scored_classes": [nm for nm, s in zip(names, scored) if s],
        "n_studies": n,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": ci, "resampling": "stratified" if stratified else "plain"},
        "notes": notes,
    }


def _replicates(y_true: np.ndarray, y_score: np.ndarray, thr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(n_boot, 3, L) AUROC, F1, accuracy of every resample ``idx`` (n_boot, N), vectorised over resamples."""
    reps = np.full((len(idx), 3, y_true.shape[1]), np.nan)
    if len(idx) == 0:
        return reps
    for c in range(y_true.shape[1]):
        yb, sb = y_true[idx, c] > 0.5, y_score[idx, c]  # (n_boot, N) resampled labels and scores of class c
        reps[:, 0, c] = auroc_replicates(yb, sb)
        pred = sb >= thr[c]
        tp, wrong = (pred & yb).sum(axis=1), (pred != yb).sum(axis=1)  # wrong = FP + FN
        with np.errstate(invalid="ignore", divide="ignore"):
            reps[:, 1, c] = np.where(yb.any(axis=1), 2.0 * tp / (2.0 * tp + wrong), np.nan)
        reps[:, 2, c] = 1.0 - wrong / idx.shape[1]
    return reps


def _check_multilabel(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_score = np.asarray(y_true, dtype=float), np.asarray(y_score, dtype=float)
    if y_true.ndim == 1:
        y_true, y_score = y_true[:, None], y_score.reshape(-1, 1)
    if y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(f"labels {y_true.shape} and scores {y_score.shape} must both be (N, L)")
    return y_true, y_score
