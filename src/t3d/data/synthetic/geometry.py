"""The voxel grid of a synthetic study and the shapes and textures painted into it.

Geometry is RAS+: array axis 0 is x (index up = patient right), axis 1 is y (anterior), axis 2 is z (superior),
and the volume is centred on the world origin (see ``anatomy.py`` for how the body frame maps onto it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LEFT = -1.0
"""World x direction of the patient's left: in RAS+ world +x points to the patient's right, so left is -x."""


@dataclass(frozen=True)
class Grid:
    """Voxel grid: ``shape`` (X, Y, Z) voxels, ``spacing`` mm per voxel, centred on the RAS world origin."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def origin(self) -> np.ndarray:
        """World (mm) of voxel (0, 0, 0)."""
        return -(np.asarray(self.shape, float) - 1) / 2 * np.asarray(self.spacing, float)

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel index -> RAS world mm."""
        aff = np.diag([*map(float, self.spacing), 1.0])
        aff[:3, 3] = self.origin
        return aff

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates (mm) of voxel centres along x, y, z, float32."""
        return tuple(
            (o + np.arange(n) * s).astype(np.float32) for o, n, s in zip(self.origin, self.shape, self.spacing)
        )

    def world(self, index) -> np.ndarray:
        """Voxel index (3,) -> world mm (3,)."""
        return self.origin + np.asarray(index, float) * np.asarray(self.spacing, float)


def ellipsoid(grid: Grid, centre, radii, angle: float = 0.0) -> tuple[tuple[slice, ...], np.ndarray]:
    """Voxels inside an ellipsoid, computed only in its bounding box.

    ``centre``/``radii`` are world mm (x, y, z); ``angle`` (radians) rotates it in-plane about z. Returns the
    bounding-box slices and a bool mask of that box (empty box when the ellipsoid misses the grid).
    """
    axes = grid.axes()
    reach = (max(radii[0], radii[1]),) * 2 if angle else tuple(radii[:2])
    slices = []
    for ax, c, r in zip(axes, centre, (*reach, radii[2])):
        lo, hi = np.searchsorted(ax, c - r), np.searchsorted(ax, c + r, side="right")
        slices.append(slice(int(lo), int(max(lo, hi))))
    x, y, z = (ax[s] - c for ax, s, c in zip(axes, slices, centre))
    cos, sin = np.cos(angle), np.sin(angle)
    xr = x[:, None] * cos + y[None, :] * sin  # (x, y) rotated into the ellipsoid's frame
    yr = -x[:, None] * sin + y[None, :] * cos
    q = (xr / radii[0]) ** 2 + (yr / radii[1]) ** 2
    return tuple(slices), q[:, :, None] + ((z / radii[2]) ** 2)[None, None, :] <= 1.0


def smooth_noise(shape, sigma_vox, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise of unit standard deviation, float32 ``shape``.

    Wide kernels are applied on a grid coarsened by an integer factor and expanded back (repeat + a short
    blur), which keeps a 10 M-voxel field at a few hundred ms whatever the correlation length.
    """
    sigma = np.maximum(np.asarray(sigma_vox, float), 1e-3)
    factor = np.maximum(1, (sigma // 3).astype(int))
    coarse = rng.standard_normal(tuple(-(-np.asarray(shape) // factor)), dtype=np.float32)
    field_ = ndimage.gaussian_filter(coarse, sigma / factor, truncate=3.0)
    for ax, f in enumerate(factor):
        field_ = np.repeat(field_, f, axis=ax)
    field_ = field_[tuple(slice(0, n) for n in shape)]
    if factor.max() > 1:
        field_ = ndimage.gaussian_filter(field_, factor / 2.0, truncate=2.0)
    return field_ / max(float(field_.std()), 1e-6)
