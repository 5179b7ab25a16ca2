"""The sensitivity gate: may a downstream metric be used to compare encoders at this budget? (docs/method.md §7)

A benchmark that cannot tell a trained encoder from an untrained one cannot confirm or refute a method. For every
downstream metric the benchmark measures ``supervised - random`` (the upper control minus the lower one) with a
confidence interval; the metric is *sensitive* when that difference is at least ``threshold`` (0.15 for AUROC
metrics, 0.10 for Dice metrics) and its interval excludes 0. Metrics that fail are reported as "not sensitive at
this budget" and are not used for claims. ``vssl - random`` rides along as the reference of what self-supervision
alone buys.

    entry = gate_entry("organ_dice", {"value": .31, "low": .22, "high": .40}, {"value": .05, "low": -.02, ...})
    # {"supervised_minus_random": .31, "ci_low": .22, "ci_high": .40, "vssl_minus_random": .05, ...,
    #  "sensitive": True, "threshold": 0.1}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

THRESHOLDS = {"auroc": 0.15, "dice": 0.10}
"""Smallest ``supervised - random`` difference that makes a metric sensitive, by metric kind."""
NOT_SENSITIVE = "not sensitive at this budget"


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


def gate_entry(name: str, supervised: Mapping | None, vssl: Mapping | None = None) -> dict:
    """One metric's gate record from difference intervals ``{"value", "low", "high"}`` (None: not measured).

    Keys (what the report's gate table and JSON read): ``supervised_minus_random``, ``ci_low``, ``ci_high``,
    ``vssl_minus_random``, ``vssl_ci_low``, ``vssl_ci_high``, ``sensitive`` and ``threshold``.
    """
    threshold = THRESHOLDS[metric_kind(name)]
    nan = float("nan")
    sup = supervised or {}
    ref = vssl or {}
    d, lo, hi = (float(sup.get(k, nan)) for k in ("value", "low", "high"))
    return {
        "supervised_minus_random": d,
        "ci_low": lo,
        "ci_high": hi,
        "vssl_minus_random": float(ref.get("value", nan)),
        "vssl_ci_low": float(ref.get("low", nan)),
        "vssl_ci_high": float(ref.get("high", nan)),
        "sensitive": is_sensitive(d, lo, hi, threshold),
        "threshold": threshold,
    }


def _fmt(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return "—"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:+.3f}"
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def gate_table(gate: Mapping[str, Mapping]) -> list[str]:
    """Markdown table of the gate, one row per metric; insensitive rows greyed and marked ``NOT_SENSITIVE``."""
    lines = [
        "| metric | supervised − random (95 % CI) | vssl − random (95 % CI) | threshold | gate |",
        "|---|---|---|---|---|",
    ]
    for name, e in gate.items():
        sup = _fmt(e["supervised_minus_random"], e["ci_low"], e["ci_high"])
        ref = _fmt(e["vssl_minus_random"], e["vssl_ci_low"], e.get("vssl_ci_high", float("nan")))
        cells = [f"`{name}`", sup, ref, f"{e['threshold']:.2f}"]
        if e["sensitive"]:
            lines.append("| " + " | ".join([*cells, "sensitive"]) + " |")
        else:
            grey = [f'<span style="color:grey">{c}</span>' for c in cells]
            lines.append("| " + " | ".join([*grey, f'<span style="color:grey">{NOT_SENSITIVE}</span>']) + " |")
    return lines


def sensitive_metrics(gate: Mapping[str, Mapping]) -> list[str]:
    """Names of the metrics that passed the gate (the only ones a method comparison may cite)."""
    return [name for name, e in gate.items() if e["sensitive"]]
