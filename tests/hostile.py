"""Writers of hostile study files, generated in the test (no binary fixtures): corrupt headers, files that are not
files, indirections out of the data root. Not a test module: imported by tests/test_hostile_*.py.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from studyfiles import ct_volume, write_dicom_series, write_jsonl, write_nifti


def good_study(root: Path, name: str, seed: int = 0) -> Path:
    return write_nifti(root / f"{name}.nii.gz", ct_volume(seed=seed), spacing=(1.0, 1.0, 2.0))


def singular_affine(path: Path) -> Path:
    """A NIfTI whose first two voxel axes point the same way (no orientation exists)."""
    affine = np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    return write_nifti(path, ct_volume(), affine=affine)


def rgb_nifti(path: Path) -> Path:
    rgb = np.zeros((12, 10, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    return path


def header_only_nifti(path: Path, shape=(20000, 20000, 2000)) -> Path:
    """A gzipped NIfTI header declaring ``shape`` int16 voxels with no voxel data: about 100 bytes on disk."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw, compresslevel=9))
    return path


def header_only_mha(path: Path, size=(32767, 32767, 1), data: bytes = b"") -> Path:
    """A MetaImage header declaring ``size`` shorts, followed by ``data`` only."""
    dims = " ".join(map(str, size))
    text = (
        f"ObjectType = Image\nNDims = {len(size)}\nDimSize = {dims}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() + data)
    return path


def mhd_pair(folder: Path, name: str, data_file: Path | None = None) -> tuple[Path, Path]:
    """A valid .mhd + .raw pair; the data file lands at ``data_file`` (default: beside the header), which the
    header names by absolute path when it is elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(ct_volume().T.copy())
    image.SetSpacing((1.0, 1.0, 2.0))
    header = folder / f"{name}.mhd"
    sitk.WriteImage(image, str(header))
    raw = folder / f"{name}.raw"
    if data_file is None:
        return header, raw
    data_file.parent.mkdir(parents=True, exist_ok=True)
    raw.rename(data_file)
    text = header.read_text().replace(f"ElementDataFile = {name}.raw", f"ElementDataFile = {data_file}")
    header.write_text(text)
    return header, data_file


def dicom_links(folder: Path, target: Path) -> Path:
    """A DICOM series written to ``target``, and ``folder`` holding one symlink per slice file."""
    write_dicom_series(target, (ct_volume() + 1024).astype(np.uint16))
    folder.mkdir(parents=True, exist_ok=True)
    for file in sorted(target.iterdir()):
        os.symlink(file, folder / file.name)
    return folder


def manifest(path: Path, images: dict[str, str]) -> Path:
    """A JSONL manifest with one row per (id, image path relative to the manifest's folder)."""
    return write_jsonl(path, [{"id": i, "image": p, "report": f"report of {i}"} for i, p in images.items()])
