"""Whole-volume segmentation: sliding-window inference on cached studies and their scores (docs/method.md §6).

    pred = predict_volume(net, volume, roi=(96, 96, 96), sw_batch_size=2, overlap=0.5, device=device)  # (X, Y, Z)
    result = evaluate_cases(net, cache, keys, labels, setting, hd95=True)   # per-case rows + per-class means

Volumes stay on the CPU; windows travel to the device in batches and the blended logits are stitched on the CPU
(``sliding_window_inference(..., sw_device=device, device="cpu")``), so a 512 x 512 x 400 CT fits any GPU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm import tqdm

from t3d.data.cache import StudyCache
from t3d.finetune.segdata import load_volume
from t3d.metrics import LesionScore, dice_per_class, hd95_per_class, small_lesion_scores, summarise_lesions


@dataclass
class InferenceSetting:
    """How volumes are windowed and swept."""

    windows: tuple[tuple[float, float], ...]
    roi: tuple[int, int, int]
    sw_batch_size: int = 2
    overlap: float = 0.5
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = True
    """bf16 autocast on GPU."""


def predict_volume(net: nn.Module, volume: torch.Tensor, setting: InferenceSetting) -> torch.Tensor:
    """Label map (X, Y, Z) uint8 of one windowed volume (C, X, Y, Z), Gaussian-blended sliding windows."""
    was_training = net.training
    net.eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if setting.amp and setting.device.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        logits = sliding_window_inference(
            volume[None],  # (1, C, X, Y, Z) on the CPU
            roi_size=setting.roi,
            sw_batch_size=setting.sw_batch_size,
            predictor=net,
            overlap=setting.overlap,
            mode="gaussian",
            sw_device=setting.device,
            device=torch.device("cpu"),
        )
    net.train(was_training)
    return logits[0].float().argmax(dim=0).to(torch.uint8)  # (K, X, Y, Z) -> (X, Y, Z)


def evaluate_cases(
    net: nn.Module,
    cache: StudyCache,
    keys: Sequence[str],
    labels: dict[int, str],
    setting: InferenceSetting,
    hd95: bool = False,
    lesion_labels: Sequence[int] = (),
    small_lesion_mm: float = 10.0,
    lesion_margin_mm: float = 5.0,
    keep: int = 0,
    desc: str = "evaluate",
) -> dict:
    """Predict every study in ``keys`` and score it against its cached label map.

    Returns ``{"dice_mean", "dice_per_class": {name: mean over cases}, "hd95_mean", "hd95_per_class", small-lesion
    summary, "cases": [per-case rows], "predictions": {key: (X, Y, Z) uint8} for the first ``keep`` studies}``.
    Means over cases skip NaN (class absent from a case); ``dice_mean`` is the mean over classes of the class means.
    """
    num_classes = len(labels)
    rows, dice, dist, lesions, kept = [], [], [], [], {}
    for key in tqdm(keys, desc=desc, unit="study", leave=False):
        target = np.asarray(cache.label(key))
        spacing = cache.meta(key).spacing
        pred = predict_volume(net, load_volume(cache, key, setting.windows), setting).numpy()
        d = dice_per_class(pred, target, num_classes)
        h = hd95_per_class(pred, target, num_classes, spacing) if hd95 else np.full(num_classes - 1, np.nan)
        found: list[LesionScore] = small_lesion_scores(
            pred, target, lesion_labels, spacing, small_lesion_mm, lesion_margin_mm
        )
        dice.append(d)
        dist.append(h)
        lesions += found
        rows.append({"id": key, "dice": _plain(d), "hd95": _plain(h), **summarise_lesions(found)})
        if len(kept) < keep:
            kept[key] = pred
    names = [labels[c] for c in range(1, num_classes)]
    out = _class_means(np.array(dice).reshape(-1, num_classes - 1), names, "dice")
    if hd95:
        out.update(_class_means(np.array(dist).reshape(-1, num_classes - 1), names, "hd95"))
    out.update(summarise_lesions(lesions))
    out["cases"] = rows
    out["predictions"] = kept
    return out


def _class_means(values: np.ndarray, names: list[str], what: str) -> dict:
    """(cases, classes) -> per-class nanmean and the mean over classes (NaN where nothing was measurable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" for classes absent everywhere
        per_class = np.nanmean(values, axis=0) if len(values) else np.full(len(names), np.nan)
        mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return {f"{what}_mean": mean, f"{what}_per_class": dict(zip(names, _plain(per_class)))}


def _plain(values: np.ndarray) -> list[float | None]:
    """JSON-friendly floats (NaN -> None)."""
    return [None if not np.isfinite(v) else round(float(v), 6) for v in np.asarray(values, dtype=np.float64)]
