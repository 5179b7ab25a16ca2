"""Training items of the tiled study path: random crop views for L_view / TIR plus every tile of the study.

    ds = TiledCropDataset("cache", cfg.crops, cfg.tiles, seed=0)
    item = ds[0]
    item["views"]       # (K, 2, C, D, H, W) random, augmented crop views, as ``CropDataset``
    item["tiles"]       # (T, C, D, H, W) the study's fixed grid of full-resolution tiles, T = tiles.max_tiles
    item["tile_pos"]    # (T, 3) float32 tile centres in normalised body coordinates [-1, 1]
    item["tile_mask"]   # (T,) bool, False = padding (a study whose body needs fewer than max_tiles tiles)

The tiles are ``t3d.data.grid``'s deterministic grid at ``crops.size`` and ``crops.windows`` without augmentation:
the same tiles at every epoch, in training and in evaluation, so the study embedding is a function of the study
alone. Padding to ``max_tiles`` lets studies of different sizes share a batch; padded tiles are zeros, never
encoded and masked out of the pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t3d.config import CropConfig, TileConfig
from t3d.data.crops import CropDataset, window_params
from t3d.data.grid import body_positions, grid_centres, read_grid


def study_tiles(
    volume: np.ndarray, foreground: np.ndarray, size: Sequence[int], params: np.ndarray, cfg: TileConfig
) -> dict[str, torch.Tensor]:
    """The padded tiles of one study: ``tiles`` (T, C, *size), ``tile_pos`` (T, 3), ``tile_mask`` (T,)."""
    centres = grid_centres(volume.shape, foreground, size, cfg.overlap, cfg.max_tiles)
    n = len(centres)
    tiles = np.zeros((cfg.max_tiles, len(params), *size), dtype=np.float32)
    tiles[:n] = read_grid(volume, centres, size, params)
    pos = np.zeros((cfg.max_tiles, 3), dtype=np.float32)
    pos[:n] = body_positions(centres, foreground, volume.shape)
    mask = np.zeros(cfg.max_tiles, dtype=bool)
    mask[:n] = True
    return {"tiles": torch.from_numpy(tiles), "tile_pos": torch.from_numpy(pos), "tile_mask": torch.from_numpy(mask)}


class TiledCropDataset(CropDataset):
    """``CropDataset`` items plus the study's tiles (see the module docstring); same arguments plus ``tiles``."""

    def __init__(
        self,
        cache_root: str | Path,
        cfg: CropConfig,
        tiles: TileConfig,
        ids: Sequence[str] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(cache_root, cfg, ids=ids, seed=seed, **kwargs)
        self.tiles = tiles
        self.tile_params = window_params(cfg.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        key = self.studies[(int(index) % len(self)) % len(self.studies)][1]["key"]
        volume, _ = self.study(key)
        # The grid is laid over the cache's body points (as evaluation does), whatever crops.foreground_hu is.
        fg = self.cache.foreground(key)
        item.update(study_tiles(volume, fg, self.cfg.size, self.tile_params, self.tiles))
        return item
