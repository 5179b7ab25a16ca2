"""Is this volume in Hounsfield units? Checks run before anything is cached (docs/method.md §1).

CT stores HU: air about -1000, lung -900..-500, water 0, bone +300..+3000. Typical ways a volume arrives in
another domain, and how they are recognised (``intensity: hu``):

* 8-bit screenshots/exports: every value in 0..255;
* already-normalised arrays: every value in [-1, 1] (e.g. 0..1 after min-max scaling);
* stored values without the rescale intercept (0..4095 instead of -1024..3071): almost no voxel in the air range
  -1100..-800 HU. A chest or abdomen CT holds air around the body, in the lungs or in the bowel. The minimum alone
  would not do: scanners pad outside the reconstruction circle with -2000/-3024 *stored* values too;
* scaled values: the 99.9th percentile above 4095 HU (dense bone and contrast stay below; metal is rarer).

NaN/Inf voxels and constant volumes are rejected in both modes. Values below -1024 are kept as stored (padding
outside the field of view is air for every HU window). ``intensity: raw`` skips the domain checks for data known
to be HU (e.g. a tight crop without air).

Stored values can be rescaled from the manifest: columns ``RescaleSlope``/``RescaleIntercept`` (CT-RATE's
metadata CSV names; also ``rescale_slope``/``rescale_intercept``) are applied to a volume that holds no air, and
ignored for one that already does (it is HU already: applying the intercept twice would shift it by -1024).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from t3d.data.io import StudyError

INT16_MIN, INT16_MAX = -32768, 32767
AIR_RANGE = (-1100.0, -800.0)
"""HU of air (outside the body, bowel gas, most lung)."""
MIN_AIR_FRACTION = 1e-3
"""A CT in HU has at least this fraction of its voxels in ``AIR_RANGE``."""
P999_MAX_HU = 4095.0
"""The 99.9th percentile of a CT must be at or below this."""
RESCALE_COLUMNS = (("RescaleSlope", "RescaleIntercept"), ("rescale_slope", "rescale_intercept"))
_FIX = (
    "re-export the DICOM series as HU (rescale slope/intercept applied), add RescaleSlope/RescaleIntercept columns "
    "to the manifest, or, if the values are HU, set preprocess.intensity=raw (--preprocess.intensity raw)"
)


def check_hu(volume: np.ndarray, source: str | Path, mode: str = "hu") -> tuple[float, float]:
    """Raise StudyError unless ``volume`` (any shape, float) looks like CT HU; return its (min, max).

    ``mode="raw"`` keeps only the checks that no mode can survive (non-finite voxels, constant volume).
    """
    finite = np.isfinite(volume)
    if not finite.all():
        bad = int(volume.size - np.count_nonzero(finite))
        raise StudyError(
            f"{source}: {bad} NaN/Inf voxel(s) of {volume.size}; fix or re-export the volume",
            kind="non-finite voxels",
        )
    lo, hi = float(volume.min()), float(volume.max())
    if hi - lo < 1e-6:
        raise StudyError(f"{source}: every voxel is {lo:g} (blank volume)", kind="constant volume")
    if mode == "raw":
        return lo, hi
    if lo >= -1.0 and hi <= 1.0:
        raise StudyError(
            f"{source}: intensities {lo:.3g}..{hi:.3g} look already normalised, not HU; {_FIX}",
            kind="normalised intensities",
        )
    if lo >= 0.0 and hi <= 255.0:
        raise StudyError(
            f"{source}: intensities {lo:g}..{hi:g} look like an 8-bit export (0-255), not HU; {_FIX}",
            kind="8-bit export",
        )
    sample = _subsample(volume)
    if air_fraction(sample) < MIN_AIR_FRACTION:
        raise StudyError(
            f"{source}: almost no voxel in the air range {AIR_RANGE[0]:g}..{AIR_RANGE[1]:g} HU (values "
            f"{lo:g}..{hi:g}): these look like stored values without RescaleIntercept (0..4095 instead of "
            f"-1024..3071), not HU; {_FIX}",
            kind="no air",
        )
    p999 = float(np.percentile(sample, 99.9))
    if p999 > P999_MAX_HU:
        raise StudyError(
            f"{source}: 99.9th percentile {p999:g} > {P999_MAX_HU:g} HU (range {lo:g}..{hi:g}); the values look "
            f"scaled, not HU; {_FIX}",
            kind="implausible range",
        )
    return lo, hi


def air_fraction(volume: np.ndarray) -> float:
    """Fraction of voxels in ``AIR_RANGE``."""
    return float(np.count_nonzero((volume >= AIR_RANGE[0]) & (volume <= AIR_RANGE[1])) / max(volume.size, 1))


def manifest_rescale(extra: dict[str, Any], source: str | Path) -> tuple[float, float] | None:
    """(slope, intercept) from a manifest row's rescale columns, or None when it has none."""
    for slope_col, intercept_col in RESCALE_COLUMNS:
        if str(extra.get(slope_col, "")).strip() or str(extra.get(intercept_col, "")).strip():
            try:
                slope = float(extra.get(slope_col) or 1.0)
                intercept = float(extra.get(intercept_col) or 0.0)
            except (TypeError, ValueError):
                raise StudyError(
                    f"{source}: manifest {slope_col}/{intercept_col} must be numbers, got "
                    f"{extra.get(slope_col)!r}/{extra.get(intercept_col)!r}",
                    kind="bad rescale",
                ) from None
            if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
                raise StudyError(f"{source}: manifest rescale slope {slope} is unusable", kind="bad rescale")
            return slope, intercept
    return None


def needs_rescale(volume: np.ndarray) -> bool:
    """True when ``volume`` holds stored values rather than HU (no air), so a manifest rescale applies."""
    return air_fraction(_subsample(volume)) < MIN_AIR_FRACTION


def to_int16(volume: np.ndarray) -> np.ndarray:
    """Round to whole HU and clip to the int16 range."""
    return np.clip(np.rint(volume), INT16_MIN, INT16_MAX).astype(np.int16)


def _subsample(volume: np.ndarray, max_voxels: int = 2_000_000) -> np.ndarray:
    """A strided view with at most about ``max_voxels`` voxels (statistics of a whole CT are slow)."""
    step = max(1, int(np.ceil((volume.size / max_voxels) ** (1 / max(volume.ndim, 1)))))
    return volume[(slice(None, None, step),) * volume.ndim]
