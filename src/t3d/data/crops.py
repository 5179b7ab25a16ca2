"""Crop sampling from the study cache (docs/method.md §1): K foreground-biased sites per study, two overlapping
views each.

    ds = CropDataset("cache", CropConfig(size=(96, 96, 96), sites=2), seed=0, epoch_length=10_000)
    loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds), num_workers=4)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                     # also reaches persistent workers (shared-memory counter)
        for batch in loader:
            batch["views"]                      # (B, K, 2, C, D, H, W) float32, windowed + augmented

Crops are read straight from the int16 memory map of ``image.npy`` at target spacing: only the crop's bytes are
touched, the volume is never loaded whole nor resampled. Every random draw of item ``i`` comes from a generator
seeded by ``SeedSequence([seed, epoch, i])``, so an item is the same whatever the number of DataLoader workers or
distributed ranks that produce it.

Site centres are kept where the whole crop lies inside the volume (as MONAI's ``RandCropByPosNegLabeld`` does),
so that crops are not wasted on air; only volumes smaller than the crop along an axis are padded with air
(-1024 HU), centred. A foreground point always stays inside its crop after this correction.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from t3d.config import CropConfig
from t3d.data.cache import AIR_HU, FOREGROUND_HU, StudyCache

Window = tuple[float, float]
OPEN_STUDIES = 32
"""Memory maps (and body points) kept open per process; bounded so that 50k-study caches stay far below the
kernel's limit on mappings."""


def select_studies(cache: StudyCache, ids: Sequence[str] | None) -> list[tuple[int, dict[str, Any]]]:
    """(row number in ``index.jsonl``, row) of the cached studies, optionally restricted to ``ids`` (in that order).

    Ids that are not in the cache (e.g. quarantined by preprocessing) are skipped with a warning; none left is an
    error.
    """
    rows = list(enumerate(cache.index()))
    if ids is not None:
        by_id = {row["id"]: (i, row) for i, row in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            warnings.warn(
                f"{len(missing)} of {len(ids)} requested studies are not in the cache {cache.root} "
                f"(quarantined or not preprocessed), skipping them: {', '.join(map(str, missing[:5]))}"
                + (" ..." if len(missing) > 5 else ""),
                stacklevel=3,
            )
        rows = [by_id[i] for i in ids if i in by_id]
    if not rows:
        raise ValueError(
            f"no studies to sample from in the cache {cache.root}: the index is empty or none of the requested ids "
            "is cached; check the split file or run `t3d preprocess` again"
        )
    return rows


def window_params(windows: Sequence[Window], scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Per-window (a, b, low, high) such that ``clip(hu * a + b, low, high)`` equals
    ``clip((hu - lo) / (hi - lo), 0, 1) * scale + shift`` (``scale > 0``): windowing and intensity jitter fused
    into one multiply-add and one clip. Returns float64 (C, 4)."""
    out = np.empty((len(windows), 4))
    for c, (lo, hi) in enumerate(windows):
        a = scale / (hi - lo)
        out[c] = (a, shift - lo * a, shift, shift + scale)
    return out


def apply_windows(hu: np.ndarray, params: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Windowed channels of one float32 HU crop ``hu`` (D, H, W) into ``out`` (C, D, H, W); ``hu`` may be ``out[0]``.

    In place and vectorised: ~3 memory passes per channel, no temporaries.
    """
    # Channel 0 last: it may share memory with ``hu``.
    for c in range(len(params) - 1, -1, -1):
        a, b, lo, hi = (float(v) for v in params[c])
        np.multiply(hu, np.float32(a), out=out[c])
        np.add(out[c], np.float32(b), out=out[c])
        np.clip(out[c], np.float32(lo), np.float32(hi), out=out[c])
    return out


def read_crop(
    volume: np.ndarray,
    start: Sequence[int],
    out: np.ndarray,
    flips: Sequence[bool] = (False,) * 3,
    fill: float = AIR_HU,
) -> np.ndarray:
    """Copy ``volume[start : start + out.shape]`` into ``out`` (cast to its dtype), flipped along ``flips``.

    Parts of the box outside the volume are set to ``fill`` (air). ``volume`` is typically the int16 memory map,
    so only the crop's pages are read. Flipping is done by writing through a reversed view of ``out``: free.
    """
    dst = out[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    src_sl, dst_sl = [], []
    for axis, (s, n) in enumerate(zip(start, out.shape)):
        lo, hi = max(int(s), 0), min(int(s) + n, volume.shape[axis])
        if hi <= lo:  # the box misses the volume along this axis
            dst.fill(fill)
            return out
        src_sl.append(slice(lo, hi))
        dst_sl.append(slice(lo - int(s), hi - int(s)))
    if any(sl.start > 0 or sl.stop < n for sl, n in zip(dst_sl, out.shape)):
        dst.fill(fill)
    np.copyto(dst[tuple(dst_sl)], volume[tuple(src_sl)], casting="unsafe")
    return out


def centre_bounds(shape: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest crop centre (3,) per axis such that ``[c - size//2, c - size//2 + size)`` lies inside the
    volume; along an axis where the volume is smaller than the crop both are the centred position (air on both
    sides)."""
    shape, size = np.asarray(shape, dtype=np.int64), np.asarray(size, dtype=np.int64)
    half = size // 2
    lo = np.where(shape >= size, half, (shape - size) // 2 + half)
    hi = np.where(shape >= size, shape - size + half, lo)
    return lo, hi


def draw_augmentation(
    rng: np.random.Generator, cfg: CropConfig, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The augmentation policy of every method (crops and the ``clip`` whole volume alike), per view of ``shape``:
    flips bool (*shape, 3) only along ``cfg.flip_axes`` (never left-right), intensity scale (*shape) in
    1 ± ``intensity_scale`` and shift (*shape) in ± ``intensity_shift``; the identity if not ``cfg.augment``.
    Every draw has a fixed size, so the stream does not depend on the flags."""
    flips = (rng.random((*shape, 3)) < cfg.flip_prob) & np.asarray(cfg.flip_mask)
    scale = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, size=shape)
    shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, size=shape)
    if not cfg.augment:
        return np.zeros_like(flips), np.ones_like(scale), np.zeros_like(shift)
    return flips, scale, shift


class CropDataset(Dataset):
    """K crop sites x 2 overlapping, independently augmented views per cached study (docs/method.md §1).

    Args:
        cache_root: folder written by ``t3d preprocess`` (see ``t3d.data.cache``).
        cfg: crop size (voxels at target spacing), sites, view shift, foreground bias, HU windows, augmentation.
        ids: study ids to use (e.g. the ``pretrain`` split), in this order; default every cached study.
        seed: base seed; item ``i`` of epoch ``e`` draws from ``SeedSequence([seed, e, i])``.
        epoch_length: dataset length; indices wrap modulo the number of studies (default: one item per study).
        with_labels: also return the label map at the same positions (``label.npy`` must exist).
        count_labels: label values whose voxels are counted in every view (``label.npy`` must exist): the per-crop
            targets of the ``supervised`` control, without shipping whole label crops.

    Item: ``{"views": float32 (K, 2, C, D, H, W), "index": int (row of index.jsonl, for text-feature lookup),
    "id": str, "centers": int64 (K, 2, 3) voxel centres in the cached volume}``, plus ``"labels": uint8
    (K, 2, 1, D, H, W)`` with ``with_labels`` and ``"label_voxels": int64 (K, 2, len(count_labels))`` with
    ``count_labels``. D, H, W follow the cache's X, Y, Z (RAS) axes. Views are in [0, 1] before intensity jitter,
    "[0, 1]-ish" after.
    """

    def __init__(
        self,
        cache_root: str | Path,
        cfg: CropConfig,
        ids: Sequence[str] | None = None,
        seed: int = 0,
        epoch_length: int | None = None,
        with_labels: bool = False,
        count_labels: Sequence[int] = (),
    ):
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length}")
        self.cache = StudyCache(cache_root)
        self.cfg = cfg
        self.studies = select_studies(self.cache, ids)
        self.seed = int(seed)
        self.epoch_length = epoch_length
        self.with_labels = with_labels
        self.count_labels = tuple(int(v) for v in count_labels)
        # Shared memory: set_epoch in the main process is seen by (persistent) DataLoader workers too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._open: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Never ship open memory maps to workers (pickling one copies the whole volume); each reopens its own.
        return {**self.__dict__, "_open": OrderedDict()}

    def __len__(self) -> int:
        return self.epoch_length if self.epoch_length is not None else len(self.studies)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws of every item (call before each epoch, like ``DistributedSampler.set_epoch``)."""
        self._epoch.fill_(int(epoch))

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(index)]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = int(index) % len(self)
        row_number, row = self.studies[index % len(self.studies)]
        key = row["key"]
        volume, fg = self.study(key)
        rng = self.rng(index)
        centres = self.draw_centres(rng, volume.shape, fg)
        flips, scale, shift = self.draw_augmentation(rng)
        k, c, size = self.cfg.sites, self.cfg.channels, tuple(self.cfg.size)
        views = np.empty((k, 2, c, *size), dtype=np.float32)  # (K, 2, C, D, H, W)
        starts = centres - np.asarray(size) // 2
        for s in range(k):
            for v in range(2):
                hu = read_crop(volume, starts[s, v], views[s, v, 0], flips[s, v])
                apply_windows(hu, window_params(self.cfg.windows, scale[s, v], shift[s, v]), views[s, v])
        item = {"views": torch.from_numpy(views), "index": row_number, "id": row["id"]}
        item["centers"] = torch.from_numpy(centres.astype(np.int64))
        if self.with_labels or self.count_labels:
            labels = self._labels(key, row["id"], starts, flips)
            if self.with_labels:
                item["labels"] = torch.from_numpy(labels)
            if self.count_labels:
                counts = [np.count_nonzero(labels == v, axis=(2, 3, 4, 5)) for v in self.count_labels]
                item["label_voxels"] = torch.from_numpy(np.stack(counts, axis=-1).astype(np.int64))
        return item

    def study(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The int16 memory map (X, Y, Z) and body voxel indices (N, 3) of a study, kept open for the last
        OPEN_STUDIES studies (parsing .npy headers costs more than cutting a small crop).

        The body points are re-thresholded when ``cfg.foreground_hu`` is stricter than the preprocessing threshold
        they were taken at."""
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        volume, points = self.cache.image(key), self.cache.foreground(key)
        if self.cfg.foreground_hu > FOREGROUND_HU and len(points):
            points = points[np.asarray(volume[points[:, 0], points[:, 1], points[:, 2]]) > self.cfg.foreground_hu]
        self._open[key] = (volume, points)
        if len(self._open) > OPEN_STUDIES:
            self._open.popitem(last=False)
        return volume, points

    def draw_centres(self, rng: np.random.Generator, shape: Sequence[int], fg: np.ndarray) -> np.ndarray:
        """Voxel centres (K, 2, 3) of both views of K sites.

        A site is a random foreground point with probability ``foreground_prob`` (if the study has any), else
        uniform over the positions where the crop fits. The views sit at ``site - d//2`` and ``site - d//2 + d``
        with ``d`` uniform in [-s, s] per axis, ``s = floor(max_shift * size)``; both are then moved inside the
        volume, which can only shrink their distance. Every draw has a fixed size, so the stream does not depend on
        the data or the flags.
        """
        k, size = self.cfg.sites, np.asarray(self.cfg.size)
        lo, hi = centre_bounds(shape, size)
        use_fg = rng.random(k) < self.cfg.foreground_prob
        pick = rng.random(k)
        site = lo + np.floor(rng.random((k, 3)) * (hi - lo + 1)).astype(np.int64)  # uniform
        max_d = np.floor(self.cfg.max_shift * size).astype(np.int64)
        d = np.floor(rng.random((k, 3)) * (2 * max_d + 1)).astype(np.int64) - max_d  # (K, 3) in [-s, s]
        if len(fg):
            fg_site = fg[np.minimum((pick * len(fg)).astype(np.int64), len(fg) - 1)].astype(np.int64)
            site = np.where(use_fg[:, None], fg_site, site)
        first = np.clip(site, lo, hi) - np.floor_divide(d, 2)
        return np.clip(np.stack([first, first + d], axis=1), lo, hi)

    def draw_augmentation(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-view flips bool (K, 2, 3), intensity scale (K, 2) and shift (K, 2); identity if not ``augment``."""
        return draw_augmentation(rng, self.cfg, (self.cfg.sites, 2))

    def _labels(self, key: str, study_id: str, starts: np.ndarray, flips: np.ndarray) -> np.ndarray:
        label = self.cache.label(key)
        if label is None:
            raise ValueError(
                f"study '{study_id}': label crops were asked for (with_labels / count_labels) but the cache has no "
                f"label map for it ({self.cache.studies / key / 'label.npy'}); preprocess a manifest with a label "
                "column, or ask for no labels"
            )
        out = np.empty((*starts.shape[:2], 1, *self.cfg.size), dtype=np.uint8)  # (K, 2, 1, D, H, W)
        for s in range(starts.shape[0]):
            for v in range(2):
                read_crop(label, starts[s, v], out[s, v, 0], flips[s, v], fill=0)
        return out


def resize_volume(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resize (C, X, Y, Z) to (C, *grid) without aliasing.

    Trilinear interpolation alone samples a 512² x 300 CT at a few points per output voxel and aliases (small
    bright structures flicker in and out), and PyTorch has no 3D ``antialias``. So first average over boxes of
    ``floor(shape / grid)`` voxels per axis (adaptive average pooling: an area filter at the decimation rate,
    covering the whole extent), then trilinear (``align_corners=False``, same edge-to-edge geometry) to the exact
    grid, where the remaining factor is < 2. Cheaper than MONAI ``Resize(anti_aliasing=True)``'s Gaussian over the
    full-resolution volume, and equivalent for this purpose.
    """
    shape = torch.tensor(x.shape[1:])
    factor = torch.clamp(shape // torch.tensor(list(grid)), min=1)
    y = x[None]
    if (factor > 1).any():
        y = F.adaptive_avg_pool3d(y, [int(v) for v in shape // factor])
    if tuple(y.shape[2:]) != tuple(grid):
        y = F.interpolate(y, size=tuple(int(g) for g in grid), mode="trilinear", align_corners=False)
    return y[0]


class WholeVolumeDataset(Dataset):
    """The ``clip`` baseline's input: each whole cached volume, windowed, resized to a small fixed grid.

    Item: ``{"volume": float32 (C, gx, gy, gz) in [0, 1], "index": int (row of index.jsonl), "id": str}``.
    Windowing happens before resizing, so averaging mixes the intensities the network would see.

    ``augment``: the crops' augmentation policy (``draw_augmentation``: the same flips and intensity jitter as every
    other method) drawn per item from ``SeedSequence([seed, epoch, index])``; None (evaluation) = deterministic.
    """

    def __init__(
        self,
        cache_root: str | Path,
        grid: Sequence[int] = (64, 64, 48),
        windows: Sequence[Window] = CropConfig().windows,
        ids: Sequence[str] | None = None,
        augment: CropConfig | None = None,
        seed: int = 0,
    ):
        if len(grid) != 3 or any(int(g) < 1 for g in grid):
            raise ValueError(f"grid must be three positive sizes in voxels, got {grid}")
        if not windows or any(hi <= lo for lo, hi in windows):
            raise ValueError(f"windows must be (low, high) HU pairs with low < high, got {windows}")
        self.cache = StudyCache(cache_root)
        self.grid = tuple(int(g) for g in grid)
        self.windows = tuple((float(lo), float(hi)) for lo, hi in windows)
        self.studies = select_studies(self.cache, ids)
        self.augment, self.seed = augment, int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.studies)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws of every item (as ``CropDataset.set_epoch``)."""
        self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> dict[str, Any]:
        row_number, row = self.studies[index]
        volume = self.cache.image(row["key"])
        flips, scale, shift = np.zeros(3, dtype=bool), 1.0, 0.0
        if self.augment is not None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(self._epoch), int(index)]))
            flips, scale, shift = draw_augmentation(rng, self.augment, ())
        hu = np.empty((len(self.windows), *volume.shape), dtype=np.float32)  # (C, X, Y, Z)
        np.copyto(hu[0], volume, casting="unsafe")
        apply_windows(hu[0], window_params(self.windows, float(scale), float(shift)), hu)
        out = resize_volume(torch.from_numpy(hu), self.grid)
        axes = [1 + int(a) for a in np.flatnonzero(flips)]
        return {"volume": out.flip(axes) if axes else out, "index": row_number, "id": row["id"]}
