"""Image reading: every format lands as (1, X, Y, Z) with a voxel -> RAS affine; DICOM folders are checked."""

from __future__ import annotations

import os

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from studyfiles import ct_volume, write_dicom_series, write_nifti
from t3d.data.io import SimpleITKReader, read_image
from t3d.data.sources import StudyError, content_hash, stat_fingerprint

# An oblique-free but axis-flipped geometry: x runs right->left (LPS-like), z is 2.5 mm.
AFFINE = np.array([[-0.7, 0, 0, 30.0], [0, 0.8, 0, -12.0], [0, 0, 2.5, 40.0], [0, 0, 0, 1]])


def test_nifti_is_channel_first_with_its_affine(tmp_path):
    vol = ct_volume()
    img = read_image(write_nifti(tmp_path / "a.nii.gz", vol, AFFINE))
    assert tuple(img.shape) == (1, *vol.shape) and img.dtype.is_floating_point
    np.testing.assert_array_equal(img.numpy()[0], vol)
    np.testing.assert_allclose(img.affine.numpy(), AFFINE)


def _sitk_from_ras(vol: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image (LPS world) showing the same voxels at the same places as (vol, RAS affine)."""
    image = sitk.GetImageFromArray(vol.T.copy())  # sitk arrays are (z, y, x)
    lps = np.diag([-1, -1, 1]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).flatten().tolist())
    image.SetOrigin((np.diag([-1, -1, 1]) @ affine[:3, 3]).tolist())
    return image


def test_mha_through_simpleitk_reader_matches_nifti(tmp_path):
    vol = ct_volume()
    sitk.WriteImage(_sitk_from_ras(vol, AFFINE), str(tmp_path / "a.mha"))
    sitk.WriteImage(_sitk_from_ras(vol, AFFINE), str(tmp_path / "a.mhd"))
    reference = read_image(write_nifti(tmp_path / "a.nii.gz", vol, AFFINE))
    for name in ("a.mha", "a.mhd"):
        img = read_image(tmp_path / name)
        np.testing.assert_array_equal(img.numpy(), reference.numpy())
        np.testing.assert_allclose(img.affine.numpy(), AFFINE, atol=1e-6)


def test_simpleitk_reader_agrees_with_monai_nrrd_reader(tmp_path):
    from monai.data import NrrdReader

    vol = ct_volume(shape=(9, 7, 5))
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([-0.9, -0.9, 3.0]),
        "space origin": [5, 6, 7],
    }
    nrrd.write(str(tmp_path / "a.nrrd"), vol, header)
    ours, ours_meta = SimpleITKReader().get_data(SimpleITKReader().read(str(tmp_path / "a.nrrd")))
    reader = NrrdReader()
    theirs, theirs_meta = reader.get_data(reader.read(str(tmp_path / "a.nrrd")))
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(ours_meta["affine"], theirs_meta["affine"])
    assert np.allclose(np.diag(ours_meta["affine"])[:3], [0.9, 0.9, 3.0])  # LPS flips undone -> RAS


def test_dicom_series_applies_rescale_and_geometry(tmp_path):
    stored = (ct_volume(shape=(12, 10, 6)).astype(np.int32) + 1024) // 2  # HU = 2 * stored - 1024
    stored[3, 7, 4] = 1500  # marked voxel: 1976 HU
    write_dicom_series(tmp_path / "series", stored.astype(np.uint16), slope=2.0, intercept=-1024.0)
    (tmp_path / "series" / "notes.txt").write_text("not DICOM")  # non-DICOM files are ignored
    img = read_image(tmp_path / "series")
    assert tuple(img.shape) == (1, 12, 10, 6)
    np.testing.assert_allclose(img.numpy()[0], stored * 2.0 - 1024.0)
    # voxel (i, j, k) sits at LPS (-10 + 0.7 i, -20 + 0.8 j, 30 + 2.5 k) = RAS (10 - 0.7 i, 20 - 0.8 j, 30 + 2.5 k)
    world = img.affine.numpy() @ np.array([3, 7, 4, 1.0])
    np.testing.assert_allclose(world[:3], [10 - 2.1, 20 - 5.6, 40.0], atol=1e-4)


def test_dicom_folder_with_two_series_names_both(tmp_path):
    stored = np.full((8, 8, 3), 1000, np.uint16)
    write_dicom_series(tmp_path / "mixed", stored, series_uid="1.2.3.1", prefix="a")
    write_dicom_series(tmp_path / "mixed", stored, series_uid="1.2.3.2", prefix="b", spacing=(0.7, 0.8, 5.0))
    with pytest.raises(StudyError) as err:
        read_image(tmp_path / "mixed")
    message = str(err.value)
    assert err.value.kind == "multiple DICOM series"
    assert "mixed" in message and "1.2.3.1" in message and "1.2.3.2" in message and "own folder" in message


def test_dicom_series_with_a_missing_slice_is_rejected(tmp_path):
    write_dicom_series(tmp_path / "gap", np.full((8, 8, 5), 1000, np.uint16))
    (tmp_path / "gap" / "slice002.dcm").unlink()
    with pytest.raises(StudyError, match="missing, repeated or out-of-order") as err:
        read_image(tmp_path / "gap")
    assert err.value.kind == "DICOM geometry"


@pytest.mark.parametrize(
    ("shape", "kind"), [((12, 10), "2D image"), ((12, 10, 1), "2D image"), ((8, 8, 6, 3), "4D image")]
)
def test_2d_and_4d_images_are_rejected(tmp_path, shape, kind):
    path = write_nifti(tmp_path / "x.nii.gz", np.zeros(shape, np.int16))
    with pytest.raises(StudyError) as err:
        read_image(path)
    assert err.value.kind == kind and "x.nii.gz" in str(err.value)


def test_4d_nrrd_is_rejected(tmp_path):
    nrrd.write(
        str(tmp_path / "v.nrrd"), np.zeros((3, 6, 6, 6), np.int16), {"kinds": ["vector", "domain", "domain", "domain"]}
    )
    with pytest.raises(StudyError) as err:
        read_image(tmp_path / "v.nrrd")
    assert err.value.kind == "4D image"


def test_singleton_channel_is_squeezed(tmp_path):
    img = read_image(write_nifti(tmp_path / "x.nii.gz", ct_volume()[..., None]))
    assert tuple(img.shape) == (1, 20, 18, 12)


def test_study_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(StudyError("msg", kind="4D image")))
    assert (str(err), err.kind) == ("msg", "4D image")


def test_fingerprints_follow_content_and_stat(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"one")
    digest, stat = content_hash([a]), stat_fingerprint([a])
    os.utime(a, ns=(1, 1))
    assert content_hash([a]) == digest and stat_fingerprint([a]) != stat
    a.write_bytes(b"two")
    assert content_hash([a]) != digest
