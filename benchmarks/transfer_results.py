"""Results of the transfer benchmark: stage results -> cells with intervals -> comparisons (``transfer_report.py``
renders them as markdown, ``transfer_figures.py`` as figures).

    table = Results(stage_results, lesion_labels=[9, 10, 11, 12, 13])
    summary = summarise(table, methods, fractions, vssl_methods, metrics, n_boot=2000)

``stage_results`` is a list of the ``result.json`` dicts of the stages (``kind``, ``method``, ``seed`` and, for
downstream runs, ``fraction``). Per-case segmentation scores are case means over classes of a group (organs, lesions),
so a case weighs the same whatever it contains; small-lesion Dice is the lesion-level mean (cases weighted by their
number of small lesions), as ``t3d finetune seg`` reports it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from t3d.finetune.segdata import lesion_classes
from transfer_stats import auroc_cell, dice_cell, paired_auroc, paired_dice, verdict

SEG_METRICS = {"organ_dice": "organ Dice", "lesion_dice": "lesion Dice", "small_lesion_dice": "small-lesion Dice"}
AUROC_METRICS = {"probe_auroc": "finding AUROC (probe)", "finetune_auroc": "finding AUROC (fine-tune)"}
ZS_METRIC = {"zeroshot_auroc": "zero-shot AUROC"}


class Results:
    """Stage results indexed by (kind, method, seed, fraction, repeat); ``repeat``: the fine-tuning run of a
    segmentation stage (0 when the result has none; ``seg_repeats`` in the benchmark config)."""

    def __init__(self, results: Sequence[dict], lesion_labels: Sequence[int] | None = None):
        self.by_key = {(r["kind"], r["method"], r["seed"], r.get("fraction"), r.get("repeat", 0)): r for r in results}
        self.lesion_labels = None if lesion_labels is None else [int(v) for v in lesion_labels]

    def revisions(self) -> dict[str, int]:
        """Git revision -> number of stage results computed at it (a report renders cached stages of earlier runs)."""
        return dict(Counter(r.get("revision", "not recorded") for r in self.by_key.values()))

    def seeds(self, kind: str, method: str, fraction: float | None = None) -> list[int]:
        return sorted({s for (k, m, s, f, _) in self.by_key if k == kind and m == method and f == fraction})

    def get(self, kind: str, method: str, seed: int, fraction: float | None = None, repeat: int = 0) -> dict | None:
        return self.by_key.get((kind, method, seed, fraction, repeat))

    def repeats(self, kind: str, methods: Sequence[str], seeds: Sequence[int], fraction: float | None) -> list[int]:
        """The fine-tuning runs every one of ``methods`` has for every one of ``seeds`` (a rectangular design)."""
        have = [
            {r for (k, m, s, f, r) in self.by_key if (k, m, s, f) == (kind, method, seed, fraction)}
            for method in methods
            for seed in seeds
        ]
        return sorted(set.intersection(*have)) if have else []

    def seg_matrix(
        self,
        metric: str,
        method: str,
        fraction: float,
        seeds: Sequence[int] | None = None,
        kind: str = "seg",
        repeats: Sequence[int] | None = None,
    ):
        """(values (S * R, N), weights | None, case ids, R) of a segmentation metric of stages of ``kind`` (``seg``,
        ``frozen_seg``): a row per (seed, fine-tuning run), seed-major, for the ``repeats`` runs (default: those every
        seed has); None without results."""
        seeds = list(seeds) if seeds is not None else self.seeds(kind, method, fraction)
        repeats = list(repeats) if repeats is not None else self.repeats(kind, [method], seeds, fraction)
        runs = [self.get(kind, method, s, fraction, r) for s in seeds for r in repeats]
        if not runs or any(r is None for r in runs):
            return None
        ids = sorted(set.intersection(*[{c["id"] for c in r["cases"]} for r in runs]))
        pairs = [[seg_case_value(r, _cases(r)[i], metric, self.lesion_labels) for i in ids] for r in runs]
        vals, wts = np.array(pairs, dtype=float)[..., 0], np.array(pairs, dtype=float)[..., 1]  # (S * R, N) each
        return vals, (wts if metric == "small_lesion_dice" else None), ids, len(repeats)

    def score_tensor(self, kind: str, method: str, fraction: float | None, seeds: Sequence[int] | None = None):
        """(labels (N, L), scores (S, N, L), ids) of a classification-type stage; None without results."""
        seeds = list(seeds) if seeds is not None else self.seeds(kind, method, fraction)
        runs = [self.get(kind, method, s, fraction) for s in seeds]
        if not runs or any(r is None for r in runs):
            return None
        ids = sorted(set.intersection(*[set(r["ids"]) for r in runs]))
        first = {i: n for n, i in enumerate(runs[0]["ids"])}
        y = np.asarray(runs[0]["y"], dtype=float)[[first[i] for i in ids]]
        scores = []
        for r in runs:
            pos = {i: n for n, i in enumerate(r["ids"])}
            scores.append(np.asarray(r["p"], dtype=float)[[pos[i] for i in ids]])
        return y, np.stack(scores), ids


def _cases(run: dict) -> dict:
    return {c["id"]: c for c in run["cases"]}


def seg_groups(labels: dict, lesion_labels: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """(organ classes, lesion classes) of a label map; lesions by name (``segdata.lesion_classes``) unless given."""
    classes = {int(k): v for k, v in labels.items()}
    lesions = list(lesion_labels) if lesion_labels is not None else lesion_classes(classes)
    organs = [c for c in sorted(classes) if c > 0 and c not in lesions]
    return organs, [c for c in lesions if c in classes]


def seg_case_value(run: dict, case: dict, metric: str, lesion_labels: Sequence[int] | None) -> tuple[float, float]:
    """(value, weight) of one test case: mean Dice over the organ / lesion classes present, or small-lesion Dice."""
    if metric == "small_lesion_dice":
        count = int(case.get("small_lesions") or 0)
        value = case.get("small_lesion_dice")
        return (float("nan"), 0.0) if not count or value is None else (float(value), float(count))
    organs, lesions = seg_groups(run["labels"], lesion_labels)
    dice = [float("nan") if d is None else float(d) for d in case["dice"]]  # classes 1..K-1
    group = organs if metric == "organ_dice" else lesions
    vals = [dice[c - 1] for c in group if c - 1 < len(dice) and math.isfinite(dice[c - 1])]
    return (float(np.mean(vals)), 1.0) if vals else (float("nan"), 0.0)


# ----------------------------------------------------------------------------------------------- cells


def cell(results: Results, metric: str, method: str, fraction: float | None, n_boot: int, seed: int = 0):
    """Interval dict of one (metric, method, fraction) cell, or None without results."""
    if metric in SEG_METRICS:
        got = results.seg_matrix(metric, method, fraction)
        return None if got is None else dice_cell(got[0], got[1], n_boot, seed, repeats=got[3])
    kind = {"probe_auroc": "probe", "finetune_auroc": "finetune", "zeroshot_auroc": "zeroshot"}[metric]
    got = results.score_tensor(kind, method, fraction if kind != "zeroshot" else None)
    return None if got is None else auroc_cell(got[0], got[1], n_boot, seed)


def compare(results: Results, metric: str, a: str, b: str, fraction: float, n_boot: int, seed: int = 0):
    """Paired comparison of methods ``a`` - ``b`` on the seeds both have; None when not possible."""
    if metric in SEG_METRICS:
        seeds = sorted(set(results.seeds("seg", a, fraction)) & set(results.seeds("seg", b, fraction)))
        reps = results.repeats("seg", [a, b], seeds, fraction)
        ga, gb = (results.seg_matrix(metric, m, fraction, seeds, repeats=reps) for m in (a, b)) if reps else (None,) * 2
        if ga is None or gb is None or ga[2] != gb[2]:
            return None
        return {**paired_dice(ga[0], gb[0], ga[1], n_boot, seed, repeats=len(reps)), "seeds": seeds, "repeats": reps}
    kind = {"probe_auroc": "probe", "finetune_auroc": "finetune"}[metric]
    seeds = sorted(set(results.seeds(kind, a, fraction)) & set(results.seeds(kind, b, fraction)))
    ga, gb = (results.score_tensor(kind, m, fraction, seeds) for m in (a, b)) if seeds else (None, None)
    if ga is None or gb is None or ga[2] != gb[2]:
        return None
    return {**paired_auroc(ga[0], ga[1], gb[1], n_boot, seed), "seeds": seeds}


def summarise(
    results: Results,
    methods: Sequence[str],
    fractions: Sequence[float],
    vssl_methods: Sequence[str],
    metrics: Sequence[str],
    n_boot: int = 2000,
) -> dict:
    """Every cell, the paired comparisons of docs/method.md §7 and the verdicts, as one JSON-ready dict."""
    cells: dict = {}
    for f in fractions:
        for m in methods:
            for metric in metrics:
                c = cell(results, metric, m, f if metric != "zeroshot_auroc" else None, n_boot)
                if c is not None:
                    cells.setdefault(str(f), {}).setdefault(m, {})[metric] = c
    comparisons = []
    for f in fractions:
        for metric in [m for m in metrics if m != "zeroshot_auroc"]:
            best = best_baseline(cells.get(str(f), {}), vssl_methods, metric)
            if best is not None and "t3d" in methods:
                comparisons.append(_comparison(results, metric, "t3d", best, f, n_boot, "best vSSL"))
        if "clip" in methods and "t3d" in methods and "small_lesion_dice" in metrics:
            comparisons.append(_comparison(results, "small_lesion_dice", "t3d", "clip", f, n_boot, "clip"))
    return {"cells": cells, "comparisons": [c for c in comparisons if c is not None]}


def best_baseline(cells: dict, candidates: Sequence[str], metric: str) -> str | None:
    """The candidate method with the highest cell mean for ``metric`` (None if none has one)."""
    scored = [(cells[m][metric]["mean"], m) for m in candidates if metric in cells.get(m, {})]
    scored = [(v, m) for v, m in scored if v is not None and math.isfinite(v)]
    return max(scored)[1] if scored else None


def _comparison(results, metric, a, b, fraction, n_boot, role) -> dict | None:
    delta = compare(results, metric, a, b, fraction, n_boot)
    if delta is None:
        return None
    return {"metric": metric, "fraction": fraction, "a": a, "b": b, "role": role, **delta, "verdict": verdict(delta)}
