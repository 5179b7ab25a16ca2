"""One study's volume from source file to the cache grid (docs/method.md §1).

read (MONAI readers, channel-first) -> spacing sanity -> [rescale from manifest columns] -> HU domain check ->
orientation (``preprocess.orientation``, RAS) -> resample to ``preprocess.spacing`` (bilinear; labels nearest, onto
the same grid) -> pad up to ``preprocess.min_size`` with air (-1024 HU; labels 0) -> int16 HU.

Every problem raises ``StudyError`` (the study is quarantined, the run goes on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from t3d.config import PreprocessConfig, to_dict
from t3d.data.cache import AIR_HU, StudyMeta
from t3d.data.intensity import check_hu, manifest_rescale, needs_rescale, to_int16
from t3d.data.io import StudyError, read_image
from t3d.data.manifest import Study

PIPELINE_VERSION = 1
"""Bump when the output changes for the same settings: every cached study is then re-processed."""
MAX_OUTPUT_VOXELS = 1024**3
"""A resampled volume above this (4 GiB as float32) means a corrupt header; it is quarantined, not attempted."""
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def settings_of(cfg: PreprocessConfig) -> dict[str, Any]:
    """The preprocessing settings that define the cached output (stored in meta, part of the hash)."""
    return {**to_dict(cfg), "pipeline": PIPELINE_VERSION}


def prepare_study(study: Study, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray | None, StudyMeta]:
    """Read, check, reorient, resample and pad one study.

    Returns int16 HU (X, Y, Z), the optional uint8 label on the same grid, and the StudyMeta (without key, hashes).
    """
    image = read_image(study.image)  # (1, X, Y, Z) float32, affine voxel -> RAS mm
    original_shape = tuple(int(s) for s in image.shape[1:])
    original_affine = np.asarray(image.affine, dtype=np.float64)
    original_spacing = check_spacing(original_affine, cfg, study.image)
    rescale = manifest_rescale(study.extra, study.image)
    if rescale is not None and cfg.intensity == "hu" and needs_rescale(image.numpy()):
        image = image * rescale[0] + rescale[1]  # stored values -> HU (CT-RATE ships them separately)
    check_hu(image.numpy(), study.image, cfg.intensity)
    label = read_label(study.label, image) if study.label else None
    image, label = resample(image, label, cfg, study.image)
    volume, label_map, affine, pad = pad_to_min_size(
        image.numpy()[0], None if label is None else label.numpy()[0], np.asarray(image.affine), cfg.min_size
    )
    volume = to_int16(volume)
    meta = StudyMeta(
        id=study.id,
        key="",
        shape=tuple(int(s) for s in volume.shape),
        spacing=tuple(round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)),
        affine=affine.tolist(),
        source=str(study.image),
        source_hash="",
        original_shape=original_shape,
        original_spacing=tuple(round(float(s), 6) for s in original_spacing),
        original_affine=original_affine.tolist(),
        original_orientation="".join(nib.orientations.aff2axcodes(original_affine)),
        pad=pad,
        hu_range=(float(volume.min()), float(volume.max())),
        preprocess=settings_of(cfg),
        label_source=str(study.label or ""),
    )
    return volume, None if label_map is None else label_map.astype(np.uint8), meta


def check_spacing(affine: np.ndarray, cfg: PreprocessConfig, source: Path) -> np.ndarray:
    """Voxel spacing (mm) from the affine's columns; StudyError for 0, non-finite or > ``cfg.max_spacing_mm``."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.isfinite(affine).all() or (spacing <= 1e-6).any() or (spacing > cfg.max_spacing_mm).any():
        raise StudyError(
            f"{source}: voxel spacing {tuple(round(float(s), 4) for s in spacing)} mm is absurd (zero, non-finite "
            f"or above preprocess.max_spacing_mm={cfg.max_spacing_mm:g}); the header is corrupt: fix or re-export it",
            kind="absurd spacing",
        )
    return spacing


def read_label(path: Path, image: MetaTensor) -> MetaTensor:
    """Read a label map that must share the image's grid and hold class indices 0..255."""
    label = read_image(path, what="label")
    if label.shape != image.shape or not np.allclose(label.affine, image.affine, rtol=0, atol=1e-3):
        raise StudyError(
            f"label {path} is on another grid than its image (shape {tuple(label.shape[1:])} vs "
            f"{tuple(image.shape[1:])}, or a different affine); resample the label onto the image grid",
            kind="label mismatch",
        )
    values = label.numpy()
    if values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.round(values)):
        raise StudyError(f"label {path}: values must be whole class indices 0..255", kind="label mismatch")
    label.affine = image.affine.clone()  # identical input grids -> identical output grids
    return label


def resample(
    image: MetaTensor, label: MetaTensor | None, cfg: PreprocessConfig, source: Path
) -> tuple[MetaTensor, MetaTensor | None]:
    """Reorient to ``cfg.orientation`` and resample to ``cfg.spacing`` (image bilinear, label nearest)."""
    # Orientation before spacing: resampling first would apply the target spacing to the wrong axes.
    orient = Orientation(axcodes=cfg.orientation, labels=AXIS_LABELS)
    image = orient(image)
    label = orient(label) if label is not None else None
    if cfg.spacing is None:
        return image, label
    current = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    voxels = float(np.prod(np.ceil(np.asarray(image.shape[1:]) * current / np.asarray(cfg.spacing))))
    if voxels > MAX_OUTPUT_VOXELS:
        raise StudyError(
            f"{source}: resampling {tuple(image.shape[1:])} voxels of {tuple(np.round(current, 4))} mm to "
            f"{cfg.spacing} mm gives {voxels:.3g} voxels; check the header spacing",
            kind="absurd spacing",
        )
    image = Spacing(pixdim=cfg.spacing, mode="bilinear", padding_mode="border", dtype=torch.float32)(image)
    if label is not None:
        label = Spacing(pixdim=cfg.spacing, mode="nearest", padding_mode="zeros", dtype=torch.float32)(
            label, output_spatial_shape=image.shape[1:]
        )
    return image, label


def pad_to_min_size(
    volume: np.ndarray, label: np.ndarray | None, affine: np.ndarray, min_size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[list[int]]]:
    """Pad (X, Y, Z) symmetrically up to ``min_size`` with air (labels: 0); shift the affine's origin to match.

    Returns the padded volume and label, the new affine and the padding ``[[before, after]] * 3`` in voxels.
    """
    need = np.maximum(np.asarray(min_size) - np.asarray(volume.shape), 0)
    before, after = need // 2, need - need // 2
    pad = [[int(b), int(a)] for b, a in zip(before, after)]
    affine = np.array(affine, dtype=np.float64)
    if not need.any():
        return volume, label, affine, pad
    volume = np.pad(volume, pad, constant_values=AIR_HU)
    label = None if label is None else np.pad(label, pad, constant_values=0)
    affine[:3, 3] -= affine[:3, :3] @ before  # voxel 0 of the padded grid sits `before` voxels earlier
    return volume, label, affine, pad
