"""Figures of the transfer benchmark: metric bars with 95 % intervals, and the alignment curves against log B."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from transfer_report import metric_names  # noqa: E402


def plot_cells(cells: dict, methods: Sequence[str], metrics: Sequence[str], out_png, title: str = "") -> None:
    """One panel per metric: a bar per method and label fraction, 95 % CI as error bars."""
    names = metric_names(metrics)
    fractions = list(cells)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    width = 0.8 / max(1, len(fractions))
    for ax, (metric, label) in zip(axes[0], names.items()):
        for j, f in enumerate(fractions):
            xs, ys, err = [], [], [[], []]
            for i, m in enumerate(methods):
                c = cells[f].get(m, {}).get(metric)
                if not c or c["mean"] is None or not math.isfinite(c["mean"]):
                    continue
                lo = c["low"] if math.isfinite(c.get("low", math.nan)) else c["mean"]
                hi = c["high"] if math.isfinite(c.get("high", math.nan)) else c["mean"]
                xs.append(i + (j - (len(fractions) - 1) / 2) * width)
                ys.append(c["mean"])
                err[0].append(c["mean"] - lo)
                err[1].append(hi - c["mean"])
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=f"fraction {f}" if metric != "zeroshot_auroc" else None)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if "auroc" in metric:
            ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_align(pretrain: Sequence[dict], out_png) -> None:
    """Alignment loss per step of every pre-training run that has one, against log B (chance)."""
    runs = [r for r in pretrain if any(p.get("align") is not None for p in r.get("curve", []))]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in runs}))}
    for r in sorted(runs, key=lambda r: (r["method"], r["seed"])):
        pts = [(p["step"], p["align"]) for p in r["curve"] if p.get("align") is not None]
        label = r["method"] if r["seed"] == min(x["seed"] for x in runs if x["method"] == r["method"]) else None
        ax.plot(*zip(*pts), color=colours[r["method"]], lw=1.2, alpha=0.8, label=label)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for log_b in sorted({r["log_b"] for r in runs}):
            ax.axhline(log_b, color="grey", ls="--", lw=0.9, label=f"log B = {log_b:.2f} (chance)")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("L_align")
    ax.set_title("Alignment loss during pre-training (precondition: clearly below log B)", fontsize=9)
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
