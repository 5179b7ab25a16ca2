"""The files a study is read from, checked before any of them is opened for pixel data.

A study's image is one path in the manifest, but it may be read from several files: an ``.mhd`` header names its
``ElementDataFile``, an NRRD header may name a detached ``data file``, a DICOM series is a folder of files. Every
one of them is

* a **regular file** -- FIFOs and devices are refused without opening them (reading a FIFO blocks forever), and a
  symlink loop is a reason, not a traceback;
* **inside the data root** after resolving symlinks, when a root is given (the manifest check sees only the path
  it lists, not the files a header points to);
* part of the **content hash** that decides whether a cached study is stale (editing a ``.raw`` re-processes its
  ``.mhd``).

``check_declared_size`` compares what a header declares (voxels x bytes per voxel) with the bytes on disk and
with a voxel budget, from the header alone: a 100-byte file declaring 32767 x 32767 voxels is rejected before
a reader allocates gigabytes for it. Compressed payloads are bounded by deflate's best ratio (about 1032:1).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import nrrd

MAX_COMPRESSION_RATIO = 1032
"""Deflate (gzip, zlib) never compresses better than about 1032:1; bzip2's bound is higher but still finite."""
METAIO_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
HEADER_BYTES = 1 << 16
"""MetaImage/NRRD headers are read at most this far: a header is text of a few hundred bytes."""


class StudyError(ValueError):
    """Something is wrong with one study; it is quarantined with this message and the run goes on."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind
        """Short category ("2D image", "non-finite voxels", ...) used to count reasons in the summary."""

    def __reduce__(self):  # keep ``kind`` when sent back from a worker process
        return (StudyError, (str(self), self.kind))


def check_regular(path: Path, what: str = "image") -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed) when it is a regular file or folder; StudyError otherwise."""
    try:
        st = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StudyError(
                f"{what} {path} is a symlink loop; point the link at a real file", kind="symlink loop"
            ) from None
        if err.errno == errno.ENOENT:
            raise StudyError(f"{what} not found: {path}", kind="missing file") from None
        raise StudyError(f"cannot open {what} {path} ({err.strerror})", kind="unreadable") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise StudyError(
            f"{what} {path} is not a regular file (a FIFO, socket or device); t3d only reads files and folders",
            kind="not a regular file",
        )
    return st


def check_inside(path: Path, root: Path | None, what: str = "image") -> None:
    """StudyError when ``path`` (symlinks resolved) lies outside ``root``; nothing when ``root`` is None."""
    if root is None:
        return
    try:
        real = path.resolve()
    except (RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise StudyError(
            f"{what} {path} is a symlink loop; point the link at a real file", kind="symlink loop"
        ) from None
    if not real.is_relative_to(root.resolve()):
        raise StudyError(
            f"{what} {path} reads {real}, outside the data root {root} (via a header reference or a symlink); "
            "move the file under the root or pass --root to a folder that holds it",
            kind="outside data root",
        )


def source_files(path: Path, root: Path | None = None, what: str = "image") -> list[Path]:
    """Every file ``path`` is read from, each a regular file (inside ``root`` when given), in a stable order.

    The file itself plus the data files its header names (MHD ``ElementDataFile``, NRRD ``data file``), or every
    file of a DICOM folder (sub-folders are not read).
    """
    st = check_regular(path, what)
    check_inside(path, root, what)
    if stat.S_ISDIR(st.st_mode):
        files = []
        for entry in sorted(path.iterdir()):
            if stat.S_ISDIR(check_regular(entry, what).st_mode):
                continue
            check_inside(entry, root, what)
            files.append(entry)
        return files
    files = [path]
    for data in referenced_files(path):
        check_regular(data, f"{what} data file")
        check_inside(data, root, f"{what} data file")
        files.append(data)
    return files


def referenced_files(path: Path) -> list[Path]:
    """Data files named by a MetaImage (.mhd/.mha) or NRRD header; empty for attached data and other formats."""
    name = path.name.lower()
    if name.endswith((".mhd", ".mha")):
        value = metaio_header(path).get("ElementDataFile", "LOCAL")
        if value.upper() == "LOCAL":
            return []
        if value.upper().startswith("LIST") or "%" in value:
            raise StudyError(
                f"{path}: ElementDataFile {value!r} (a file list or pattern) is not supported; write one data file",
                kind="unsupported layout",
            )
        return [_relative_to_header(path, value)]
    if name.endswith((".nrrd", ".nhdr")):
        header = _nrrd_header(path)
        value = str(header.get("data file", header.get("datafile", "")))
        if not value:
            return []
        if value.upper().startswith("LIST") or len(value.split()) > 1:
            raise StudyError(
                f"{path}: detached 'data file: {value}' (a list or pattern) is not supported; write one data file",
                kind="unsupported layout",
            )
        return [_relative_to_header(path, value)]
    return []


def _relative_to_header(header: Path, value: str) -> Path:
    data = Path(value)
    return data if data.is_absolute() else header.parent / data


def metaio_header(path: Path) -> dict[str, str]:
    """``Key = Value`` fields of a MetaImage header, up to ``ElementDataFile`` (the last field by definition)."""
    with path.open("rb") as fh:
        head = fh.read(HEADER_BYTES)
    fields: dict[str, str] = {}
    for raw in head.split(b"\n"):
        key, sep, value = raw.decode("latin-1").partition("=")
        if not sep:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields
    raise StudyError(f"{path}: no ElementDataFile field in the MetaImage header; is the file complete?")


def _nrrd_header(path: Path) -> dict:
    try:
        return nrrd.read_header(str(path))
    except Exception as err:
        raise StudyError(f"cannot read NRRD header of {path} ({err})") from None


# ----------------------------------------------------------------------------------------------- size bounds


def check_declared_size(path: Path, kind: str, max_voxels: int, what: str = "image") -> None:
    """StudyError when the header of ``path`` declares more voxels than ``max_voxels`` or more bytes than its files
    can hold. Reads headers only; DICOM folders are bounded per slice in ``t3d.data.io.dicom_series_files``."""
    if kind == "dicom":
        return
    shape, itemsize, available, compressed = _declared(path, kind)
    voxels = 1
    for size in shape:
        voxels *= max(int(size), 1)
    if voxels > max_voxels:
        raise StudyError(
            f"{what} {path}: header declares {'x'.join(map(str, shape))} = {voxels:.3g} voxels, above "
            f"preprocess.max_voxels={max_voxels:.3g}; a corrupt header, or raise the budget",
            kind="too large",
        )
    needed = voxels * itemsize
    capacity = available * MAX_COMPRESSION_RATIO if compressed else available
    if needed > capacity:
        raise StudyError(
            f"{what} {path}: header declares {'x'.join(map(str, shape))} voxels ({needed:.3g} bytes) but the file "
            f"holds {available} bytes{' compressed' if compressed else ''}; the file is truncated or its header is "
            "corrupt: re-export it",
            kind="truncated file",
        )


def _declared(path: Path, kind: str) -> tuple[tuple[int, ...], int, int, bool]:
    """(declared shape, bytes per voxel, bytes of pixel data on disk, compressed?) from the header alone."""
    if kind == "nifti":
        try:
            header = nib.load(str(path)).header  # NIfTI-1 or -2; the voxels stay on disk (lazy array proxy)
            shape, itemsize = header.get_data_shape(), header.get_data_dtype().itemsize
        except Exception as err:
            raise StudyError(f"cannot read NIfTI header of {path} ({type(err).__name__}: {err})") from None
        compressed = path.name.lower().endswith(".gz")
        offset = 0 if compressed else int(header.get_data_offset())
        return tuple(shape), itemsize, max(path.stat().st_size - offset, 0), compressed
    if kind == "nrrd":
        header = _nrrd_header(path)
        data = referenced_files(path)
        available = data[0].stat().st_size if data else path.stat().st_size
        encoding = str(header.get("encoding", "raw")).lower()
        try:
            itemsize = nrrd.reader._determine_datatype(header).itemsize
        except Exception:
            itemsize = 1
        if encoding in ("ascii", "text", "txt"):
            itemsize = 2  # at least one digit and one separator per value
        return tuple(header.get("sizes", ())), itemsize, available, encoding not in ("raw", "ascii", "text", "txt")
    fields = metaio_header(path)
    try:
        shape = tuple(int(s) for s in fields.get("DimSize", "").split())
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        raise StudyError(f"{path}: unreadable DimSize in the MetaImage header", kind="unreadable") from None
    itemsize = METAIO_BYTES.get(fields.get("ElementType", ""), 1) * max(channels, 1)
    data = referenced_files(path)
    available = data[0].stat().st_size if data else path.stat().st_size
    compressed = fields.get("CompressedData", "False").lower() == "true"
    return shape, itemsize, available, compressed


# ----------------------------------------------------------------------------------------------- fingerprints


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
