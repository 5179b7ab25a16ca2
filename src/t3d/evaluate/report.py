"""What every evaluation and fine-tuning run leaves behind: ``metrics.json``, a ``report.md`` table and figures.

write_metrics(out, metrics)                           # metrics.json (NaN written as null)
(out / "report.md").write_text(classification_markdown("Linear probe", metrics["test"]))
plot_roc(y_true, y_score, names, out / "roc.png", "zero-shot ROC")
plot_training_curves(history, out / "curves.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve

from t3d.data.cache import write_json_atomic  # noqa: E402


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars/arrays -> Python values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(out_dir: str | Path, metrics: dict) -> Path:
    """``out_dir/metrics.json`` (atomic); non-finite numbers become ``null``."""
    path = Path(out_dir) / "metrics.json"
    write_json_atomic(path, _json_safe(metrics))
    return path


def fmt_interval(entry: dict | None, digits: int = 3) -> str:
    """``0.812 [0.761, 0.858]`` from an ``Interval`` dict; ``n/a`` when undefined."""
    if not entry or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "n/a"
    value = f"{entry['value']:.{digits}f}"
    low, high = entry.get("low"), entry.get("high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return value
    return f"{value} [{low:.{digits}f}, {high:.{digits}f}]"


def classification_markdown(title: str, result: dict, preamble: Sequence[str] = ()) -> str:
    """A report.md section: macro line, then one row per class (AUROC, F1, accuracy with CIs, positives)."""
    boot = result.get("bootstrap", {})
    ci = int(round(100 * boot.get("ci", 0.95)))
    lines = [f"# {title}", "", *preamble]
    lines += [
        "",
        f"{result.get('n_studies', '?')} test studies; {ci} % bootstrap intervals over studies "
        f"({boot.get('n_boot', 0)} {boot.get('resampling', 'plain')} resamples, seed {boot.get('seed', 0)}).",
        "",
        "| class | AUROC | F1 | accuracy | threshold | positives |",
        "|---|---|---|---|---|---|",
    ]
    macro = result["macro"]
    used = macro["auroc"].get("n_used", 0)
    lines.append(
        f"| **macro** ({len(result.get('scored_classes', []))} classes) | {fmt_interval(macro['auroc'])} | "
        f"{fmt_interval(macro['f1'])} | {fmt_interval(macro['accuracy'])} | | |"
    )
    for name, entry in result["per_class"].items():
        lines.append(
            f"| {name} | {fmt_interval(entry['auroc'])} | {fmt_interval(entry['f1'])} | "
            f"{fmt_interval(entry['accuracy'])} | {entry['threshold']:.3f} | {entry['positives']} |"
        )
    lines += [
        "",
        f"Macro AUROC interval from {used} of {boot.get('n_boot', 0)} resamples (the others lacked a label value of "
        "some class).",
    ]
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def plot_roc(
    y_true: np.ndarray, y_score: np.ndarray, names: Sequence[str], out_png: str | Path, title: str = "ROC"
) -> Path:
    """One ROC curve per class with a defined AUROC (``sklearn.metrics.roc_curve``), chance diagonal, AUROC in
    the legend."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    cmap = plt.get_cmap("tab20")
    for c, name in enumerate(names):
        if len(np.unique(y_true[:, c])) < 2:
            continue
        fpr, tpr, _ = roc_curve(y_true[:, c], y_score[:, c])
        auc = roc_auc_score(y_true[:, c], y_score[:, c])
        ax.plot(fpr, tpr, lw=1.2, color=cmap(c % 20), label=f"{name} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(fontsize=6, loc="lower right", ncol=1 if len(names) <= 10 else 2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_training_curves(history: dict[str, list], out_png: str | Path, title: str = "") -> Path:
    """Training loss per step and validation loss / macro AUROC at each evaluation.

    ``history``: ``{"train": [(step, loss), ...], "val": [{"step", "loss", "auroc"}, ...]}``.
    """
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    if history.get("train"):
        steps, losses = zip(*history["train"])
        ax_loss.plot(steps, losses, lw=0.8, alpha=0.6, label="train BCE")
    val = history.get("val", [])
    if val:
        ax_loss.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", ms=3, label="validation BCE")
        ax_auc.plot([v["step"] for v in val], [v["auroc"] for v in val], "o-", ms=3, color="C2")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    ax_auc.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax_auc.set_xlabel("step")
    ax_auc.set_title("validation macro AUROC")
    ax_auc.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
