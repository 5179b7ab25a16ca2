"""Real CT through preprocessing: slicerio's CTChest4 (+ its segmentation) and pyradiomics' lung1/lung2 (+ tumour).

Ground truth comes from the NRRD headers read with pynrrd, independently of MONAI: label volumes in mm^3 and label
centroids in RAS world coordinates must survive reorientation and resampling.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from studyfiles import write_jsonl
from t3d.config import PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.preprocess import preprocess_manifest

REPO = Path(__file__).resolve().parents[1]
RADIOMICS = (
    Path(os.environ.get("T3D_TESTDATA", REPO / ".venv" / "share" / "t3d-testdata")) / "pyradiomics-3.0.1" / "data"
)
SLICERIO = importlib.util.find_spec("slicerio")
SPACING = (2.0, 2.0, 2.5)  # coarse, to keep the test fast; the geometry checks do not depend on it


def _studies() -> list[tuple[str, Path, Path]]:
    found = []
    if SLICERIO is not None:
        data = Path(SLICERIO.submodule_search_locations[0]) / "data"
        found.append(("ctchest4", data / "CTChest4.nrrd", data / "Segmentation.seg.nrrd"))
    for name in ("lung1", "lung2"):
        found.append((name, RADIOMICS / f"{name}_image.nrrd", RADIOMICS / f"{name}_label.nrrd"))
    return found


STUDIES = _studies()
MISSING = [str(p) for _, image, label in STUDIES for p in (image, label) if not p.is_file()]
pytestmark = pytest.mark.skipif(
    bool(MISSING) or len(STUDIES) < 3,
    reason=f"real CT test data not installed (missing: {MISSING or 'slicerio'}); see BRIEF 'Real data'",
)


def _ras_world(header: dict, index: np.ndarray) -> np.ndarray:
    """pynrrd LPS header -> RAS world (mm) of voxel ``index`` (..., 3)."""
    lps = np.asarray(header["space origin"]) + index @ np.asarray(header["space directions"])
    return lps * [-1, -1, 1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    rows = [
        {"id": sid, "image": str(image), "label": str(label), "report": "Real CT."} for sid, image, label in STUDIES
    ]
    manifest = write_jsonl(out / "manifest.jsonl", rows)
    cfg = PreprocessConfig(spacing=SPACING, min_size=(32, 32, 32))
    summary = preprocess_manifest(manifest, out / "cache", cfg, root="/", progress=False)
    print(f"\nreal CT preprocessing at {SPACING} mm: {summary['seconds_per_processed_study']} s per study")
    assert summary["processed"] == len(STUDIES), (out / "cache" / "quarantine.json").read_text()
    return StudyCache(out / "cache")


@pytest.mark.parametrize("sid", [s[0] for s in STUDIES])
def test_orientation_spacing_and_hu(cache, sid):
    meta, image = cache.meta(sid), np.asarray(cache.image(sid))
    affine = np.array(meta.affine)
    assert nib.orientations.aff2axcodes(affine) == ("R", "A", "S") and (np.diag(affine)[:3] > 0).all()
    assert meta.spacing == SPACING and image.dtype == np.int16 and image.shape == meta.shape
    air = ((image > -1100) & (image < -900)).mean()
    lungs = ((image > -950) & (image < -600)).mean()
    bone = (image > 300).sum() * np.prod(SPACING)  # mm^3
    assert air > 0.1 and lungs > 0.05 and bone > 20_000, (air, lungs, bone)
    assert meta.hu_range[0] <= -1000 and meta.hu_range[1] > 1000


@pytest.mark.parametrize("sid", [s[0] for s in STUDIES])
def test_label_volume_and_position_preserved(cache, sid):
    _, _, label_path = next(s for s in STUDIES if s[0] == sid)
    source, header = nrrd.read(str(label_path))
    directions = np.asarray(header["space directions"], dtype=float)
    meta, label = cache.meta(sid), np.asarray(cache.label(sid))
    assert meta.has_label and label.shape == meta.shape
    # A structure in the outer half of a boundary slice may be cut: centroids agree within half a source voxel.
    tolerance = max(*SPACING, np.linalg.norm(directions, axis=1).max() / 2)
    for value in np.unique(source)[1:]:
        before, after = np.argwhere(source == value), np.argwhere(label == value)
        volume_ratio = len(after) * np.prod(SPACING) / (len(before) * abs(np.linalg.det(directions)))
        assert abs(volume_ratio - 1) < 0.1, (value, volume_ratio)
        centre_after = (np.array(meta.affine) @ np.array([*after.mean(0), 1.0]))[:3]
        np.testing.assert_allclose(centre_after, _ras_world(header, before.mean(0)), atol=tolerance)


@pytest.mark.parametrize("sid", [s[0] for s in STUDIES])
def test_cached_voxels_show_the_source_at_the_same_world_point(cache, sid):
    """Map random cached voxels to RAS world, then back into the source grid (pynrrd, LPS): same content."""
    _, image_path, label_path = next(s for s in STUDIES if s[0] == sid)
    source_image, header = nrrd.read(str(image_path))
    source_label, _ = nrrd.read(str(label_path))
    meta, image, label = cache.meta(sid), np.asarray(cache.image(sid)), np.asarray(cache.label(sid))
    voxels = np.random.default_rng(0).integers(0, meta.shape, size=(20000, 3))
    voxels = np.concatenate([voxels, np.argwhere(label > 0)[:5000]])  # make sure structures are sampled
    ras = (np.array(meta.affine) @ np.c_[voxels, np.ones(len(voxels))].T)[:3].T
    lps = ras * [-1, -1, 1]
    index = np.linalg.solve(np.asarray(header["space directions"], float).T, (lps - header["space origin"]).T).T
    inside = np.all((index > -0.5) & (index < np.array(source_image.shape) - 0.5), axis=1)
    nearest = tuple(np.round(index[inside]).astype(int).T)
    cached = tuple(voxels[inside].T)
    structure = label[cached] > 0
    # > 0.95, not 1: a target voxel halfway between two source slices is a tie that rounding may break otherwise
    assert structure.sum() > 100 and (label[cached] == source_label[nearest])[structure].mean() > 0.95
    assert np.corrcoef(image[cached].astype(float), source_image[nearest].astype(float))[0, 1] > 0.9
