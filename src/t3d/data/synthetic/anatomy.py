"""A synthetic torso (lower chest + upper abdomen) painted voxel by voxel into a tissue map, then rendered to HU.

Geometry is RAS+ (the NIfTI / nibabel / MONAI world): array axis 0 is x (index up = patient **right**), axis 1
is y (up = anterior), axis 2 is z (up = superior); the affine is ``diag(+spacing)`` with the volume centred on the
world origin. So the liver (patient right) sits at high x index, the spleen (patient left) at low x index and the
lungs at high z index. (DICOM's LPS+ is the frame where +x is patient left; nothing here uses it.)

Positions are written in a body frame whose lateral coordinate ``u`` is positive towards the patient's **left**
(the way anatomy is described); ``LEFT`` turns it into world x, and in-plane rotation angles follow the same
mirror (``_angle``), so every left/right choice lives in one place.

Anatomy scales with the field of view: in-plane positions and radii are fractions of the body's semi-axes, which
are 80-92 % of the half field of view; heights are fractions of the z extent. Every preset therefore contains
every organ, while lesions (``findings.py``) keep absolute sizes in mm.

Painting is a painter's algorithm on a uint8 *tissue* map plus the label map: later structures override
earlier ones, so the liver's dome carves the right lung base and the spine cuts the posterior lungs. Each
tissue has a per-study HU value and a texture amplitude (lookup tables); ``render`` turns the tissue map into
int16 HU with partial-volume blur, smoothed-noise texture and Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy import ndimage

from t3d.data.synthetic.geometry import LEFT, Grid, ellipsoid, smooth_noise

ORGAN_LABELS = {
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "aorta": 5,
    "lung_left": 6,
    "lung_right": 7,
    "vertebrae": 8,
}


class Tissue(IntEnum):
    """Tissue ids of the internal tissue map; ids >= ``FIRST_LESION`` are allocated per lesion."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    VISCERAL_FAT = 3
    BOWEL = 4
    GAS = 5
    LUNG = 6
    VESSEL = 7
    HEART = 8
    LIVER = 9
    SPLEEN = 10
    CORTEX = 11
    MEDULLA = 12
    AORTA = 13
    IVC = 14
    STOMACH_WALL = 15
    STOMACH_FLUID = 16
    BONE_CORTEX = 17
    MARROW = 18
    DISC = 19
    CSF = 20
    RIB = 21


FIRST_LESION = 32


TISSUES = {
    # tissue: (HU range unenhanced, HU range with contrast, texture amplitude HU)
    Tissue.AIR: ((-1000, -1000), (-1000, -1000), 0),
    Tissue.FAT: ((-110, -85), (-110, -85), 6),
    Tissue.MUSCLE: ((40, 60), (40, 60), 8),
    Tissue.VISCERAL_FAT: ((-105, -80), (-105, -80), 8),
    Tissue.BOWEL: ((20, 40), (40, 60), 12),
    Tissue.GAS: ((-950, -950), (-950, -950), 30),
    Tissue.LUNG: ((-880, -830), (-880, -830), 18),
    Tissue.VESSEL: ((35, 50), (150, 250), 10),  # blood: vessels, heart and aorta share one value per study
    Tissue.HEART: ((35, 50), (150, 250), 5),
    Tissue.AORTA: ((35, 50), (150, 250), 4),
    Tissue.LIVER: ((55, 65), (65, 78), 7),
    Tissue.SPLEEN: ((45, 58), (60, 75), 6),  # unenhanced: 5-12 HU below the liver
    Tissue.CORTEX: ((30, 38), (130, 170), 6),
    Tissue.MEDULLA: ((25, 33), (70, 100), 6),
    Tissue.IVC: ((35, 50), (90, 130), 4),
    Tissue.STOMACH_WALL: ((35, 45), (35, 45), 5),
    Tissue.STOMACH_FLUID: ((5, 20), (5, 20), 3),
    Tissue.BONE_CORTEX: ((700, 1000), (700, 1000), 40),
    Tissue.MARROW: ((250, 350), (250, 350), 35),
    Tissue.DISC: ((70, 95), (70, 95), 6),
    Tissue.CSF: ((5, 15), (5, 15), 3),
    Tissue.RIB: ((350, 600), (350, 600), 40),
}
"""Per-tissue attenuation ranges (a value is drawn per study) and smoothed-noise texture amplitude."""


@dataclass
class Torso:
    """One study's anatomy: tissue and label maps on ``grid`` plus per-tissue HU / texture lookup tables."""

    grid: Grid
    tissue: np.ndarray  # uint8 (X, Y, Z)
    label: np.ndarray  # uint8 (X, Y, Z), ORGAN_LABELS (+ lesion labels once findings are drawn)
    hu: np.ndarray  # float32 (256,) tissue id -> HU
    texture: np.ndarray  # float32 (256,) tissue id -> texture amplitude HU
    contrast: bool
    noise_hu: float
    shape_params: dict = field(default_factory=dict)
    next_tissue: int = FIRST_LESION

    def new_tissue(self, hu: float, texture: float) -> int:
        """Allocate a tissue id with its own HU (one per lesion, so each can have its own attenuation)."""
        if self.next_tissue > 255:
            raise RuntimeError("synthetic torso: more than 224 lesion tissues in one study")
        tid, self.next_tissue = self.next_tissue, self.next_tissue + 1
        self.hu[tid], self.texture[tid] = hu, texture
        return tid

    def paint(self, sl, mask, tissue: int, label: int | None, within: np.ndarray | None = None) -> None:
        """Write ``tissue`` (and ``label`` unless None) where ``mask`` holds in box ``sl``; ``within`` clips it."""
        mask = np.broadcast_to(mask, self.tissue[sl].shape)  # masks may be (X, Y, 1) columns or (1, 1, Z) slabs
        if within is not None:
            mask = mask & within[sl]
        self.tissue[sl][mask] = tissue
        if label is not None:
            self.label[sl][mask] = label


def build_torso(grid: Grid, rng: np.random.Generator, spleen_scale: float = 1.0) -> Torso:
    """Sample one study's torso on ``grid``; ``spleen_scale`` > 1 enlarges the spleen (splenomegaly)."""
    contrast = bool(rng.random() < 0.35)
    hu, tex = np.zeros(256, np.float32), np.zeros(256, np.float32)
    for tissue, (plain, enhanced, texture) in TISSUES.items():
        hu[tissue], tex[tissue] = rng.uniform(*(enhanced if contrast else plain)), texture
    hu[[Tissue.HEART, Tissue.AORTA]] = hu[Tissue.VESSEL]
    if not contrast:
        hu[[Tissue.IVC, Tissue.SPLEEN]] = hu[Tissue.VESSEL], hu[Tissue.LIVER] - rng.uniform(5, 12)
    torso = Torso(
        grid,
        np.zeros(grid.shape, np.uint8),
        np.zeros(grid.shape, np.uint8),
        hu,
        tex,
        contrast,
        noise_hu=float(rng.uniform(10, 20)),
    )
    half_fov = min(grid.shape[0] * grid.spacing[0], grid.shape[1] * grid.spacing[1]) / 2
    p = torso.shape_params
    p.update(A=rng.uniform(0.80, 0.92) * half_fov, B=rng.uniform(0.58, 0.72) * half_fov)
    p.update(cy=rng.uniform(-0.04, 0.03) * half_fov, power=rng.uniform(2.1, 2.6), fat=rng.uniform(0.04, 0.12))
    p.update(
        muscle=rng.uniform(0.04, 0.07), w_d=rng.uniform(0.52, 0.62), z0=float(grid.origin[2] - grid.spacing[2] / 2)
    )
    p.update(Lz=grid.shape[2] * grid.spacing[2])
    cavity = _paint_body(torso, rng)
    _paint_abdomen(torso, rng, cavity, spleen_scale)
    _paint_spine(torso, rng)
    _paint_lung_vessels(torso, rng)
    return torso


def _mm(p: dict, u: float, v: float, w: float) -> tuple[float, float, float]:
    """Body-relative (u, v in body semi-axes, u > 0 = patient left, v > 0 = anterior; w in 0..1 of the z extent)
    -> RAS+ world mm."""
    return (LEFT * u * p["A"], p["cy"] + v * p["B"], p["z0"] + w * p["Lz"])


def _angle(a: float) -> float:
    """In-plane rotation (radians) drawn in the body frame (u towards patient left) -> rotation in world x, y."""
    return LEFT * a


def _radii(p: dict, ru: float, rv: float, rw: float) -> tuple[float, float, float]:
    return (ru * p["A"], rv * p["B"], rw * p["Lz"])


def _paint_body(torso: Torso, rng: np.random.Generator) -> np.ndarray:
    """Skin-fat-muscle wall (superellipse, slowly varying with z), cavity fat, bowel, lungs; returns the cavity."""
    p, grid = torso.shape_params, torso.grid
    xs, ys, zs = grid.axes()
    w = (zs - p["z0"]) / p["Lz"]
    rho = (np.abs(xs[:, None] / p["A"]) ** p["power"] + np.abs((ys[None, :] - p["cy"]) / p["B"]) ** p["power"]) ** (
        1 / p["power"]
    )  # (X, Y) superellipse radius, 1 on the skin
    scale = 1 + 0.03 * np.sin(2 * np.pi * w + rng.uniform(0, 2 * np.pi))  # (Z,)
    inner = scale - p["fat"] - p["muscle"]
    torso.tissue[rho[:, :, None] <= scale] = Tissue.FAT
    torso.tissue[rho[:, :, None] <= scale - p["fat"]] = Tissue.MUSCLE
    cavity = rho[:, :, None] <= inner
    torso.tissue[cavity] = Tissue.VISCERAL_FAT
    # Ribs: oblique bands in the inner chest wall, descending from the spine towards the front, so an axial
    # slice cuts a row of separate rib sections; sternum and spine regions are spared.
    theta = np.arctan2((ys[None, :] - p["cy"]) / p["B"], xs[:, None] / p["A"])  # (X, Y), -pi/2 = posterior
    from_spine = np.abs(np.mod(theta + np.pi / 2 + np.pi, 2 * np.pi) - np.pi)  # (X, Y) 0 at spine, pi at sternum
    spared = (from_spine > np.pi - 0.25) | (from_spine < 0.5)
    thick = max(0.35 * p["muscle"], 1.5 * grid.spacing[0] / p["A"])
    period = p["Lz"] / rng.uniform(7, 9)
    drop = rng.uniform(0.25, 0.4) * p["A"] * from_spine  # (X, Y) mm the rib has descended since the spine
    ring = (rho > inner.min()) & ~spared  # (X, Y) candidate columns, refined per slice below
    pos = ((zs[None, None, :] - p["z0"] + drop[:, :, None]) / period + rng.uniform()) % 1  # (X, Y, Z)
    ribs = (pos < 0.3) & ring[:, :, None] & (rho[:, :, None] > inner) & (rho[:, :, None] <= inner + thick)
    torso.tissue[ribs & (w > p["w_d"] - 0.3)] = Tissue.RIB
    # Bowel loops and gas pockets fill the abdominal cavity below the diaphragm.
    k_top = int(np.searchsorted(w, p["w_d"] - 0.02))
    if k_top > 0:
        sub = (slice(None), slice(None), slice(0, k_top))
        sig = [8.0 / s for s in grid.spacing]
        loops = smooth_noise(cavity[sub].shape, sig, rng) > rng.uniform(-0.3, 0.3)
        gas = smooth_noise(cavity[sub].shape, [4.0 / s for s in grid.spacing], rng) > 1.6
        torso.tissue[sub][cavity[sub] & loops] = Tissue.BOWEL
        torso.tissue[sub][cavity[sub] & loops & gas] = Tissue.GAS
    # Lungs: in-plane ellipses whose base is a dome (centre higher than the costophrenic periphery).
    for name, u_c, ru in (("lung_right", -0.45, 0.40), ("lung_left", 0.47, 0.38)):
        x_c, y_c, _ = _mm(p, u_c, rng.uniform(-0.04, 0.04), 0)
        q = ((xs[:, None] - x_c) / (ru * p["A"])) ** 2 + ((ys[None, :] - y_c) / (0.80 * p["B"])) ** 2  # (X, Y)
        floor = p["w_d"] - 0.10 + 0.12 * (1 - np.minimum(q, 1))  # (X, Y) lung base height
        lung = (q[:, :, None] <= 1) & (w[None, None, :] > floor[:, :, None]) & cavity
        torso.paint((slice(None),) * 3, lung, Tissue.LUNG, ORGAN_LABELS[name])
    heart = _mm(p, 0.10, 0.35, p["w_d"] + 0.12)  # slightly to the patient's left
    sl, m = ellipsoid(grid, heart, _radii(p, 0.30, 0.33, 0.14), _angle(rng.uniform(-0.3, 0)))
    torso.paint(sl, m, Tissue.HEART, 0, cavity)
    return cavity


def _jitter(rng: np.random.Generator, values, scale: float = 0.06) -> tuple[float, ...]:
    return tuple(float(v * (1 + rng.uniform(-scale, scale))) for v in values)


def _paint_abdomen(torso: Torso, rng: np.random.Generator, cavity: np.ndarray, spleen_scale: float) -> None:
    """Stomach, liver (right lobe + left lobe), spleen, kidneys (cortex + medulla), clipped to the cavity."""
    p, grid, wd = torso.shape_params, torso.grid, torso.shape_params["w_d"]
    # Stomach: wall, fluid, and gas rising anteriorly (the patient lies supine).
    c, r, a = _mm(p, 0.32, 0.30, wd - 0.08), _radii(p, *_jitter(rng, (0.22, 0.28, 0.10))), _angle(rng.uniform(0.3, 0.7))
    sl, m = ellipsoid(grid, c, r, a)
    torso.paint(sl, m, Tissue.STOMACH_WALL, 0, cavity)
    wall = max(3.0, 1.2 * grid.spacing[0])
    sl, m = ellipsoid(grid, c, (r[0] - wall, r[1] - wall, r[2] - wall), a)
    torso.paint(sl, m, Tissue.STOMACH_FLUID, 0, cavity)
    ys = grid.axes()[1][sl[1]]
    torso.paint(sl, m & (ys > c[1] + rng.uniform(0.2, 0.5) * r[1])[None, :, None], Tissue.GAS, 0, cavity)
    # Liver: a large right lobe whose dome carves the right lung base, plus the left lobe crossing the midline.
    lv = ORGAN_LABELS["liver"]
    for (u, v, dw), radii in (((-0.40, 0.05, -0.17), (0.52, 0.78, 0.22)), ((0.05, 0.42, -0.09), (0.32, 0.32, 0.11))):
        c = _mm(p, u + rng.uniform(-0.03, 0.03), v + rng.uniform(-0.03, 0.03), wd + dw)
        sl, m = ellipsoid(grid, c, _radii(p, *_jitter(rng, radii)), _angle(rng.uniform(-0.2, 0.2)))
        torso.paint(sl, m, Tissue.LIVER, lv, cavity)
    # Spleen: posterolateral left; splenomegaly scales it and pushes it anteriorly and inferiorly.
    f = spleen_scale
    c = _mm(p, 0.62, -0.28 + 0.15 * (f - 1), wd - 0.13 - 0.10 * (f - 1))
    r = _radii(p, *(f * x for x in _jitter(rng, (0.14, 0.30, 0.11))))
    sl, m = ellipsoid(grid, c, r, _angle(rng.uniform(-0.8, -0.4)))
    torso.paint(sl, m, Tissue.SPLEEN, ORGAN_LABELS["spleen"], cavity)
    # Kidneys: posterior, lateral to the spine; the right one lower (the liver pushes it down).
    for name, sign, dw in (("kidney_left", 1, -0.33), ("kidney_right", -1, -0.37)):  # sign: +1 = patient left
        c = _mm(p, sign * rng.uniform(0.31, 0.37), rng.uniform(-0.44, -0.36), wd + dw + rng.uniform(-0.02, 0.02))
        r, a = _radii(p, *_jitter(rng, (0.15, 0.22, 0.13))), _angle(sign * rng.uniform(0.3, 0.7))
        sl, m = ellipsoid(grid, c, r, a)
        torso.paint(sl, m, Tissue.CORTEX, ORGAN_LABELS[name], cavity)
        hilum_x = c[0] - LEFT * sign * 0.15 * r[0]  # medulla shifted medially, towards the hilum
        sl, m = ellipsoid(grid, (hilum_x, c[1], c[2]), tuple(0.55 * x for x in r), a)
        torso.paint(sl, m, Tissue.MEDULLA, ORGAN_LABELS[name], cavity)


def _paint_spine(torso: Torso, rng: np.random.Generator) -> None:
    """Paraspinal and psoas muscles, vertebrae (cortical shell, marrow, discs, canal, arch), aorta and IVC."""
    p, grid, wd = torso.shape_params, torso.grid, torso.shape_params["w_d"]
    xs, ys, zs = grid.axes()
    w = (zs - p["z0"]) / p["Lz"]
    full_z = 10.0  # z radius (fraction of the z extent) that makes an ellipsoid a column through the volume
    y_vb, r_vb = p["cy"] - rng.uniform(0.36, 0.42) * p["B"], rng.uniform(0.14, 0.17) * p["A"]
    for sign in (1, -1):
        sl, m = ellipsoid(grid, (sign * 0.14 * p["A"], y_vb - 0.28 * p["B"], 0), _radii(p, 0.11, 0.16, full_z))
        torso.paint(sl, m, Tissue.MUSCLE, 0)
        sl, m = ellipsoid(grid, (sign * 0.21 * p["A"], y_vb, p["z0"]), _radii(p, 0.07, 0.09, wd - 0.2))
        torso.paint(sl, m, Tissue.MUSCLE, 0)
    r2 = xs[:, None] ** 2 + (ys[None, :] - y_vb) ** 2  # (X, Y) squared distance to the vertebral body axis
    shell = max(1.5, 0.6 * grid.spacing[0])
    period = 1 / rng.integers(5, 8)
    phase = ((w / period + rng.uniform()) % 1)[None, None, :]  # (1, 1, Z) position within one vertebra
    body = (r2 <= r_vb**2)[:, :, None]
    vb = ORGAN_LABELS["vertebrae"]
    torso.paint((slice(None),) * 3, body, Tissue.BONE_CORTEX, vb)
    torso.paint(
        (slice(None),) * 3,
        body & (r2 <= (r_vb - shell) ** 2)[:, :, None] & (phase > 0.22) & (phase < 0.95),
        Tissue.MARROW,
        vb,
    )
    torso.paint((slice(None),) * 3, body & (phase < 0.17), Tissue.DISC, 0)
    # Posterior arch: a bony ring around the canal and the spinous process behind it.
    r_c = 0.06 * p["A"]
    y_c = y_vb - r_vb - 0.9 * r_c
    sl, m = ellipsoid(grid, (0, y_c - r_c - 0.1 * p["B"], 0), _radii(p, 0.03, 0.10, full_z))
    torso.paint(sl, m, Tissue.BONE_CORTEX, vb)
    sl, m = ellipsoid(grid, (0, y_c, 0), (r_c + max(3.0, grid.spacing[0]), r_c + max(3.0, grid.spacing[1]), 1e6))
    torso.paint(sl, m, Tissue.BONE_CORTEX, vb)
    sl, m = ellipsoid(grid, (0, y_c, 0), (r_c, r_c, 1e6))
    torso.paint(sl, m, Tissue.CSF, 0)
    # Aorta: anterior-left of the vertebral body, drifting to the left side of the spine in the chest.
    r_ao = rng.uniform(0.055, 0.07) * p["A"]
    t = np.clip((w - wd + 0.1) / 0.3, 0, 1)  # (Z,) 0 in the abdomen, 1 in the chest
    x_ao = LEFT * ((1 - t) * 0.07 * p["A"] + t * (r_vb + r_ao))  # (Z,) world mm, on the patient's left
    y_ao = y_vb + (1 - t) * (r_vb + r_ao + 1.0) + t * 0.3 * r_vb
    aorta = (xs[:, None, None] - x_ao) ** 2 + (ys[None, :, None] - y_ao) ** 2 <= r_ao**2
    torso.paint((slice(None),) * 3, aorta, Tissue.AORTA, ORGAN_LABELS["aorta"])
    # IVC: anterior-right of the vertebral body.
    c = (-LEFT * 0.10 * p["A"], y_vb + r_vb + 0.07 * p["B"], p["z0"])
    sl, m = ellipsoid(grid, c, _radii(p, 0.07, 0.05, wd + 0.02))
    torso.paint(sl, m, Tissue.IVC, 0)


def _paint_lung_vessels(torso: Torso, rng: np.random.Generator) -> None:
    """Branching-looking vessels: where two smooth random fields are both near zero (curves), thicker at the hila."""
    p, grid = torso.shape_params, torso.grid
    lung = (torso.tissue == Tissue.LUNG) & (torso.label > 0)
    k = np.flatnonzero(lung.any(axis=(0, 1)))
    if k.size == 0:
        return
    sub = (slice(None), slice(None), slice(int(k[0]), int(k[-1]) + 1))
    shape = lung[sub].shape
    sig = [0.035 * p["A"] / s for s in grid.spacing]
    n1, n2 = smooth_noise(shape, sig, rng), smooth_noise(shape, sig, rng)
    xs, ys, zs = grid.axes()
    zh = p["z0"] + (p["w_d"] + 0.25) * p["Lz"]
    d2 = (np.abs(xs)[:, None, None] - 0.15 * p["A"]) ** 2 + (ys[None, :, None] - p["cy"]) ** 2
    d2 = d2 + ((zs[sub[2]] - zh) ** 2)[None, None, :]  # (X, Y, z) squared distance to the nearer hilum
    t = 0.22 * (1 + 1.5 * np.exp(-d2 / (2 * (0.35 * p["A"]) ** 2)))
    vessels = lung[sub] & (np.abs(n1) < t) & (np.abs(n2) < t)
    torso.tissue[sub][vessels] = Tissue.VESSEL


def render(torso: Torso, rng: np.random.Generator) -> np.ndarray:
    """Tissue map -> int16 HU: scanner blur, tissue texture (smoothed noise) and CT noise, clipped."""
    grid = torso.grid
    # Scanner blur of ~0.8 mm (at most half a voxel): the tissue map is point-sampled, real voxels average.
    psf = [min(0.5, 0.8 / s) for s in grid.spacing]
    image = ndimage.gaussian_filter(torso.hu[torso.tissue], psf, truncate=3.0)  # (X, Y, Z) float32
    texture = smooth_noise(grid.shape, [1.5 / s for s in grid.spacing], rng)
    image += torso.texture[torso.tissue] * texture
    image += torso.noise_hu * rng.standard_normal(grid.shape, dtype=np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)
