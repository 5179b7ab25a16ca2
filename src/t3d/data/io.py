"""Reading one study's source files through MONAI readers, and fingerprinting them for idempotent re-runs.

Every reader returns data indexed (x, y, z) with a voxel -> RAS world (mm) affine, MONAI's convention:

=================  ===========================================================================
NIfTI .nii(.gz)    ``monai.data.NibabelReader`` (affine as stored: NIfTI world is RAS)
NRRD .nrrd         ``monai.data.NrrdReader`` (pynrrd; LPS headers converted to RAS)
MHA/MHD            ``SimpleITKReader`` below (MONAI's ITKReader needs the 1.5 GB ``itk`` package)
DICOM folder       ``monai.data.PydicomReader`` after checking the folder holds one evenly spaced series
=================  ===========================================================================

``SimpleITKReader`` is also the fallback when pydicom cannot decode a DICOM series' pixel encoding (e.g. JPEG 2000
without a pydicom decoder plugin); it reads NIfTI and NRRD too, but is no fallback for them (see ``_fallback``).

Problems with a study's files raise ``StudyError``: preprocessing quarantines the study with that message and goes
on with the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import SimpleITK as sitk
from monai.data import ImageReader, MetaTensor, NibabelReader, NrrdReader, PydicomReader
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from nibabel.openers import ImageOpener

FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".mha": "itk", ".mhd": "itk"}
MAX_SLICE_GAP_RATIO = 1.1  # DICOM slice gaps may differ by 10 % (rounding) before we call the series uneven


class StudyError(ValueError):
    """Something is wrong with one study; it is quarantined with this message and the run goes on."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind
        """Short category ("2D image", "non-finite voxels", ...) used to count reasons in the summary."""

    def __reduce__(self):  # keep ``kind`` when sent back from a worker process
        return (StudyError, (str(self), self.kind))


def image_format(path: Path) -> str:
    """``nifti``, ``nrrd``, ``itk`` (MHA/MHD) or ``dicom`` (a folder); StudyError for anything else."""
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    for suffix, kind in FORMATS.items():
        if name.endswith(suffix):
            return kind
    raise StudyError(
        f"{path}: unknown image format; use NIfTI (.nii/.nii.gz), NRRD, MHA/MHD or a folder with one DICOM series",
        kind="unknown format",
    )


def read_image(path: str | Path, what: str = "image") -> MetaTensor:
    """Read a 3D image as float32 (1, X, Y, Z) with ``.affine`` voxel -> RAS mm.

    2D images (fewer than three axes longer than one voxel) and 4D images (a channel/time axis longer than one)
    raise StudyError; so do missing and unreadable files (``what`` names the role in messages).
    """
    path = Path(path)
    if not path.exists():
        raise StudyError(f"{what} not found: {path}", kind="missing file")
    kind = image_format(path)
    if kind == "nifti":
        _check_nifti_pixdim(path)
    if kind == "nrrd":
        _check_nrrd_header(path)
    if kind == "dicom":
        dicom_series_files(path)
    primary = {
        "nifti": NibabelReader(),
        "nrrd": NrrdReader(),
        "itk": SimpleITKReader(),
        "dicom": PydicomReader(fname_regex=None),
    }[kind]
    try:
        data, meta = primary.get_data(primary.read(str(path)))
    except (StudyError, MemoryError):
        raise
    except Exception as err:
        data, meta = _fallback(path, kind, err, what)
    return _as_volume(np.asarray(data), meta, path, what)


def _fallback(path: Path, kind: str, err: Exception, what: str) -> tuple[np.ndarray, dict]:
    """SimpleITK (GDCM) for DICOM pixel encodings pydicom cannot decode; any other failure is a StudyError.

    Not used for NIfTI/NRRD: SimpleITK zero-fills a truncated .nii.gz instead of failing, which would cache a
    silently damaged volume.
    """
    undecodable = isinstance(err, NotImplementedError | RuntimeError) or "decod" in str(err).lower()
    if kind == "dicom" and undecodable:
        try:
            reader = SimpleITKReader()
            return reader.get_data(reader.read(str(path)))
        except Exception:
            pass
    raise StudyError(f"cannot read {what} {path} ({type(err).__name__}: {err}); is the file complete?") from None


def _as_volume(data: np.ndarray, meta: dict, path: Path, what: str) -> MetaTensor:
    spatial = tuple(int(s) for s in meta[MetaKeys.SPATIAL_SHAPE])
    if len(spatial) < 3 or sum(s > 1 for s in spatial) < 3:
        raise StudyError(
            f"{what} {path} is 2D (shape {tuple(data.shape)}); t3d needs 3D volumes: export the whole series",
            kind="2D image",
        )
    spatial = spatial[:3]
    if data.size != int(np.prod(spatial)):
        raise StudyError(
            f"{what} {path} is 4D/multi-channel (shape {tuple(data.shape)}, spatial {spatial}); t3d needs one 3D "
            "volume per study: split the time points/channels into separate files",
            kind="4D image",
        )
    array = np.ascontiguousarray(data.reshape(spatial), dtype=np.float32)[None]  # (1, X, Y, Z)
    affine = np.asarray(meta[MetaKeys.AFFINE], dtype=np.float64)
    keep = {k: meta[k] for k in (MetaKeys.SPACE,) if k in meta}
    return MetaTensor(array, affine=affine, meta={**keep, "filename_or_obj": str(path)})


def _check_nrrd_header(path: Path) -> None:
    try:
        header = nrrd.read_header(str(path))
    except Exception as err:
        raise StudyError(f"cannot read NRRD header of {path} ({err})") from None
    sizes = tuple(int(s) for s in header.get("sizes", ()))
    if header.get("dimension", len(sizes)) == 2 or sum(s > 1 for s in sizes) < 3:
        raise StudyError(f"{path} is 2D (sizes {sizes}); t3d needs 3D volumes", kind="2D image")
    if len(sizes) > 3:
        raise StudyError(
            f"{path} is 4D/multi-channel (sizes {sizes}); split it into one 3D volume per file", kind="4D image"
        )
    if "space directions" not in header:
        raise StudyError(f"{path} has no 'space directions' (no voxel geometry); re-export it with geometry")


def _check_nifti_pixdim(path: Path) -> None:
    """nibabel silently turns a zero pixdim into 1 mm on load when no qform/sform is set: read the raw header."""
    try:
        with ImageOpener(str(path)) as fh:
            header = nib.Nifti1Header.from_fileobj(fh, check=False)
        if int(header["sizeof_hdr"]) != 348:
            return  # NIfTI-2: left to the reader
    except Exception:
        return  # unreadable header: the reader reports it
    pixdim = np.asarray(header["pixdim"], dtype=float)[1:4]
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0 and (pixdim <= 0).any():
        raise StudyError(
            f"{path}: NIfTI header spacing {tuple(pixdim)} mm (no qform/sform) is absurd; fix the header",
            kind="absurd spacing",
        )


# ----------------------------------------------------------------------------------------------- DICOM


def dicom_series_files(folder: Path) -> list[Path]:
    """The DICOM image files of ``folder`` after checking they form one evenly spaced series.

    Raises StudyError when the folder holds several series (naming their SeriesInstanceUIDs), no DICOM image, a
    single slice, or slices whose positions are missing, repeated or unevenly spaced (missing slices).
    """
    headers = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        if pydicom.misc.is_dicom(str(file)):
            ds = pydicom.dcmread(str(file), stop_before_pixels=True)
            if "Rows" in ds:  # image objects only (not DICOMDIR, SR, ...)
                headers.append((file, ds))
    if not headers:
        raise StudyError(f"no DICOM image files in folder {folder}", kind="missing file")
    series: dict[str, int] = {}
    for _, ds in headers:
        uid = str(ds.get("SeriesInstanceUID", "<none>"))
        series[uid] = series.get(uid, 0) + 1
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({n} files)" for uid, n in series.items())
        raise StudyError(
            f"DICOM folder {folder} holds {len(series)} series: {listing}; put each series in its own folder "
            "and list the one to use in the manifest",
            kind="multiple DICOM series",
        )
    if len(headers) < 2:
        raise StudyError(f"DICOM folder {folder} holds a single slice (2D); t3d needs a 3D series", kind="2D image")
    _check_slice_positions(folder, [ds for _, ds in headers])
    return [file for file, _ in headers]


def _check_slice_positions(folder: Path, slices: list) -> None:
    """Slices in InstanceNumber order (how MONAI stacks them) must step evenly along the slice normal."""
    try:
        slices = sorted(slices, key=lambda ds: int(ds.InstanceNumber))
        row, col = (
            np.array(slices[0].ImageOrientationPatient[:3], float),
            np.array(slices[0].ImageOrientationPatient[3:], float),
        )
        positions = np.array([np.dot(np.array(ds.ImagePositionPatient, float), np.cross(row, col)) for ds in slices])
    except (AttributeError, TypeError, ValueError):
        raise StudyError(
            f"DICOM folder {folder}: slices lack InstanceNumber, ImagePositionPatient or ImageOrientationPatient",
            kind="DICOM geometry",
        ) from None
    steps = np.abs(np.diff(positions))
    monotonic = np.all(np.diff(positions) > 0) or np.all(np.diff(positions) < 0)
    if not monotonic or steps.min() <= 1e-3 or steps.max() > MAX_SLICE_GAP_RATIO * steps.min():
        raise StudyError(
            f"DICOM folder {folder}: slice steps range {steps.min():.3g}..{steps.max():.3g} mm in InstanceNumber "
            "order (missing, repeated or out-of-order slices); re-export the complete series",
            kind="DICOM geometry",
        )


# ----------------------------------------------------------------------------------------------- SimpleITK


class SimpleITKReader(ImageReader):
    """A MONAI ``ImageReader`` backed by SimpleITK: MHA/MHD, and a fallback for NIfTI, NRRD and DICOM folders.

    Mirrors MONAI's ``ITKReader(reverse_indexing=False, affine_lps_to_ras=True)``: data indexed (x, y, z[, c]),
    ``affine`` = direction @ diag(spacing) with the origin, converted from ITK's LPS world to RAS.
    """

    suffixes = (".mha", ".mhd", ".nii", ".nii.gz", ".nrrd")

    def __init__(self, affine_lps_to_ras: bool = True, series_uid: str = ""):
        super().__init__()
        self.affine_lps_to_ras = affine_lps_to_ras
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [str(f) for f in ensure_tuple(filename)]
        return all(Path(n).is_dir() or n.lower().endswith(self.suffixes) for n in names)

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> Any:
        images = [self._read_one(Path(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def _read_one(self, path: Path) -> sitk.Image:
        if not path.is_dir():
            return sitk.ReadImage(str(path))
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not uids:
            raise FileNotFoundError(f"no DICOM series in {path}")
        if len(uids) > 1 and not self.series_uid:
            raise ValueError(f"{path} holds {len(uids)} DICOM series ({', '.join(uids)}); choose one")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), self.series_uid or uids[0]))
        return reader.Execute()  # GDCM applies RescaleSlope/Intercept

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        arrays, metas = [], []
        for image in img if isinstance(img, list | tuple) else [img]:  # a sitk.Image is itself iterable
            array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) -> (x, y, z[, c])
            array = array.T if image.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(array.T, 0, -1)
            arrays.append(array)
            metas.append(self._meta(image, array))
        if len(arrays) == 1:
            return arrays[0], metas[0]
        meta = dict(metas[0], **{MetaKeys.ORIGINAL_CHANNEL_DIM: 0})
        return np.stack(arrays), meta

    def _meta(self, image: sitk.Image, array: np.ndarray) -> dict:
        dim = image.GetDimension()
        sr = min(dim, 3)
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:sr, :sr]
        affine = np.eye(sr + 1)
        affine[:sr, :sr] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64)[:sr])
        affine[:sr, -1] = np.asarray(image.GetOrigin(), dtype=np.float64)[:sr]
        if self.affine_lps_to_ras:
            affine = orientation_ras_lps(affine)
        meta: dict[str, Any] = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys() if not k.startswith("ITK_")}
        spatial = np.asarray(image.GetSize()[:sr])
        meta.update(
            {
                "spacing": np.asarray(image.GetSpacing()),
                MetaKeys.ORIGINAL_AFFINE: affine,
                MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPACE: SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS,
                MetaKeys.SPATIAL_SHAPE: spatial,
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if array.ndim == len(spatial) else -1,
            }
        )
        return meta


# ----------------------------------------------------------------------------------------------- fingerprints


def source_files(path: Path) -> list[Path]:
    """The files whose bytes define a study's image: the file itself, or every file of a DICOM folder."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path]


def content_hash(files: Sequence[Path], chunk: int = 1 << 20) -> str:
    """sha256 over the names (relative order) and bytes of ``files``."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode("utf-8", "surrogateescape") + b"\0")
        with file.open("rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def stat_fingerprint(files: Sequence[Path]) -> str:
    """A cheap stand-in for ``content_hash``: sha256 of each file's path, size and mtime (ns)."""
    digest = hashlib.sha256()
    for file in files:
        st = file.stat()
        digest.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
