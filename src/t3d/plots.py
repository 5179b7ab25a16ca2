"""Figures written at the end of runs (users would rather look than read). Matplotlib, headless."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_TERMS = ("loss", "view", "align", "restore", "tcl")


def plot_loss_curves(log_path: str | Path, out_png: str | Path, log_b: float | None = None) -> Path:
    """One panel per loss term found in a run's ``log.jsonl``; ``log_b`` draws the chance level of contrastive terms."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    terms = [t for t in LOSS_TERMS if any(t in r for r in rows)]
    if not terms:
        raise ValueError(f"{log_path} holds no loss terms to plot")
    cols = min(3, len(terms))
    rows_n = math.ceil(len(terms) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n))
    axes = list(getattr(axes, "flat", [axes]))
    for ax, term in zip(axes, terms):
        points = [(r["step"], r[term]) for r in rows if term in r]
        ax.plot(*zip(*points), lw=1.2)
        if log_b is not None and term in ("view", "align"):
            ax.axhline(log_b, color="grey", ls="--", lw=0.8, label="log B (chance)")
            ax.legend(fontsize=7)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(terms) :]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
