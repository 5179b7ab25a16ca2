"""Deterministic crops that cover a study's body: how a study is seen at evaluation time (docs/method.md §6).

Training samples random foreground crops (``t3d.data.crops.CropDataset``); evaluation must see every test study the
same way every time, and see all of it, so that a 5 mm nodule far from the centre still reaches the study's
features. ``grid_centres`` lays a regular grid of crop centres over the bounding box of the body (HU > -500
voxels cached by preprocessing) with a fixed ``overlap`` between neighbours; when the grid has more than
``max_crops`` boxes, the ones holding the most body voxels are kept. Crops are read at target spacing, windowed like
training crops, never resized.

    ds = GridCropDataset("cache", size=(96, 96, 96), windows=((-1000, 1000),), overlap=0.25, max_crops=27)
    item = ds[0]    # {"crops": float32 (K, C, D, H, W), "centers": int64 (K, 3), "positions": float32 (K, 3), ...}

The same grid is the tiled study path of pre-training (``t3d.data.tiles``): ``body_positions`` places each crop's
centre in normalised body coordinates, the input of the tile position encoding.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from t3d.data.cache import StudyCache
from t3d.data.crops import apply_windows, centre_bounds, read_crop, select_studies, window_params


def _axis_centres(lo: int, hi: int, size: int, stride: int) -> np.ndarray:
    """Centres of crops of ``size`` along one axis that tile [lo, hi] with at most ``stride`` between them."""
    extent = hi - lo + 1
    if extent <= size:
        return np.array([(lo + hi + 1) // 2])
    count = int(np.ceil((extent - size) / stride)) + 1
    first, last = lo + size // 2, hi + 1 - size + size // 2
    return np.unique(np.round(np.linspace(first, last, count)).astype(np.int64))


def grid_centres(
    shape: Sequence[int], foreground: np.ndarray, size: Sequence[int], overlap: float = 0.25, max_crops: int = 27
) -> np.ndarray:
    """Crop centres (K, 3), K <= ``max_crops``, tiling the body's bounding box with ``overlap`` (fraction of size).

    ``foreground``: (N, 3) body voxel indices (the cache's ``fg.npy``); empty means the whole volume. Centres are
    moved inside the volume as training crops are (``centre_bounds``). When more than ``max_crops`` boxes are
    needed, the boxes with the most foreground points are kept (ties: grid order), and the result is in grid order.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1) (fraction of the crop size), got {overlap}")
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, got {max_crops}")
    shape, size = np.asarray(shape, dtype=np.int64), np.asarray(size, dtype=np.int64)
    fg = np.asarray(foreground, dtype=np.int64).reshape(-1, 3)
    lo, hi = (fg.min(axis=0), fg.max(axis=0)) if len(fg) else (np.zeros(3, np.int64), shape - 1)
    stride = np.maximum(1, np.floor(size * (1.0 - overlap)).astype(np.int64))
    axes = [_axis_centres(int(lo[a]), int(hi[a]), int(size[a]), int(stride[a])) for a in range(3)]
    low, high = centre_bounds(shape, size)
    centres = np.clip(np.array(list(itertools.product(*axes)), dtype=np.int64), low, high)
    centres = np.unique(centres, axis=0)  # clipping can merge boxes at the volume's edge
    if len(centres) <= max_crops:
        return centres
    start = centres - size // 2
    inside = ((fg[None, :, :] >= start[:, None, :]) & (fg[None, :, :] < (start + size)[:, None, :])).all(axis=2)
    keep = np.sort(np.argsort(-inside.sum(axis=1), kind="stable")[:max_crops])
    return centres[keep]


def body_positions(centres: np.ndarray, foreground: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Crop centres (K, 3) in normalised body coordinates: -1 / +1 at the low / high edge of the body's bounding box
    along each axis (the whole volume when ``foreground`` is empty), clipped to [-1, 1]; 0 on an axis where the box
    is one voxel thick. float32 (K, 3)."""
    fg = np.asarray(foreground, dtype=np.int64).reshape(-1, 3)
    lo, hi = (fg.min(axis=0), fg.max(axis=0)) if len(fg) else (np.zeros(3, np.int64), np.asarray(shape) - 1)
    extent = (hi - lo).astype(np.float64)
    pos = np.where(extent > 0, 2.0 * (centres - lo) / np.maximum(extent, 1.0) - 1.0, 0.0)
    return np.clip(pos, -1.0, 1.0).astype(np.float32)


def read_grid(volume: np.ndarray, centres: np.ndarray, size: Sequence[int], params: np.ndarray) -> np.ndarray:
    """The windowed crops (K, C, *size) float32 in [0, 1] of ``volume`` centred at ``centres`` (no augmentation)."""
    crops = np.empty((len(centres), len(params), *size), dtype=np.float32)
    for k, start in enumerate(centres - np.asarray(size) // 2):
        hu = read_crop(volume, start, crops[k, 0])
        apply_windows(hu, params, crops[k])
    return crops


class GridCropDataset(Dataset):
    """All grid crops of each cached study, windowed, no augmentation (deterministic).

    Args:
        cache_root: folder written by ``t3d preprocess``.
        size: crop size in voxels at target spacing (the encoder's training crop size).
        windows: HU windows (low, high), one channel each (the pre-training ``crops.windows``).
        ids: study ids to use, in this order (default: every cached study).
        overlap, max_crops: see ``grid_centres``.

    Item: ``{"crops": float32 (K, C, D, H, W) in [0, 1], "centers": int64 (K, 3), "positions": float32 (K, 3) in
    [-1, 1] (``body_positions``), "index": int, "id": str}``;
    K varies between studies, so load with ``batch_size=1`` (or ``collate_fn=lambda b: b``).
    """

    def __init__(
        self,
        cache_root: str | Path,
        size: Sequence[int],
        windows: Sequence[tuple[float, float]],
        ids: Sequence[str] | None = None,
        overlap: float = 0.25,
        max_crops: int = 27,
    ):
        self.cache = StudyCache(cache_root)
        self.size = tuple(int(s) for s in size)
        self.params = window_params(windows)
        self.studies = select_studies(self.cache, ids)
        self.overlap, self.max_crops = overlap, max_crops

    def __len__(self) -> int:
        return len(self.studies)

    def set_epoch(self, epoch: int) -> None:
        """No random draws; present so loops treat every dataset alike."""

    def positions(self, index: int) -> np.ndarray:
        """Item ``index``'s crop centres in normalised body coordinates (K, 3), without reading the crops."""
        key = self.studies[index][1]["key"]
        shape, fg = self.cache.image(key).shape, self.cache.foreground(key)
        return body_positions(grid_centres(shape, fg, self.size, self.overlap, self.max_crops), fg, shape)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row_number, row = self.studies[index]
        volume, fg = self.cache.image(row["key"]), self.cache.foreground(row["key"])
        centres = grid_centres(volume.shape, fg, self.size, self.overlap, self.max_crops)
        return {
            "crops": torch.from_numpy(read_grid(volume, centres, self.size, self.params)),
            "centers": torch.from_numpy(centres),
            "positions": torch.from_numpy(body_positions(centres, fg, volume.shape)),
            "index": row_number,
            "id": row["id"],
        }
