"""Preprocessing end to end on tiny volumes: bad inputs are quarantined, geometry is right, re-runs are idempotent."""

from __future__ import annotations

import json

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from studyfiles import ct_volume, tree_state, write_dicom_series, write_jsonl, write_nifti
from t3d.config import PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.manifest import ManifestError
from t3d.data.preprocess import preprocess_manifest

NATIVE = PreprocessConfig(spacing=None, min_size=(8, 8, 8))


def world(affine, index) -> np.ndarray:
    return (np.asarray(affine) @ np.array([*index, 1.0]))[:3]


def good_row(root, sid="good", **kw):
    write_nifti(root / f"{sid}.nii.gz", ct_volume(seed=len(sid)), spacing=(1.0, 1.0, 2.0))
    return {"id": sid, "image": f"{sid}.nii.gz", "report": "Normal chest.", **kw}


# ----------------------------------------------------------------------------------------------- bad inputs


def _nifti(root, name, data, **kw):
    write_nifti(root / name, data, **kw)
    return name


def _truncated(root):
    data = (root / "t.nii.gz").parent / "full.nii.gz"
    write_nifti(data, np.random.default_rng(0).normal(0, 300, (24, 24, 16)).astype(np.float32))
    raw = data.read_bytes()
    (root / "t.nii.gz").write_bytes(raw[: len(raw) // 2])
    data.unlink()
    return "t.nii.gz"


def _zero_pixdim(root):
    img = nib.Nifti1Image(ct_volume(), None)
    img.header.set_zooms((1.0, 1.0, 0.0))  # no qform/sform: the spacing comes from pixdim
    nib.save(img, str(root / "z.nii.gz"))
    return "z.nii.gz"


def _zero_nrrd(root):
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([1.0, 1.0, 0.0]),
        "space origin": [0, 0, 0],
    }
    nrrd.write(str(root / "z.nrrd"), ct_volume(), header)
    return "z.nrrd"


def _two_series(root):
    stored = (ct_volume() + 1024).astype(np.uint16)
    write_dicom_series(root / "dicom", stored, series_uid="1.2.826.0.1.1", prefix="a")
    write_dicom_series(root / "dicom", stored, series_uid="1.2.826.0.1.2", prefix="b")
    return "dicom"


def _mismatched_label(root):
    _nifti(root, "img.nii.gz", ct_volume())
    _nifti(root, "lab.nii.gz", np.zeros((20, 18, 11), np.uint8))
    return "img.nii.gz"


def _outside(root):
    _nifti(root.parent, "outside.nii.gz", ct_volume())
    return "../outside.nii.gz"


def _padded_stored():
    stored = ct_volume() + 1024  # air at ~24, as stored before RescaleIntercept
    stored[:3, :3, :] = -2000  # padding outside the reconstruction circle
    return stored


vol = ct_volume()
nan_vol, inf_vol = vol.astype(np.float32), vol.astype(np.float32)
nan_vol[3, 3, 3], inf_vol[4, 4, 4] = np.nan, np.inf
BAD = {
    "missing file": (lambda r: "nope.nii.gz", "missing file", "nope.nii.gz"),
    "corrupt file": (lambda r: (r / "c.nii.gz").write_bytes(b"garbage" * 50) and "c.nii.gz", "unreadable", "c.nii.gz"),
    "truncated file": (_truncated, "unreadable", "t.nii.gz"),
    "2D image": (lambda r: _nifti(r, "flat.nii.gz", vol[:, :, 0]), "2D image", "flat.nii.gz"),
    "4D image": (lambda r: _nifti(r, "t4.nii.gz", np.stack([vol] * 3, -1)), "4D image", "t4.nii.gz"),
    "NaN voxels": (lambda r: _nifti(r, "nan.nii.gz", nan_vol), "non-finite voxels", "nan.nii.gz"),
    "Inf voxels": (lambda r: _nifti(r, "inf.nii.gz", inf_vol), "non-finite voxels", "inf.nii.gz"),
    "8-bit export": (
        lambda r: _nifti(r, "u8.nii.gz", ((vol + 1024) / 16).clip(0, 255).astype(np.uint8)),
        "8-bit export",
        "preprocess.intensity=raw",
    ),
    "normalised 0-1": (
        lambda r: _nifti(r, "n.nii.gz", ((vol + 1024) / 2000).astype(np.float32)),
        "normalised intensities",
        "re-export the DICOM series",
    ),
    "no air (intercept missing)": (lambda r: _nifti(r, "raw.nii.gz", vol + 1024), "no air", "RescaleIntercept"),
    "no air, padded stored values": (lambda r: _nifti(r, "pad.nii.gz", _padded_stored()), "no air", "pad.nii.gz"),
    "zero spacing (NIfTI pixdim)": (_zero_pixdim, "absurd spacing", "z.nii.gz"),
    "zero spacing (NRRD)": (_zero_nrrd, "absurd spacing", "z.nrrd"),
    "spacing above max": (lambda r: _nifti(r, "s.nii.gz", vol, spacing=(1, 1, 25)), "absurd spacing", "25"),
    "two DICOM series": (_two_series, "multiple DICOM series", "1.2.826.0.1.2"),
    "path escaping root": (_outside, "outside data root", "outside.nii.gz"),
    "unknown format": (lambda r: (r / "x.png").write_bytes(b"png") and "x.png", "unknown format", "x.png"),
    "label mismatch": (_mismatched_label, "label mismatch", "lab.nii.gz"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_quarantined_and_the_rest_processed(tmp_path, case):
    root = tmp_path / "root"
    root.mkdir()
    make, kind, fragment = BAD[case]
    bad = {"id": "bad", "image": make(root), "report": "Some text."}
    if case == "label mismatch":
        bad["label"] = "lab.nii.gz"
    manifest = write_jsonl(root / "m.jsonl", [good_row(root), bad])
    before = tree_state(tmp_path)
    summary = preprocess_manifest(manifest, tmp_path / "cache", NATIVE, progress=False)
    assert (summary["processed"], summary["quarantined"], summary["reasons"]) == (1, 1, {kind: 1})
    (row,) = json.loads((tmp_path / "cache" / "quarantine.json").read_text())
    assert row["id"] == "bad" and row["kind"] == kind and fragment in row["reason"]
    assert [r["id"] for r in StudyCache(tmp_path / "cache").index()] == ["good"]
    assert tree_state(tmp_path) == {**before, **{k: v for k, v in tree_state(tmp_path).items() if "/cache/" in k}}


def test_empty_report_is_quarantined(tmp_path):
    rows = [good_row(tmp_path), {**good_row(tmp_path, "quiet"), "report": ""}]
    summary = preprocess_manifest(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "cache", NATIVE, progress=False)
    assert summary["reasons"] == {"empty report": 1} and summary["processed"] == 1


def test_report_bytes_not_utf8_quarantine_that_row_naming_its_line(tmp_path):
    good_row(tmp_path, "a")
    good_row(tmp_path, "b")
    body = b"id,image,report\na,a.nii.gz,Normal.\nb,b.nii.gz," + "Épanchement.".encode("latin-1") + b"\n"
    (tmp_path / "m.csv").write_bytes(body)
    summary = preprocess_manifest(tmp_path / "m.csv", tmp_path / "cache", NATIVE, progress=False)
    assert (summary["processed"], summary["reasons"]) == (1, {"not UTF-8": 1})
    (row,) = json.loads((tmp_path / "cache" / "quarantine.json").read_text())
    assert row["id"] == "b" and "line 3" in row["reason"] and "UTF-8" in row["reason"]


def test_manifest_rescale_columns_turn_stored_values_into_hu(tmp_path):
    hu = ct_volume()
    write_nifti(tmp_path / "stored.nii.gz", ((hu + 1024) // 2).astype(np.int16))  # slope 2, intercept -1024
    write_nifti(tmp_path / "hu.nii.gz", hu)  # already HU: the columns must not shift it again
    (tmp_path / "meta.csv").write_text(
        "VolumeName,Findings_EN,Impressions_EN,RescaleSlope,RescaleIntercept\n"
        "stored.nii.gz,Text.,,2.0,-1024\nhu.nii.gz,Text.,,1.0,-1024\n"
    )
    summary = preprocess_manifest(tmp_path / "meta.csv", tmp_path / "cache", NATIVE, progress=False)
    assert summary["processed"] == 2
    cache = StudyCache(tmp_path / "cache")
    np.testing.assert_array_equal(cache.image("hu"), hu)
    assert np.abs(np.asarray(cache.image("stored"), dtype=int) - hu).max() <= 1
    assert cache.index()[0]["RescaleSlope"] == "2.0"


def test_non_utf8_image_path_is_quarantined_with_a_printable_row(tmp_path):
    good_row(tmp_path, "a")
    body = b"id,image,report\na,a.nii.gz,Normal.\nb," + "cœur.nii.gz".encode("latin-1", "replace")
    (tmp_path / "m.csv").write_bytes(body + b"\xe9,Text.\n")
    preprocess_manifest(tmp_path / "m.csv", tmp_path / "cache", NATIVE, progress=False)
    (row,) = json.loads((tmp_path / "cache" / "quarantine.json").read_text(encoding="utf-8"))
    assert row["kind"] == "not UTF-8" and "\ufffd" in row["image"] and "column(s) image" in row["reason"]


def test_duplicate_ids_stop_before_anything_is_written(tmp_path):
    rows = [good_row(tmp_path, "a"), good_row(tmp_path, "b"), good_row(tmp_path, "a")]
    with pytest.raises(ManifestError, match="duplicate id.*'a' on lines 1, 3"):
        preprocess_manifest(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "cache", NATIVE, progress=False)
    assert not (tmp_path / "cache" / "index.jsonl").exists() and not (tmp_path / "cache" / "studies").exists()


# ----------------------------------------------------------------------------------------------- geometry


def test_small_volume_is_padded_with_air(tmp_path):
    data = ct_volume(shape=(10, 9, 7))
    data[2, 3, 4] = 2000
    write_nifti(tmp_path / "s.nii.gz", data, spacing=(1.0, 1.0, 2.0))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "s", "image": "s.nii.gz", "report": "r"}])
    cfg = PreprocessConfig(spacing=None, min_size=(16, 16, 16))
    assert preprocess_manifest(manifest, tmp_path / "cache", cfg, progress=False)["processed"] == 1
    cache = StudyCache(tmp_path / "cache")
    image, meta = np.asarray(cache.image("s")), cache.meta("s")
    assert image.shape == (16, 16, 16) and meta.shape == (16, 16, 16)
    assert meta.pad == [[3, 3], [3, 4], [4, 5]] and meta.original_shape == (10, 9, 7)
    inner = (slice(3, 13), slice(3, 12), slice(4, 11))
    np.testing.assert_array_equal(image[inner], data)
    mask = np.ones(image.shape, bool)
    mask[inner] = False
    assert (image[mask] == -1024).all()
    marked = np.argwhere(image == 2000)[0]
    np.testing.assert_allclose(world(meta.affine, marked), world(np.diag([1.0, 1.0, 2.0, 1.0]), (2, 3, 4)))


def test_flipped_lps_nifti_ends_up_ras_with_voxels_in_place(tmp_path):
    data = ct_volume()
    data[2, 5, 9] = 2500
    ras = np.array([[0.7, 0, 0, -5.0], [0, 0.8, 0, 7.0], [0, 0, 2.5, 11.0], [0, 0, 0, 1]])
    flipped = ras.copy()  # x and y run the other way (LPS voxel order), same world positions
    for axis in (0, 1):
        flipped[:3, 3] += ras[:3, axis] * (data.shape[axis] - 1)
        flipped[:3, axis] *= -1
    write_nifti(tmp_path / "ras.nii.gz", data, ras)
    write_nifti(tmp_path / "lps.nii.gz", data[::-1, ::-1], flipped)
    rows = [{"id": n, "image": f"{n}.nii.gz", "report": "r"} for n in ("ras", "lps")]
    preprocess_manifest(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "cache", NATIVE, progress=False)
    cache = StudyCache(tmp_path / "cache")
    meta = cache.meta("lps")
    assert meta.original_orientation == "LPS" and nib.orientations.aff2axcodes(np.array(meta.affine)) == tuple("RAS")
    assert (np.diag(np.array(meta.affine))[:3] > 0).all()
    np.testing.assert_array_equal(cache.image("lps"), cache.image("ras"))
    np.testing.assert_allclose(meta.affine, cache.meta("ras").affine, atol=1e-6)
    marked = np.argwhere(np.asarray(cache.image("lps")) == 2500)[0]
    np.testing.assert_allclose(world(meta.affine, marked), world(ras, (2, 5, 9)), atol=1e-5)


def test_anisotropic_volume_is_resampled_to_target_spacing(tmp_path):
    data = ct_volume(shape=(30, 26, 10))
    write_nifti(tmp_path / "a.nii.gz", data, spacing=(1.0, 1.0, 3.0))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "image": "a.nii.gz", "report": "r"}])
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 1.5), min_size=(8, 8, 8))
    preprocess_manifest(manifest, tmp_path / "cache", cfg, progress=False)
    cache = StudyCache(tmp_path / "cache")
    meta, image = cache.meta("a"), np.asarray(cache.image("a"))
    assert meta.spacing == (2.0, 2.0, 1.5) and meta.original_spacing == (1.0, 1.0, 3.0)
    np.testing.assert_allclose(np.array(meta.affine)[:3, :3], np.diag([2.0, 2.0, 1.5]))
    extent = (np.array(data.shape) - 1) * [1.0, 1.0, 3.0]  # mm between first and last voxel centres
    assert np.all(np.abs((np.array(image.shape) - 1) * [2.0, 2.0, 1.5] - extent) <= [2.0, 2.0, 1.5])
    bone_before = np.argwhere(data > 300).mean(0) * [1.0, 1.0, 3.0]
    bone_after = world(meta.affine, np.argwhere(image > 300).mean(0))
    np.testing.assert_allclose(bone_after, bone_before, atol=1.0)
    assert image.dtype == np.int16 and meta.hu_range[0] < -900 and meta.hu_range[1] >= 600


def test_label_follows_the_image_grid(tmp_path):
    data = ct_volume(shape=(24, 20, 10))
    label = (data > 300).astype(np.uint8) * 3
    write_nifti(
        tmp_path / "i.nii.gz", data[::-1], np.array([[-1.0, 0, 0, 23], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    )
    write_nifti(
        tmp_path / "l.nii.gz", label[::-1], np.array([[-1.0, 0, 0, 23], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    )
    rows = [{"id": "a", "image": "i.nii.gz", "label": "l.nii.gz", "report": "r"}]
    cfg = PreprocessConfig(spacing=(1.5, 1.5, 1.5), min_size=(20, 20, 20))
    preprocess_manifest(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "cache", cfg, progress=False)
    cache = StudyCache(tmp_path / "cache")
    image, lab, meta = np.asarray(cache.image("a")), np.asarray(cache.label("a")), cache.meta("a")
    assert lab.shape == image.shape and lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 3} and meta.has_label
    # Nearest-neighbour label voxels sit on bone: their trilinear HU keeps >= 1/8 of the nearest voxel's 700 HU.
    assert (image[lab == 3] > 100).all() and (image[lab == 3] > 300).mean() > 0.5
    before_mm3, after_mm3 = (label > 0).sum() * 2.0, (lab > 0).sum() * 1.5**3
    assert abs(after_mm3 / before_mm3 - 1) < 0.2


def test_same_study_in_every_format_gives_the_same_cache(tmp_path):
    hu = ct_volume(shape=(14, 12, 8)).astype(np.int32)
    hu[hu < -1024] = -1024
    stored = ((hu + 1024) // 2).astype(np.uint16)  # DICOM with RescaleSlope 2, RescaleIntercept -1024
    hu = stored.astype(np.int16) * 2 - 1024
    dx, dy, dz, origin = 0.7, 0.8, 2.5, np.array([-10.0, -20.0, 30.0])  # origin in LPS
    ras = np.diag([-dx, -dy, dz, 1.0])
    ras[:3, 3] = origin * [-1, -1, 1]
    write_nifti(tmp_path / "v.nii.gz", hu, ras)
    nrrd.write(
        str(tmp_path / "v.nrrd"),
        hu,
        {"space": "left-posterior-superior", "space directions": np.diag([dx, dy, dz]), "space origin": origin},
    )
    image = sitk.GetImageFromArray(hu.T.copy())
    image.SetSpacing((dx, dy, dz))
    image.SetOrigin(origin.tolist())
    sitk.WriteImage(image, str(tmp_path / "v.mha"))
    write_dicom_series(tmp_path / "dcm", stored, spacing=(dx, dy, dz), origin=tuple(origin), slope=2.0)
    rows = [
        {"id": n, "image": p, "report": "r"}
        for n, p in [("nii", "v.nii.gz"), ("nrrd", "v.nrrd"), ("mha", "v.mha"), ("dcm", "dcm")]
    ]
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 2.0), min_size=(8, 8, 8))
    summary = preprocess_manifest(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "cache", cfg, progress=False)
    assert summary["processed"] == 4, json.loads((tmp_path / "cache" / "quarantine.json").read_text())
    cache = StudyCache(tmp_path / "cache")
    for name in ("nrrd", "mha", "dcm"):
        np.testing.assert_array_equal(cache.image(name), cache.image("nii"), err_msg=name)
        np.testing.assert_allclose(cache.meta(name).affine, cache.meta("nii").affine, atol=1e-4, err_msg=name)
    lo, hi = cache.meta("dcm").hu_range
    assert cache.meta("dcm").original_orientation == "LPS" and hu.min() <= lo < -900 and 300 < hi <= hu.max()
