"""The transfer report's machine-readable verdicts: alignment gates per run and the claims of docs/method.md §7.

    gates = alignment_gates(stage_results)                 # {method: {seed: {align_share, retrieval_r5, ...}}}
    found = claims(stage_results, thresholds, fractions, vssl_methods, gate, n_boot)   # [{"a", "b", "metric", ...}]
    lines = alignment_table(gates) + claims_table(found)

The alignment stage of every joint-space run (``benchmarks/alignment_gates.py``'s ``measure`` on the held-out
studies) gives the gates a text-informed term must pass before any downstream number is read: ``L_align`` covers
>= 30 % of the way from log B to its floor, held-out image -> report R@5 above chance with its interval excluding
chance, held-out study embeddings not collapsed (mean pairwise cosine < 0.9), and (restoration methods) restoring
hidden lesion voxels worse with a shuffled report than with the true one, interval excluding 0.

The claims are the paired comparisons the method stands on: ``t3d`` against the best visual self-supervised
baseline on the study-level finding probe, the small-lesion stratum of the lesion probe, lesion Dice and
small-lesion Dice, and ``t3d`` against ``clip`` on the small-lesion metrics. Both baselines are also compared on the
``SUPPORTING_METRICS`` (``"claim": false``): the metrics a small budget's gate can pass when the claim's own cannot.
A comparison on a metric that failed the sensitivity gate is kept in the list (``sensitive: false``) but is not
evidence either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from t3d.evaluate.gate import NOT_SENSITIVE
from transfer_probes import expand_probe_results, gate_metrics, paired
from transfer_results import Results

GATE_KEYS = (
    "align_share",
    "retrieval_r5",
    "retrieval_r5_ci_low",
    "retrieval_chance",
    "heldout_study_cos",
    "text_diag_diff",
    "text_diag_ci_low",
)
"""Per-run fields of ``alignment_gates`` (a restoration-free method has no text diagnostic: None)."""
WHY_KEYS = (
    "text_diag_diff_focal_whole",
    "text_diag_ci_low_focal_whole",
    "same_findings_excess",
    "same_findings_excess_ci_low",
)
"""Diagnostic fields copied where the alignment stage measured them (``benchmarks/alignment_gates.py``)."""


def alignment_gates(results: Sequence[dict]) -> dict:
    """``{method: {seed: {gate field: value, "passes": {gate: bool | None}}}}`` from the alignment stages."""
    out: dict = {}
    for r in results:
        if r.get("kind") != "alignment":
            continue
        row = {k: r.get(k) for k in GATE_KEYS}
        row["passes"] = r["passes"]
        for k in ("same_findings_r5", "same_findings_r5_chance", "n_heldout", *WHY_KEYS):
            if k in r:
                row[k] = r[k]
        if "text_diag_why" in r:
            row["text_diag_output_change"] = r["text_diag_why"]["output_change_all_voxels"]
        out.setdefault(r["method"], {})[str(r["seed"])] = row
    return out


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**pass**" if ok else "fail")


def alignment_table(gates: dict) -> list[str]:
    """One row per joint-space run: each gate's value and verdict."""
    if not gates:
        return []
    lines = [
        "| method | seed | L_align share (>= 0.30) | R@5 i->r [CI low] vs chance | held-out study cos (< 0.9) | "
        "text diag: shuffled - true on lesion voxels [CI low] | same-findings R@5 vs chance | "
        "report moves restoration (per hidden voxel) | text diag, focal lesions hidden entirely [CI low] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in sorted(gates):
        for seed, g in sorted(gates[method].items()):
            p = g["passes"]
            diag = (
                "n/a"
                if g["text_diag_diff"] is None
                else f"{g['text_diag_diff']:+.4f} [{g['text_diag_ci_low']:+.4f}] {_mark(p['text_diagnostic'])}"
            )
            same = (
                f"{g['same_findings_r5']:.3f} vs {g['same_findings_r5_chance']:.3f}" if "same_findings_r5" in g else "—"
            )
            moved = f"{g['text_diag_output_change']:.4f}" if "text_diag_output_change" in g else "—"
            whole = (
                f"{g['text_diag_diff_focal_whole']:+.4f} [{g['text_diag_ci_low_focal_whole']:+.4f}]"
                if "text_diag_diff_focal_whole" in g
                else "—"
            )
            lines.append(
                f"| {method} | {seed} | {g['align_share']:.2f} {_mark(p['align_share'])} | "
                f"{g['retrieval_r5']:.3f} [{g['retrieval_r5_ci_low']:.3f}] vs {g['retrieval_chance']:.3f} "
                f"{_mark(p['retrieval_above_chance'])} | {g['heldout_study_cos']:.3f} {_mark(p['heldout_study_cos'])} "
                f"| {diag} | {same} | {moved} | {whole} |"
            )
    return lines


CLAIM_METRICS = {
    "vssl": ("study_probe_auroc", "lesion_probe_auroc_small", "lesion_dice", "small_lesion_dice"),
    "clip": ("lesion_probe_auroc_small", "small_lesion_dice"),
}
"""The comparisons of docs/method.md §7: t3d vs the best vSSL method, and t3d vs clip on small lesions."""
SUPPORTING_METRICS = ("study_probe_auroc_focal", "study_probe_auroc_diffuse", "lesion_probe_auroc_large", "organ_dice")
"""Compared against both baselines too (not claims): large lesions, organs and findings split by kind."""


def _measured(d: dict | None) -> bool:
    return d is not None and all(math.isfinite(d[k]) for k in ("value", "low", "high"))


def best_vssl(table: Results, kind: str, metric: str, fraction, candidates: Sequence[str], n_boot: int) -> str | None:
    """The vSSL candidate with the largest paired gain over ``random`` on this metric (its best showing)."""
    gains = []
    for m in candidates:
        d = paired(table, kind, metric, fraction, m, "random", n_boot)
        if _measured(d):
            gains.append((d["value"], m))
    return max(gains)[1] if gains else None


def claims(
    results: Sequence[dict],
    thresholds: Sequence[float],
    fractions: Sequence[float],
    vssl_methods: Sequence[str],
    gate: dict,
    n_boot: int,
    lesion_labels=None,
    focal: Sequence[str] = (),
    a: str = "t3d",
) -> list[dict]:
    """``[{"a", "b", "role", "metric", "diff", "ci_low", "ci_high", "seeds", "sensitive", "claim"}]`` for every
    comparison of ``CLAIM_METRICS`` (``claim``: true) and ``SUPPORTING_METRICS`` that both methods have results for
    (metric names as in the gate; ``b``: a method's name; the focal / diffuse study probe where ``focal`` names any)."""
    table = Results([*results, *expand_probe_results(list(results), list(thresholds), focal)], lesion_labels)
    metrics = gate_metrics(list(thresholds), list(fractions), focal)
    out = []
    for role, names in CLAIM_METRICS.items():
        for name in (*names, *SUPPORTING_METRICS):
            if name not in metrics:
                continue  # a size stratum this configuration does not have
            kind, metric, fraction = metrics[name]
            b = best_vssl(table, kind, metric, fraction, vssl_methods, n_boot) if role == "vssl" else role
            d = None if b is None else paired(table, kind, metric, fraction, a, b, n_boot)
            if not _measured(d):
                continue  # e.g. small-lesion Dice of a test set without small lesions
            out.append(
                {
                    "a": a,
                    "b": b,
                    "role": "best vSSL" if role == "vssl" else "clip",
                    "metric": name,
                    "diff": d["value"],
                    "ci_low": d["low"],
                    "ci_high": d["high"],
                    "seeds": d["seeds"],
                    "sensitive": bool(gate.get(name, {}).get("sensitive", False)),
                    "claim": name in names,
                }
            )
    return out


def claims_table(found: Sequence[dict]) -> list[str]:
    """One row per comparison; a comparison on a metric the gate did not pass is marked and carries no verdict."""
    if not found:
        return ["- no comparison possible yet (t3d and a baseline need finished runs on the same seeds)"]
    lines = ["| a | b | metric | a − b [95 % CI] | reading |", "|---|---|---|---|---|"]
    for c in sorted(found, key=lambda c: not c.get("claim", True)):  # the claims first, then the supporting ones
        if not c["sensitive"]:
            reading = f"{NOT_SENSITIVE}: no claim"
        elif c["ci_low"] > 0:
            reading = f"{c['a']} better"
        elif c["ci_high"] < 0:
            reading = f"{c['b']} better"
        else:
            reading = "no difference resolved"
        metric = f"`{c['metric']}`" + ("" if c.get("claim", True) else " (supporting)")
        lines.append(
            f"| {c['a']} | {c['b']} ({c['role']}) | {metric} | {c['diff']:+.3f} "
            f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {reading} |"
        )
    return lines
