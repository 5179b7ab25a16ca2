"""Writers of tiny study files for the data tests: CT-like HU volumes as NIfTI, NRRD, MHA and DICOM series.

Not a test module: imported by tests/test_manifest.py, test_io.py, test_preprocess.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np


def ct_volume(shape=(20, 18, 12), seed: int = 0) -> np.ndarray:
    """int16 HU (X, Y, Z): air around an ellipsoidal soft-tissue body with a bony core and a marked voxel."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt(((grid / 0.8) ** 2).sum(0))
    vol = np.where(r < 1, 40, -1000).astype(np.float32) + rng.normal(0, 5, shape)
    vol[r < 0.3] = 700
    return np.round(vol).astype(np.int16)


def write_nifti(path: Path, data: np.ndarray, affine=None, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_dicom_series(
    folder: Path,
    stored: np.ndarray,
    spacing=(0.7, 0.8, 2.5),
    origin=(-10.0, -20.0, 30.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    first_instance: int = 1,
    prefix: str = "slice",
) -> Path:
    """Write ``stored`` (X, Y, Z) uint16 as an axial CT series; voxel (i, j, k) sits at LPS origin + (i dx, j dy, k dz).

    HU = stored * slope + intercept (RescaleSlope/RescaleIntercept).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    dx, dy, dz = spacing
    for k in range(stored.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, "CT"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.PixelSpacing = [dy, dx]  # (between rows, between columns)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * dz]
        ds.InstanceNumber, ds.SliceThickness = first_instance + k, dz
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()  # (rows=Y, cols=X)
        ds.save_as(folder / f"{prefix}{k:03d}.dcm", enforce_file_format=True)
    return folder


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under ``root``: to prove that nothing was modified."""
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
