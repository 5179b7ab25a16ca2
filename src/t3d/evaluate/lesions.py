"""Lesion crops for the lesion-level probe: crops centred on focal lesions vs crops at the same anatomical location
in studies without a lesion (docs/method.md §7).

    sites = lesion_sites(cache, ids, lesion_labels=(9, 10, 11, 12), crop_size=(64, 64, 32), seed=0)
    # [CropSite(study, key, centre, label=1, diameter_mm, group), CropSite(..., label=0, group) ...]

Lesions are the 26-connected components of each lesion class of a label map (as ``t3d.metrics.small_lesion_scores``
counts them), so any labelled MSD-layout dataset works (lung nodules, liver tumours) and the synthetic ground truth
(``ground_truth.jsonl``: ``size_mm``, ``centre_voxel``) is a cross-check, not the source. A positive crop is
centred on the component's voxel nearest its centroid, also near the volume's edge (the part of the crop outside the
volume is air, as ``read_crop`` fills it), so the lesion is always at the crop centre. "Same anatomical location" is
the lesion's position relative to the body's bounding box (the cache's body voxels, HU > -500): a negative for a
lesion at relative position r in [0, 1]^3 is centred at ``lo + r (hi - lo)`` of the body box of a lesion-free study
of the same train / validation / test split. A negative crop never holds a lesion voxel: negatives come only from
studies with no voxel of any lesion class, and every negative
window is checked against the label map again before it is returned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from t3d.data.cache import StudyCache
from t3d.data.crops import select_studies
from t3d.data.synthetic.findings import FOCAL
from t3d.metrics import equivalent_diameter_mm


@dataclass(frozen=True)
class Lesion:
    """One connected component of a lesion class."""

    label: int
    centre: tuple[int, int, int]
    """Voxel of the component nearest its centroid (always a lesion voxel)."""
    voxels: int
    diameter_mm: float
    """Equivalent-sphere diameter (``t3d.metrics.equivalent_diameter_mm``)."""


@dataclass(frozen=True)
class CropSite:
    """Where one probe crop is cut: its study, centre voxel and label (1 = holds a lesion at its centre)."""

    study: str
    key: str
    """Cache key of the study."""
    centre: tuple[int, int, int]
    label: int
    diameter_mm: float
    """The lesion's diameter for a positive; for a negative, that of the positive it is matched to."""
    group: int
    """Index of the positive this site belongs to (a positive and its matched negatives share it)."""
    lesion_class: int = 0
    """Label-map class of the lesion (a negative carries that of its positive); 0 where unknown."""


def find_lesions(label: np.ndarray, lesion_labels: Sequence[int], spacing: Sequence[float]) -> list[Lesion]:
    """The 26-connected components of every class in ``lesion_labels`` of an (X, Y, Z) label map."""
    structure = ndimage.generate_binary_structure(3, 3)
    label = np.asarray(label)
    out = []
    for value in lesion_labels:
        components, count = ndimage.label(label == value, structure=structure)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            idx = np.argwhere(components[box] == index) + np.array([sl.start for sl in box])
            centre = idx[np.argmin(((idx - idx.mean(axis=0)) ** 2).sum(axis=1))]
            diameter = equivalent_diameter_mm(len(idx), spacing)
            out.append(Lesion(int(value), tuple(int(c) for c in centre), len(idx), float(diameter)))
    return out


def body_box(foreground: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) voxel corners of the body's bounding box; the whole volume when there are no body voxels."""
    fg = np.asarray(foreground).reshape(-1, 3)
    if len(fg) == 0:
        return np.zeros(3, np.int64), np.asarray(shape, np.int64) - 1
    return fg.min(axis=0).astype(np.int64), fg.max(axis=0).astype(np.int64)


def relative_position(centre: Sequence[int], box: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Position of a voxel in the body box, in [0, 1] per axis (0.5 where the box is one voxel thick)."""
    lo, hi = box
    extent = (hi - lo).astype(float)
    rel = np.where(extent > 0, (np.asarray(centre) - lo) / np.maximum(extent, 1), 0.5)
    return np.clip(rel, 0.0, 1.0)


def window_has_lesion(label: np.ndarray, centre: Sequence[int], size: Sequence[int], lesion_labels) -> bool:
    """Whether the crop of ``size`` centred at ``centre`` (as ``read_crop`` cuts it) holds a lesion voxel."""
    start = np.asarray(centre) - np.asarray(size) // 2
    box = tuple(slice(max(int(s), 0), max(int(s) + int(n), 0)) for s, n in zip(start, size))
    return bool(np.isin(np.asarray(label[box]), list(lesion_labels)).any())


@dataclass
class _Study:
    id: str
    key: str
    shape: tuple[int, int, int]
    box: tuple[np.ndarray, np.ndarray]
    lesions: list[Lesion]


def _scan(cache: StudyCache, ids: Sequence[str] | None, lesion_labels: Sequence[int]) -> list[_Study]:
    studies = []
    for _, row in select_studies(cache, ids):
        label = cache.label(row["key"])
        if label is None:
            raise ValueError(
                f"study '{row['id']}' has no label map in {cache.root}; the lesion probe needs a labelled dataset "
                "(preprocess the MSD dataset.json, whose entries carry labels)"
            )
        meta = cache.meta(row["key"])
        box = body_box(cache.foreground(row["key"]), label.shape)
        lesions = find_lesions(label, lesion_labels, meta.spacing)
        studies.append(_Study(row["id"], row["key"], tuple(label.shape), box, lesions))
    return studies


def lesion_sites(
    cache: StudyCache | str,
    ids: Sequence[str] | None,
    lesion_labels: Sequence[int],
    crop_size: Sequence[int],
    negatives_per_lesion: int = 1,
    seed: int = 0,
    split_of: dict[str, str] | None = None,
) -> list[CropSite]:
    """Positive sites (one per lesion) and ``negatives_per_lesion`` location-matched negatives each.

    Negatives are drawn (seeded, with replacement over positives) from the studies of ``ids`` with no lesion
    voxel at all and, given ``split_of`` (study id -> train / val / test), from the positive's own split: a
    matched pair never straddles two splits. Pairs that straddle make any location feature anti-predictive on the
    held-out split (its negatives sit where the *training* positives are, so a probe that learnt "lesions are
    here" scores them high): AUROC below 0.5 even for a position-only feature. With no lesion-free study in a
    split, its positives get no negative (the probe then reports the split unusable).
    """
    cache = cache if isinstance(cache, StudyCache) else StudyCache(cache)
    size = np.asarray(crop_size, np.int64)
    studies = _scan(cache, ids, lesion_labels)
    split_of = split_of or {}
    clean: dict[str, list[_Study]] = {}
    for s in studies:
        if not s.lesions:
            clean.setdefault(split_of.get(s.id, ""), []).append(s)
    rng = np.random.default_rng(seed)
    sites: list[CropSite] = []
    group = -1
    for study in studies:
        for lesion in study.lesions:
            group += 1
            centre = tuple(int(c) for c in lesion.centre)
            sites.append(CropSite(study.id, study.key, centre, 1, lesion.diameter_mm, group, lesion.label))
            rel = relative_position(lesion.centre, study.box)
            pool = clean.get(split_of.get(study.id, ""), [])
            for _ in range(negatives_per_lesion if pool else 0):
                other = pool[int(rng.integers(len(pool)))]
                sites.append(_negative(cache, other, rel, size, lesion, group, lesion_labels))
    return sites


def _negative(cache, study: _Study, rel, size, lesion: Lesion, group: int, lesion_labels) -> CropSite:
    lo, hi = study.box
    target = np.round(lo + rel * (hi - lo)).astype(np.int64)
    centre = tuple(int(c) for c in np.clip(target, 0, np.asarray(study.shape) - 1))
    if window_has_lesion(cache.label(study.key), centre, size, lesion_labels):
        raise RuntimeError(f"negative crop at {centre} of lesion-free study '{study.id}' holds a lesion voxel")
    return CropSite(study.id, study.key, centre, 0, lesion.diameter_mm, group, lesion.label)


def cross_check(cache: StudyCache | str, ground_truth: str | Path, lesion_labels: Sequence[int]) -> dict:
    """Compare the lesions found in the label maps with the synthetic ground truth (``ground_truth.jsonl``).

    Per cached study listed in the ground truth: the focal findings of a lesion class it records vs the connected
    components found; where the cached grid is the generator's (same shape: native spacing), also whether each
    recorded ``centre_voxel`` lies on a voxel of its class. Returns counts and the median of component diameter /
    recorded ``size_mm``. Lesions are drawn apart from each other, so counts should agree exactly.
    """
    cache = cache if isinstance(cache, StudyCache) else StudyCache(cache)
    records = {}
    for line in Path(ground_truth).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records[str(record["id"])] = record
    out = {"studies": 0, "recorded": 0, "found": 0, "studies_agreeing": 0, "centres_checked": 0, "centres_on_lesion": 0}
    ratios = []
    for _, row in select_studies(cache, None):
        record = records.get(row["id"])
        label = cache.label(row["key"])
        if record is None or label is None:
            continue
        focal = [f for f in record["findings"] if f["type"] in FOCAL and f["label"] in set(lesion_labels)]
        found = find_lesions(label, lesion_labels, cache.meta(row["key"]).spacing)
        out["studies"] += 1
        out["recorded"] += len(focal)
        out["found"] += len(found)
        out["studies_agreeing"] += int(len(focal) == len(found))
        if tuple(label.shape) == tuple(record.get("shape", ())):
            for f in focal:
                out["centres_checked"] += 1
                out["centres_on_lesion"] += int(label[tuple(f["centre_voxel"])] == f["label"])
        sizes = sorted(f["size_mm"] for f in focal if f.get("size_mm"))
        if sizes and len(sizes) == len(found):
            ratios += [d / s for d, s in zip(sorted(les.diameter_mm for les in found), sizes)]
    out["median_diameter_over_size"] = float(np.median(ratios)) if ratios else float("nan")
    return out
