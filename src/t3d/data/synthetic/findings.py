"""Findings of the synthetic benchmark: which ones a study has, and drawing them with exact ground truth.

Seven finding types (``FINDINGS``). Four are focal lesions with absolute sizes in mm and their own label
(liver lesion, renal cyst, lung nodule, kidney stone); pleural effusion is a labelled dependent fluid layer;
splenomegaly and hepatic steatosis change an organ (size, attenuation) and have no label of their own.

Every ground-truth record is measured from what was actually drawn: a lesion is placed with its centre on a
voxel centre (so even a 3 mm nodule at 5 mm spacing owns at least one voxel), fully inside its organ and apart
from other lesions; one that cannot be placed is dropped, so reports never describe something not in the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from t3d.data.synthetic.anatomy import ORGAN_LABELS, Tissue, Torso
from t3d.data.synthetic.geometry import LEFT, ellipsoid

FINDINGS = (
    "liver_lesion",
    "renal_cyst",
    "lung_nodule",
    "pleural_effusion",
    "splenomegaly",
    "hepatic_steatosis",
    "kidney_stone",
)
FOCAL = ("liver_lesion", "renal_cyst", "lung_nodule", "kidney_stone")
CSV_COLUMNS = {
    "liver_lesion": "Liver lesion",
    "renal_cyst": "Renal cyst",
    "lung_nodule": "Lung nodule",
    "pleural_effusion": "Pleural effusion",
    "splenomegaly": "Splenomegaly",
    "hepatic_steatosis": "Hepatic steatosis",
    "kidney_stone": "Kidney stone",
}
PREVALENCE = {
    "liver_lesion": 0.30,
    "renal_cyst": 0.25,
    "lung_nodule": 0.30,
    "pleural_effusion": 0.20,
    "splenomegaly": 0.20,
    "hepatic_steatosis": 0.20,
    "kidney_stone": 0.20,
}
"""Chance of each finding in an abnormal study (drawn independently, at least one)."""
NORMAL_SHARE = 0.20
"""Chance that a study is drawn normal. Marginal prevalence is then about 0.94 * PREVALENCE (18-28 %)."""

LESION_LABELS = {"liver_lesion": 9, "renal_cyst": 10, "lung_nodule": 11, "kidney_stone": 12, "pleural_effusion": 13}
LABEL_NAMES = {0: "background", **{v: k for k, v in ORGAN_LABELS.items()}, **{v: k for k, v in LESION_LABELS.items()}}

_COUNTS = {
    "liver_lesion": (0.45, 0.30, 0.15, 0.10),
    "renal_cyst": (0.75, 0.25),
    "lung_nodule": (0.6, 0.3, 0.1),
    "kidney_stone": (0.8, 0.2),
}
"""Probability of 1, 2, 3, ... lesions in a positive study."""


@dataclass(frozen=True)
class Plan:
    """What a study will show, decided before its anatomy is built."""

    present: tuple[str, ...]
    spleen_scale: float


def sample_plan(rng: np.random.Generator) -> Plan:
    """Draw the finding types of one study (``NORMAL_SHARE`` normal; otherwise independent, at least one)."""
    present: tuple[str, ...] = ()
    if rng.random() >= NORMAL_SHARE:
        while not present:
            present = tuple(f for f in FINDINGS if rng.random() < PREVALENCE[f])
    scale = rng.uniform(1.35, 1.7) if "splenomegaly" in present else rng.uniform(0.9, 1.08)
    return Plan(present, float(scale))


def _record(torso: Torso, kind: str, organ: str, mask_idx, label: int, **extra) -> dict:
    """A ground-truth entry; ``mask_idx`` are the (N, 3) voxels of the finding.

    The centre (unless given) is the finding's voxel nearest its centroid: a crescent of pleural fluid has its
    centroid in aerated lung, and the centre must point at the finding itself."""
    idx = np.asarray(mask_idx)
    centre = idx[np.argmin(((idx - idx.mean(axis=0)) ** 2).sum(axis=1))].tolist()
    return {
        "type": kind,
        "organ": organ,
        "side": extra.pop("side", None),
        "size_mm": extra.pop("size_mm", None),
        "centre_voxel": extra.pop("centre_voxel", centre),
        "label": int(label),
        "location": extra.pop("location", None),
        "voxels": int(len(mask_idx)),
        **extra,
    }


def draw_findings(torso: Torso, plan: Plan, rng: np.random.Generator) -> list[dict]:
    """Draw the planned findings into ``torso`` (tissue + label maps) and return their ground truth."""
    records: list[dict] = []
    present = set(plan.present)
    boxes = _organ_boxes(torso.label)  # before lesions override organ voxels
    if "hepatic_steatosis" in present:
        hu = round(float(rng.uniform(-10, 20)), 1)
        torso.hu[Tissue.LIVER] = hu
        liver = np.argwhere(torso.label == ORGAN_LABELS["liver"])
        records.append(_record(torso, "hepatic_steatosis", "liver", liver, ORGAN_LABELS["liver"], hu=hu))
    if "splenomegaly" in present:
        spleen = np.argwhere(torso.label == ORGAN_LABELS["spleen"])
        if len(spleen):
            length = float(np.ptp(spleen[:, 2]) + 1) * torso.grid.spacing[2]  # craniocaudal extent, mm
            size = {"size_mm": round(length, 1), "scale": round(plan.spleen_scale, 3)}
            records.append(_record(torso, "splenomegaly", "spleen", spleen, ORGAN_LABELS["spleen"], **size))
    if "pleural_effusion" in present:
        sides = (("left",), ("right",), ("left", "right"))[rng.choice(3, p=(0.4, 0.4, 0.2))]
        for side in sides:
            rec = _draw_effusion(torso, side, rng)
            if rec is not None:
                records.append(rec)
    if "liver_lesion" in present:
        records += _draw_liver_lesions(torso, boxes, rng)
    for kind in ("renal_cyst", "kidney_stone"):
        if kind in present:
            records += _draw_kidney_lesions(torso, kind, boxes, rng)
    if "lung_nodule" in present:
        records += _draw_nodules(torso, boxes, rng)
    return records


def _organ_boxes(label: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per organ, the (lo, hi) voxel corners (inclusive) of its bounding box, from one pass over the labels."""
    slices = ndimage.find_objects(label, max_label=max(ORGAN_LABELS.values()))
    boxes = {}
    for name, value in ORGAN_LABELS.items():
        sl = slices[value - 1]
        boxes[name] = (
            (np.array([s.start for s in sl]), np.array([s.stop - 1 for s in sl]))
            if sl
            else (np.zeros(3, int), np.zeros(3, int))
        )
    return boxes


def _fraction(box: tuple[np.ndarray, np.ndarray], index) -> np.ndarray:
    """Position of voxel ``index`` inside ``box`` as fractions 0..1 per axis, in patient terms: x from the
    patient's right (0) to left (1), y posterior -> anterior, z inferior -> superior.

    In the RAS+ grid the x index grows towards the patient's right (``geometry.LEFT`` is -x), so x is flipped."""
    lo, hi = box
    f = (np.asarray(index) - lo) / np.maximum(hi - lo, 1)
    if LEFT < 0:
        f[0] = 1 - f[0]
    return f


def _count(rng: np.random.Generator, kind: str) -> int:
    probs = _COUNTS[kind]
    return int(rng.choice(len(probs), p=probs)) + 1


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _place(
    torso: Torso,
    organ: tuple[int, ...],
    size_mm: float,
    min_mm: float,
    rng: np.random.Generator,
    candidates: np.ndarray | None = None,
    tries: int = 40,
):
    """Find room for a lesion of axial diameter ``size_mm`` inside the voxels labelled ``organ``.

    The lesion is an ellipsoid (axial diameters size and 0.75-1 x size, z 0.8-1.05 x size, random in-plane
    angle) centred on a voxel; with a half-voxel margin it must lie wholly in the organ and off other lesions.
    ``candidates`` (flat voxel indices) restricts the centres. After ``tries`` misses the size shrinks by 15 %,
    down to ``min_mm``. Returns ``(size_mm, centre index,
    box slices, mask)`` or ``None``.
    """
    grid = torso.grid
    if candidates is None:
        candidates = np.flatnonzero(np.isin(torso.label, organ))
    if len(candidates) == 0:
        return None
    ratios, angle = (1.0, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.05)), rng.uniform(0, np.pi)
    margin = 0.5 * max(grid.spacing)
    while size_mm >= min_mm:
        radii = tuple(size_mm / 2 * r for r in ratios)
        for _ in range(tries):
            centre = np.array(np.unravel_index(candidates[rng.integers(len(candidates))], grid.shape))
            c_mm = grid.world(centre)
            sl, outer = ellipsoid(grid, c_mm, tuple(r + margin for r in radii), angle)
            if any(s.stop - s.start < 1 for s in sl) or not np.isin(torso.label[sl][outer], organ).all():
                continue
            sl, mask = ellipsoid(grid, c_mm, radii, angle)
            mask = mask.copy()
            mask[tuple(int(c) - s.start for c, s in zip(centre, sl))] = True  # the centre voxel is always drawn
            if any(s.stop - s.start < 1 for s in sl) or not np.isin(torso.label[sl][mask], organ).all():
                continue
            return round(size_mm, 1), centre, sl, mask
        size_mm *= 0.85
    return None


def _lesion(torso: Torso, kind: str, organ: str, placed, hu: float, texture: float, **extra) -> dict:
    """Paint a placed lesion with its own tissue id and label; return its ground truth."""
    size, centre, sl, mask = placed
    torso.paint(sl, mask, torso.new_tissue(hu, texture), LESION_LABELS[kind])
    voxels = np.argwhere(mask) + np.array([s.start for s in sl])
    return _record(
        torso,
        kind,
        organ,
        voxels,
        LESION_LABELS[kind],
        size_mm=size,
        centre_voxel=[int(c) for c in centre],
        hu=round(hu, 1),
        **extra,
    )


def liver_segment(f: np.ndarray) -> tuple[str, str]:
    """Couinaud-like segment and lobe from the patient-frame position fraction in the liver box (``_fraction``:
    x patient right -> left, y posterior -> anterior, z inferior -> superior).

    Right lobe (V-VIII) right of a Cantlie line at 60 % of the width from the patient's right edge, split
    anterior/posterior and superior/inferior; medial left (IVa/IVb) to 80 %; lateral left (II superior, III
    inferior) beyond.
    """
    sup = f[2] >= 0.5
    if f[0] < 0.6:
        seg = ("VIII" if sup else "V") if f[1] >= 0.5 else ("VII" if sup else "VI")
        return seg, "right"
    if f[0] < 0.8:
        return ("IVa" if sup else "IVb"), "left"
    return ("II" if sup else "III"), "left"


def lung_lobe(side: str, f: np.ndarray) -> str:
    """Lobe from the position fraction in the lung box: the oblique fissure runs from posterior-superior to
    anterior-inferior; on the right the horizontal fissure sets off the anterior, lower-mid middle lobe."""
    if f[2] < 0.35 + 0.4 * (1 - f[1]):
        return f"{side} lower lobe"
    if side == "right" and f[2] < 0.55 and f[1] >= 0.5:
        return "right middle lobe"
    return f"{side} upper lobe"


def kidney_pole(f: np.ndarray) -> str:
    return "upper pole" if f[2] > 0.66 else "lower pole" if f[2] < 0.34 else "interpolar region"


def _draw_liver_lesions(torso: Torso, boxes: dict, rng: np.random.Generator) -> list[dict]:
    out = []
    liver_hu = float(torso.hu[Tissue.LIVER])
    for _ in range(_count(rng, "liver_lesion")):
        placed = _place(torso, (ORGAN_LABELS["liver"],), _log_uniform(rng, 4, 30), 4.0, rng)
        if placed is None:
            continue
        hypo = rng.random() < 0.7
        hu = liver_hu - rng.uniform(30, 60) if hypo else liver_hu + rng.uniform(30, 60)
        seg, lobe = liver_segment(_fraction(boxes["liver"], placed[1]))
        out.append(
            _lesion(
                torso,
                "liver_lesion",
                "liver",
                placed,
                hu,
                4.0,
                location=f"segment {seg}",
                segment=seg,
                lobe=lobe,
                density="hypodense" if hypo else "hyperdense",
            )
        )
    return out


def _draw_kidney_lesions(torso: Torso, kind: str, boxes: dict, rng: np.random.Generator) -> list[dict]:
    out = []
    for _ in range(_count(rng, kind)):
        side = ("left", "right")[int(rng.integers(2))]
        organ = f"kidney_{side}"
        value = ORGAN_LABELS[organ]
        if kind == "renal_cyst":
            placed = _place(torso, (value,), _log_uniform(rng, 5, 35), 5.0, rng)
            hu, texture = rng.uniform(0, 15), 2.0
        else:  # stones sit centrally, in the medulla / sinus region
            central = np.flatnonzero((torso.label == value) & (torso.tissue == Tissue.MEDULLA))
            placed = _place(torso, (value,), rng.uniform(3, 8), 3.0, rng, candidates=central)
            hu, texture = rng.uniform(400, 1000), 30.0
        if placed is not None:
            pole = kidney_pole(_fraction(boxes[organ], placed[1]))
            out.append(_lesion(torso, kind, organ, placed, hu, texture, side=side, location=pole))
    return out


def _draw_nodules(torso: Torso, boxes: dict, rng: np.random.Generator) -> list[dict]:
    out = []
    for _ in range(_count(rng, "lung_nodule")):
        side = ("left", "right")[int(rng.integers(2))]
        organ = f"lung_{side}"
        solid = rng.random() < 0.75
        size = _log_uniform(rng, 3, 15) if solid else _log_uniform(rng, 6, 15)
        placed = _place(torso, (ORGAN_LABELS[organ],), size, 3.0 if solid else 6.0, rng)
        if placed is None:
            continue
        hu = rng.uniform(20, 60) if solid else rng.uniform(-550, -300)
        lobe = lung_lobe(side, _fraction(boxes[organ], placed[1]))
        out.append(
            _lesion(
                torso,
                "lung_nodule",
                organ,
                placed,
                hu,
                6.0,
                side=side,
                location=lobe,
                solidity="solid" if solid else "ground-glass",
            )
        )
    return out


def _draw_effusion(torso: Torso, side: str, rng: np.random.Generator) -> dict | None:
    """Dependent fluid: the lung below a horizontal (supine: coronal) level that falls off towards the apex."""
    grid, value = torso.grid, ORGAN_LABELS[f"lung_{side}"]
    lung = torso.label == value
    ks = np.flatnonzero(lung.any(axis=(0, 1)))
    if ks.size == 0:
        return None
    severity, frac = (("small", (0.12, 0.22)), ("moderate", (0.25, 0.38)), ("large", (0.42, 0.55)))[
        int(rng.choice(3, p=(0.5, 0.35, 0.15)))
    ]
    yz = lung.any(axis=0)  # (Y, Z)
    ys = np.flatnonzero(yz.any(axis=1))
    depth = rng.uniform(*frac) * (ys[-1] - ys[0] + 1) * grid.spacing[1]  # mm of fluid at the base
    post = np.where(yz.any(axis=0), yz.argmax(axis=0), 0) * grid.spacing[1]  # (Z,) posterior lung edge, mm
    height = rng.uniform(0.5, 0.8) * (ks[-1] - ks[0] + 1)
    taper = np.clip(1 - (np.arange(grid.shape[2]) - ks[0]) / height, 0, 1)  # (Z,)
    level = post + depth * taper  # (Z,) fluid surface, mm from the y origin of the grid
    y_mm = (np.arange(grid.shape[1]) + 0.5) * grid.spacing[1]
    fluid = lung & (y_mm[None, :, None] < level[None, None, :])
    if not fluid.any():
        return None
    tid = torso.new_tissue(float(rng.uniform(5, 20)), 3.0)
    torso.paint((slice(None),) * 3, fluid, tid, LESION_LABELS["pleural_effusion"])
    thickness = float(fluid.sum(axis=1).max() * grid.spacing[1])  # deepest (x, z) column, mm
    return _record(
        torso,
        "pleural_effusion",
        "pleura",
        np.argwhere(fluid),
        LESION_LABELS["pleural_effusion"],
        side=side,
        size_mm=round(thickness, 1),
        severity=severity,
        hu=round(float(torso.hu[tid]), 1),
    )
