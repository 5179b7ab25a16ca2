"""The sensitivity gate: may a downstream metric be used to compare encoders at this budget? (docs/method.md §7)

A benchmark that cannot tell a trained encoder from an untrained one cannot confirm or refute a method. For every
downstream metric the benchmark measures an upper control minus the lower one (``random``) with a confidence
interval: ``supervised - random`` (the encoder trained on ground-truth findings) and, where it runs,
``supervised-seg - random`` (the encoder trained to segment the pre-training studies: organs and lesions). The metric
is *sensitive* when one of them is at least ``threshold`` (0.15 for AUROC metrics, 0.10 for Dice metrics) with an
interval that excludes 0: the metric then sees the difference between an encoder known to hold the content and one
that does not. Metrics that fail are reported as "not sensitive at this budget" and are not used for claims.
``vssl - random`` rides along as the reference of what self-supervision alone buys.

    entry = gate_entry("organ_dice", {"value": .31, "low": .22, "high": .40}, {"value": .05, "low": -.02, ...})
    # {"supervised_minus_random": .31, "ci_low": .22, "ci_high": .40, "vssl_minus_random": .05, ...,
    #  "supervised_seg_minus_random": nan, ..., "sensitive": True, "sensitive_by": ["supervised"], "threshold": 0.1}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

THRESHOLDS = {"auroc": 0.15, "dice": 0.10}
"""Smallest control-minus-random difference that makes a metric sensitive, by metric kind."""
NOT_SENSITIVE = "not sensitive at this budget"
NOT_MEASURED = "not measured"
"""A metric no control was scored on (its stage is not in the configuration, or no test case holds its class)."""


def metric_kind(name: str) -> str:
    """``auroc`` or ``dice`` from a metric name such as ``study_probe_auroc`` or ``frozen_seg_organ_dice``."""
    for kind in THRESHOLDS:
        if kind in name:
            return kind
    raise ValueError(f"gate: metric {name!r} is neither an AUROC nor a Dice metric (its name must contain one)")


def is_sensitive(delta: float, low: float, high: float, threshold: float) -> bool:
    """``delta >= threshold`` and the interval [low, high] excludes 0 (NaN anywhere: not sensitive)."""
    values = (delta, low, high)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return False
    return delta >= threshold and (low > 0 or high < 0)


def gate_entry(
    name: str, supervised: Mapping | None, vssl: Mapping | None = None, seg_control: Mapping | None = None
) -> dict:
    """One metric's gate record from difference intervals ``{"value", "low", "high"}`` (None: not measured).

    Keys (what the report's gate table and JSON read): ``supervised_minus_random``, ``ci_low``, ``ci_high``,
    ``vssl_minus_random``, ``vssl_ci_low``, ``vssl_ci_high``, ``supervised_seg_minus_random``,
    ``supervised_seg_ci_low``, ``supervised_seg_ci_high``, ``sensitive``, ``sensitive_by`` (the controls that pass)
    and ``threshold``.
    """
    threshold = THRESHOLDS[metric_kind(name)]
    sup, ref, seg = (_interval(v) for v in (supervised, vssl, seg_control))
    passing = [
        c for c, (d, lo, hi) in (("supervised", sup), ("supervised-seg", seg)) if is_sensitive(d, lo, hi, threshold)
    ]
    return {
        "supervised_minus_random": sup[0],
        "ci_low": sup[1],
        "ci_high": sup[2],
        "vssl_minus_random": ref[0],
        "vssl_ci_low": ref[1],
        "vssl_ci_high": ref[2],
        "supervised_seg_minus_random": seg[0],
        "supervised_seg_ci_low": seg[1],
        "supervised_seg_ci_high": seg[2],
        "sensitive": bool(passing),
        "sensitive_by": passing,
        "threshold": threshold,
    }


def _interval(diff: Mapping | None) -> tuple[float, float, float]:
    diff = diff or {}
    return tuple(float(diff.get(k, float("nan"))) for k in ("value", "low", "high"))


def _fmt(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return "—"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:+.3f}"
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def gate_table(gate: Mapping[str, Mapping]) -> list[str]:
    """Markdown table of the gate, one row per metric; insensitive rows greyed and marked ``NOT_SENSITIVE``."""
    lines = [
        "| metric | supervised − random (95 % CI) | supervised-seg − random (95 % CI) | vssl − random (95 % CI) "
        "| threshold | gate |",
        "|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for name, e in gate.items():
        sup = _fmt(e["supervised_minus_random"], e["ci_low"], e["ci_high"])
        seg = _fmt(*(e.get(f"supervised_seg_{k}", nan) for k in ("minus_random", "ci_low", "ci_high")))
        ref = _fmt(e["vssl_minus_random"], e["vssl_ci_low"], e.get("vssl_ci_high", nan))
        cells = [f"`{name}`", sup, seg, ref, f"{e['threshold']:.2f}"]
        if e["sensitive"]:
            by = ", ".join(e.get("sensitive_by") or ["supervised"])
            lines.append("| " + " | ".join([*cells, f"sensitive ({by})"]) + " |")
        else:
            status = NOT_SENSITIVE if any(c != "—" for c in (sup, seg, ref)) else NOT_MEASURED
            grey = [f'<span style="color:grey">{c}</span>' for c in [*cells, status]]
            lines.append("| " + " | ".join(grey) + " |")
    return lines


def sensitive_metrics(gate: Mapping[str, Mapping]) -> list[str]:
    """Names of the metrics that passed the gate (the only ones a method comparison may cite)."""
    return [name for name, e in gate.items() if e["sensitive"]]
