"""What a segmentation run leaves for people: ``report.md``, ``curves.png`` and ``test_overlay.png``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402


def plot_curves(train: Sequence[dict], val: Sequence[dict], out_png: str | Path) -> Path:
    """Training loss per step (raw + running mean) and validation Dice (mean and per class) per validation."""
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        width = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        ax_loss.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
        ax_loss.plot(steps[width - 1 :], smooth, lw=1.4, label=f"running mean ({width})")
        ax_loss.legend(fontsize=7)
    ax_loss.set(title="training loss (Dice + CE)", xlabel="step")
    if val:
        steps = [r["step"] for r in val]
        ax_dice.plot(steps, [_nan(r["dice_mean"]) for r in val], "o-", color="black", lw=1.6, label="mean")
        for name in val[0].get("dice_per_class", {}):
            ax_dice.plot(steps, [_nan(r["dice_per_class"][name]) for r in val], lw=0.9, alpha=0.7, label=name)
        ax_dice.legend(fontsize=7)
    ax_dice.set(title="validation Dice", xlabel="step", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def class_colours(n: int) -> np.ndarray:
    """``n`` distinct RGBA colours (tab10, tab20, then evenly spaced hues) for foreground classes 1..n."""
    if n <= 10:
        return plt.get_cmap("tab10")(np.arange(max(n, 1)))
    if n <= 20:
        return plt.get_cmap("tab20")(np.arange(n))
    return plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False))


def overlay_slices(target: np.ndarray, count: int = 4, focus: Sequence[int] = ()) -> list[int]:
    """Axial (z) slices spread over the labelled extent of ``target`` (X, Y, Z), the middle ones if unlabelled; the
    slice holding most voxels of the ``focus`` classes (lesions) replaces the nearest one, so small findings show."""
    zs = np.flatnonzero(target.any(axis=(0, 1)))
    lo, hi = (int(zs.min()), int(zs.max())) if len(zs) else (0, target.shape[2] - 1)
    picks = [int(round(v)) for v in np.linspace(lo, hi, count + 2)[1:-1]]
    if len(focus):
        per_slice = np.isin(target, list(focus)).sum(axis=(0, 1))
        if per_slice.any():
            best = int(per_slice.argmax())
            picks[int(np.argmin([abs(p - best) for p in picks]))] = best
    return sorted(set(picks))


def plot_overlay(
    image: np.ndarray,
    target: np.ndarray,
    pred: np.ndarray,
    labels: dict[int, str],
    spacing: Sequence[float],
    out_png: str | Path,
    title: str = "",
    count: int = 4,
    focus: Sequence[int] = (),
) -> Path:
    """Axial slices of one case: ground truth (top row) and prediction (bottom row) over the image.

    ``image``: (X, Y, Z) windowed to [0, 1], RAS; displayed radiologically (patient right on the left, anterior up).
    """
    zs = overlay_slices(target, count, focus)
    colours = class_colours(len(labels) - 1)
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(2, len(zs), figsize=(2.8 * len(zs), 6.0), squeeze=False)
    aspect = float(spacing[1]) / float(spacing[0])
    for col, z in enumerate(zs):
        for row, (name, lab) in enumerate((("ground truth", target), ("prediction", pred))):
            ax = axes[row, col]
            ax.imshow(image[::-1, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1, aspect=aspect)
            seg = lab[::-1, :, z].T.astype(float)
            masked = np.ma.masked_where(seg == 0, seg - 1)
            ax.imshow(
                masked,
                cmap=cmap,
                origin="lower",
                alpha=0.45,
                vmin=0,
                vmax=cmap.N - 1,
                aspect=aspect,
                interpolation="nearest",
            )
            ax.text(0.02, 0.98, f"{name}, z={z}", transform=ax.transAxes, color="white", va="top", fontsize=8)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k - 1]) for k in range(1, len(labels))]
    fig.legend(
        handles, [labels[k] for k in range(1, len(labels))], loc="lower center", ncol=min(6, len(handles)), fontsize=8
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(handles) / 6), 1, 0.96))
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_report(metrics: dict, out_md: str | Path) -> Path:
    """A short markdown summary: setting, then one table of per-class test Dice / HD95."""
    test = metrics.get("test", {})
    lines = [
        f"# Segmentation: {metrics['init_name']} ({metrics['encoder']}/{metrics['preset']})",
        "",
        f"- data: `{metrics['data']}`, label fraction {metrics['fraction']:g} (seed {metrics['seed']}): "
        f"{metrics['n_train']} train / {metrics['n_val']} val / {metrics['n_test']} test studies",
        f"- {metrics['steps']} steps, best validation mean Dice {_fmt(metrics['best_val_dice'])} "
        f"at step {metrics['best_step']}; encoder {'frozen' if metrics['freeze_encoder'] else 'fine-tuned'}",
        f"- test mean Dice **{_fmt(test.get('dice_mean'))}**, mean HD95 {_fmt(test.get('hd95_mean'), 2)} mm, "
        f"small-lesion Dice {_fmt(test.get('small_lesion_dice'))} over {test.get('small_lesions', 0)} lesions "
        f"< {metrics['small_lesion_mm']:g} mm (detected {_fmt(test.get('small_lesion_detection'))})",
        "",
        "| class | test Dice | test HD95 (mm) |",
        "|---|---|---|",
    ]
    for name, dice in test.get("dice_per_class", {}).items():
        lines.append(f"| {name} | {_fmt(dice)} | {_fmt(test.get('hd95_per_class', {}).get(name), 2)} |")
    lines += ["", "Figures: `curves.png` (training loss, validation Dice), `test_overlay.png` (a test case)."]
    out_md = Path(out_md)
    out_md.write_text("\n".join(lines) + "\n")
    return out_md


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
