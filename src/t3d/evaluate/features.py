"""Frozen-encoder features for the probes, computed once per checkpoint and kept on disk (docs/method.md §7).

    enc = frozen_encoder("runs/pretrain/t3d")            # or frozen_encoder(None, cfg, seed=0): the random control
    x, ids = study_features(enc, "cache", ids)           # (N, 2F): mean and max over the study's grid tiles
    x = crop_features(enc, "cache", sites)               # (M, F): one crop per lesion-probe site
    x = crop_features(enc, "cache", sites, pooling="centre", region=(4, 4, 2))  # (M, sum of level widths)
    x = voxel_statistics("cache", sites, (4, 4, 2))      # (M, 27): the non-learned control of the lesion probe
    x, ids = cached("features/t3d_s0_study.pt", enc.fingerprint, lambda: study_features(enc, "cache", ids))

Every method meets the same inputs and the same pooling: the fixed tile grid of ``t3d.data.grid`` at the
checkpoint's crop size and windows (full resolution, never resized; also for ``clip``, whose encoder is fully
convolutional and so reads tiles as it reads its shrunk volume), the encoder's own ``pool`` per tile (spatial
mean + LayerNorm), then mean and max over the study's tiles concatenated. The max keeps a finding that lights up one
tile of 27 from being averaged away; the mean carries diffuse findings (organ size, attenuation).

A lesion-probe crop is read one of two ways. ``pooling="crop"``: the encoder's ``pool`` over the whole crop, the
feature a study-level head sees; a lesion of a few voxels in a 64 x 64 x 32 crop is diluted ~10^4 times by the spatial
mean. ``pooling="centre"`` (lesion scale): at every encoder level but the input itself (strides 2..32), the mean of
the cells that cover the central box of ``region`` voxels (at least the 2 cells per axis around the centre, which
sits on a cell boundary), concatenated over levels; finer levels see the lesion, coarser ones its surroundings.

``voxel_statistics`` is the lesion probe's non-learned control on the same sites: HU statistics of the central box
of each crop. A lesion at the crop centre changes them, so a probe on them must beat chance on lesions the encoders
are asked to see; if it does and an encoder does not, the encoder's features (or their pooling) lose the lesion.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t3d.checkpoint import latest_checkpoint, load_checkpoint
from t3d.config import PretrainConfig
from t3d.data.cache import StudyCache
from t3d.data.crops import apply_windows, read_crop, window_params
from t3d.data.grid import GridCropDataset
from t3d.evaluate.joint import encode_studies, load_joint
from t3d.evaluate.lesions import CropSite
from t3d.models import build_encoder
from t3d.models.encoders import Encoder
from t3d.models.keymap import load_into
from t3d.pretrained import SEG_KIND, PretrainedEncoder, segmentation_encoder


@dataclass
class FrozenEncoder:
    """An image encoder in eval mode with the inputs it was trained on."""

    encoder: Encoder
    crop_size: tuple[int, int, int]
    windows: tuple[tuple[float, float], ...]
    fingerprint: str
    """Identifies the weights (checkpoint path, size, mtime; or the random seed and config): the cache key."""
    device: torch.device

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, D, H, W) crops -> (N, F) pooled features."""
        return self.encoder.pool(self.encoder.forward_features(x.to(self.device))).float().cpu()

    @torch.no_grad()
    def embed_centre(self, x: torch.Tensor, region: Sequence[int]) -> torch.Tensor:
        """(N, C, D, H, W) crops -> (N, sum of the level widths): every level's mean over the cells covering the
        central ``region`` box (voxels), levels at strides 2..32 concatenated."""
        levels = []
        for f in self.encoder.forward_features(x.to(self.device))[1:]:
            box = centre_cells(f.shape[2:], x.shape[2:], region)
            levels.append(f[:, :, box[0], box[1], box[2]].mean(dim=(2, 3, 4)))
        return torch.cat(levels, dim=1).float().cpu()


def centre_cells(cells: Sequence[int], voxels: Sequence[int], region: Sequence[int]) -> tuple[slice, ...]:
    """Per axis, the slice of a map of ``cells`` (over an input of ``voxels``) covering the central ``region``
    voxels; at least the two cells either side of the centre (an even cell count puts it on a boundary)."""
    out = []
    for n, v, r in zip(cells, voxels, region):
        half = max(1, int(np.ceil(r * n / v / 2)))  # half-width in cells of r voxels at stride v / n
        lo = max(0, n // 2 - half)
        out.append(slice(lo, min(n, n - lo)))
    return tuple(out)


def frozen_encoder(
    checkpoint: str | Path | None, cfg: PretrainConfig | None = None, seed: int = 0, device: torch.device | None = None
) -> FrozenEncoder:
    """The encoder of a ``t3d pretrain`` checkpoint or of a ``t3d finetune seg`` run, or with ``checkpoint=None`` a
    randomly initialised one built from ``cfg`` with ``torch.manual_seed(seed)`` (the ``random`` control)."""
    device = device or torch.device("cpu")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        if state.get("kind") == SEG_KIND:
            return _segmentation_encoder(segmentation_encoder(state, checkpoint), device)
        jm = load_joint(checkpoint, device, state)
        stat = os.stat(jm.path if Path(jm.path).is_file() else _final(Path(jm.path)))
        fingerprint = f"{Path(jm.path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|step{jm.step}"
        return FrozenEncoder(jm.model.encoder.eval(), jm.cfg.crops.size, jm.cfg.crops.windows, fingerprint, device)
    if cfg is None:
        raise ValueError("frozen_encoder: a random encoder (checkpoint=None) needs the PretrainConfig to build it from")
    torch.manual_seed(seed)
    encoder = build_encoder(cfg.model, in_channels=cfg.crops.channels, img_size=tuple(cfg.crops.size)).to(device)
    spec = f"random|seed{seed}|{cfg.model}|{cfg.crops.size}|{cfg.crops.windows}"
    return FrozenEncoder(encoder.eval(), cfg.crops.size, cfg.crops.windows, spec, device)


def _segmentation_encoder(pre: PretrainedEncoder, device: torch.device) -> FrozenEncoder:
    """The encoder of a ``t3d finetune seg`` run as fine-tuning left it (segmentation never trains the pooling
    norm: it keeps its initial identity, or the pre-training run's values for an EncoderUNet)."""
    encoder = build_encoder(pre.model, in_channels=pre.in_channels, img_size=pre.crop_size)
    load_into(encoder, pre.state, prefix="swinViT." if pre.model.encoder == "swinvit" else "resnet.", strict=True)
    path = Path(pre.source)
    stat = os.stat(path if path.is_file() else latest_checkpoint(path))
    fingerprint = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|seg-step{pre.step}"
    return FrozenEncoder(encoder.to(device).eval(), pre.crop_size, pre.windows, fingerprint, device)


def _final(run_dir: Path) -> Path:
    """The checkpoint file ``load_joint`` reads for a run folder (``final.pt``, else the newest step)."""
    ckpts = run_dir / "checkpoints"
    final = ckpts / "final.pt"
    return final if final.is_file() else max(ckpts.glob("*.pt"), key=lambda p: p.stat().st_mtime)


def pool_tiles(per_tile: torch.Tensor) -> torch.Tensor:
    """(K, F) tile features -> (2F,): mean and max over the tiles."""
    return torch.cat([per_tile.mean(dim=0), per_tile.max(dim=0).values])


def study_features(
    enc: FrozenEncoder,
    cache: str | Path,
    ids: Sequence[str] | None,
    overlap: float = 0.25,
    max_crops: int = 27,
    crop_batch: int = 8,
) -> tuple[torch.Tensor, list[str]]:
    """(N, 2F) study features over the fixed grid of ``t3d.data.grid`` and the study ids, in ``ids`` order."""
    data = GridCropDataset(cache, enc.crop_size, enc.windows, ids=ids, overlap=overlap, max_crops=max_crops)
    per_study, out_ids = encode_studies(data, enc.embed, enc.device, crop_batch, desc="study features")
    return torch.stack([pool_tiles(f) for f in per_study]), out_ids


@torch.no_grad()
def crop_features(
    enc: FrozenEncoder,
    cache: str | Path,
    sites: Sequence[CropSite],
    crop_batch: int = 16,
    pooling: str = "crop",
    region: Sequence[int] = (4, 4, 2),
) -> torch.Tensor:
    """Features of the crop of ``enc.crop_size`` centred at each site (windowed, no augmentation): (M, F) with
    ``pooling="crop"``, (M, sum of the level widths) with ``pooling="centre"`` over the central ``region`` box."""
    if pooling not in POOLINGS:
        raise ValueError(f"crop_features: pooling must be one of {POOLINGS}, got {pooling!r}")
    feats = []
    for crops in site_crops(cache, sites, enc.crop_size, enc.windows, crop_batch):
        feats.append(enc.embed(crops) if pooling == "crop" else enc.embed_centre(crops, region))
    width = enc.encoder.embed_channels if pooling == "crop" else sum(enc.encoder.feature_channels[1:])
    return torch.cat(feats) if feats else torch.empty(0, width)


def site_crops(
    cache: str | Path,
    sites: Sequence[CropSite],
    crop_size: Sequence[int],
    windows: Sequence[Sequence[float]],
    crop_batch: int = 16,
) -> Iterator[torch.Tensor]:
    """Batches (n, C, D, H, W) of the windowed crops of ``crop_size`` centred at the sites, in order."""
    store = StudyCache(cache)
    params, size = window_params(windows), np.asarray(crop_size)
    for first in range(0, len(sites), crop_batch):
        chunk = sites[first : first + crop_batch]
        x = np.empty((len(chunk), len(params), *crop_size), dtype=np.float32)
        for i, site in enumerate(chunk):
            hu = read_crop(store.image(site.key), np.asarray(site.centre) - size // 2, x[i, 0])
            apply_windows(hu, params, x[i])
        yield torch.from_numpy(x)


POOLINGS = ("crop", "centre")
"""How ``crop_features`` reads a crop: the encoder's pooled feature, or lesion-scale centre cells of every level."""

HU_BINS = np.linspace(-1000.0, 1000.0, 21)
"""Histogram edges of ``voxel_statistics``: 100 HU bins over air to dense bone (lung, fat, soft tissue, stones)."""


def voxel_statistics(cache: str | Path, sites: Sequence[CropSite], region: Sequence[int]) -> torch.Tensor:
    """(M, 27) HU statistics of the box of ``region`` voxels centred at each site: mean, standard deviation, the
    5/25/50/75/95th percentiles and the fraction of voxels in each of the 20 bins of ``HU_BINS`` (clipped)."""
    store = StudyCache(cache)
    size = np.asarray(region, np.int64)
    if (size < 1).any():
        raise ValueError(f"voxel_statistics: region must be >= 1 voxel per axis, got {tuple(region)}")
    rows = []
    for site in sites:
        hu = read_crop(store.image(site.key), np.asarray(site.centre) - size // 2, np.empty(tuple(size), np.float32))
        hist = np.histogram(np.clip(hu, HU_BINS[0], HU_BINS[-1]), bins=HU_BINS)[0] / hu.size
        rows.append(np.concatenate([[hu.mean(), hu.std()], np.percentile(hu, [5, 25, 50, 75, 95]), hist]))
    return torch.as_tensor(np.asarray(rows, np.float32).reshape(len(sites), 7 + len(HU_BINS) - 1))


def cached(path: str | Path, key: str, compute: Callable[[], object]):
    """``compute()`` once per ``key`` (the encoder's fingerprint plus what else shapes the features), kept at
    ``path`` (torch.save); a file with another key is recomputed and replaced."""
    path = Path(path)
    digest = hashlib.sha256(key.encode()).hexdigest()
    if path.is_file():
        stored = torch.load(path, weights_only=False)
        if stored.get("key") == digest:
            return stored["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"key": digest, "value": value}, tmp)
    tmp.replace(path)
    return value
