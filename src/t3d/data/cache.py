"""The preprocessed study cache: the contract between ``t3d preprocess`` (writer) and crop sampling (reader).

Layout of a cache folder::

    CACHE/
      studies/<key>/image.npy    int16 HU, shape (X, Y, Z), RAS, target spacing; read with mmap
      studies/<key>/label.npy    optional uint8 label map on the same grid
      studies/<key>/fg.npy       int32 (N, 3) sample of body voxel indices (HU > -500) for foreground-biased crops
      studies/<key>/meta.json    geometry + provenance (see ``StudyMeta``); written last
      index.jsonl                one line per cached study: {"id", "key", "findings", "impression", "report", ...}
      quarantine.json            studies that were rejected, with the reason
      summary.json               counts of the last run

Many writers may share one cache (several manifests, ``--shard I/N`` jobs on several nodes): a study folder is
built under a temporary name tagged with the writer's host and pid, and only that writer removes it, or a later
run on the same host once that pid is gone; ``index.jsonl`` and ``quarantine.json`` are rewritten under an
exclusive lock on ``CACHE/.lock`` (``fcntl.flock``; on NFS/Lustre the mount must support it) as the union of what
the cache holds, so one run never drops another's studies from the index.

Why uncompressed ``.npy`` read through a memory map: a random 96³ crop touches 96 short runs per slab, and the
OS page cache serves them without decoding the whole volume (``benchmarks/crops.py`` measures this against the
usual NIfTI pipeline). Each study folder is written under a temporary name and renamed into place in one step,
so a killed run never leaves an entry that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TMP_SEP = "~"
"""Separates the fields of a temporary's name (``.tmp~host~pid~random~key``); never in a key or a host name."""
AIR_HU = -1024
FOREGROUND_HU = -500
MAX_FG_POINTS = 20000


@dataclass
class StudyMeta:
    """Geometry and provenance of one cached study."""

    id: str
    key: str
    """Folder name under ``studies/`` (``id`` made filesystem-safe, unique)."""
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    """mm per voxel of the cached grid."""
    affine: list[list[float]]
    """4x4 voxel -> RAS world (mm) of the cached grid."""
    source: str
    """Absolute path of the source image (file or DICOM folder)."""
    source_hash: str
    """Content hash of the source image plus the preprocessing settings; a change triggers re-processing."""
    original_shape: tuple[int, ...] = ()
    original_spacing: tuple[float, ...] = ()
    original_affine: list[list[float]] = field(default_factory=list)
    """Voxel -> RAS world of the *source* grid, to write predictions back in the original geometry."""
    original_orientation: str = ""
    pad: list[list[int]] = field(default_factory=list)
    """Voxels of air padding added (before, after) per axis when the volume was smaller than the crop size."""
    hu_range: tuple[float, float] = (0.0, 0.0)
    has_label: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)
    """The preprocessing settings used (target spacing, orientation, ...)."""
    label_source: str = ""
    """Absolute path of the source label map, if any."""
    source_stat: str = ""
    """Fingerprint of the source files' paths, sizes and mtimes when ``source_hash`` was computed: re-runs skip a
    study whose fingerprint is unchanged without re-hashing it (``source_hash`` stays the truth)."""


def safe_key(study_id: str) -> str:
    """Filesystem-safe folder name for a study id (ids may hold '/', spaces, ...)."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", study_id).strip("._") or "study"
    return key[:150]


class StudyCache:
    """Read/write access to a cache folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.studies = self.root / "studies"

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return (self.root / "index.jsonl").is_file()

    def index(self) -> list[dict[str, Any]]:
        """Rows of ``index.jsonl`` (one per cached study, in manifest order)."""
        path = self.root / "index.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a t3d cache (no index.jsonl); "
                f"run `t3d preprocess --manifest ... --out {self.root}`"
            )
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def meta(self, key: str) -> StudyMeta:
        data = json.loads((self.studies / key / "meta.json").read_text())
        for name in ("shape", "spacing", "original_shape", "original_spacing", "hu_range"):
            data[name] = tuple(data[name])
        return StudyMeta(**data)

    def image(self, key: str) -> np.ndarray:
        """int16 (X, Y, Z) memory map; slicing it reads only the touched pages."""
        return np.load(self.studies / key / "image.npy", mmap_mode="r")

    def label(self, key: str) -> np.ndarray | None:
        path = self.studies / key / "label.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def foreground(self, key: str) -> np.ndarray:
        """int32 (N, 3) voxel indices inside the body (may be empty for an all-air volume)."""
        return np.load(self.studies / key / "fg.npy")

    def is_complete(self, key: str) -> bool:
        return (self.studies / key / "meta.json").is_file()

    # ------------------------------------------------------------------ writing
    def write_study(
        self, meta: StudyMeta, image: np.ndarray, label: np.ndarray | None = None, rng_seed: int = 0
    ) -> Path:
        """Write one study atomically: build it in a temporary folder, then rename it into place."""
        if image.dtype != np.int16 or image.ndim != 3:
            raise ValueError(f"study '{meta.id}': cache images are int16 (X, Y, Z), got {image.dtype} {image.shape}")
        self.studies.mkdir(parents=True, exist_ok=True)
        final = self.studies / meta.key
        tmp = self.studies / _temporary_name(".tmp", meta.key)
        tmp.mkdir()
        try:
            np.save(tmp / "image.npy", np.ascontiguousarray(image))
            if label is not None:
                np.save(tmp / "label.npy", np.ascontiguousarray(label.astype(np.uint8)))
            np.save(tmp / "fg.npy", foreground_points(image, seed=rng_seed))
            meta.has_label = label is not None
            meta.shape = tuple(int(s) for s in image.shape)
            (tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=1))
            _fsync_dir(tmp)
            if final.exists():
                # Replace a stale entry: move it aside first so that at no moment is a half entry in place.
                trash = self.studies / _temporary_name(".old", meta.key)
                final.rename(trash)
                _rename_unless_written(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                _rename_unless_written(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def clean_temporaries(self) -> int:
        """Remove folders left by killed runs on this host (their pid is gone). Returns how many.

        A temporary of a live writer, or of a writer on another host (whose pids mean nothing here), is left alone.
        """
        if not self.studies.is_dir():
            return 0
        stale = [p for p in self.studies.iterdir() if _abandoned(p.name)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on the cache's shared files (index, quarantine), across processes and hosts."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def owner(self, key: str) -> str | None:
        """The study id a complete entry holds, or None (absent, incomplete or unreadable)."""
        try:
            return json.loads((self.studies / key / "meta.json").read_text())["id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove_study(self, key: str) -> None:
        """Delete one entry: renamed aside first, so no reader ever sees half of it."""
        trash = self.studies / _temporary_name(".old", key)
        (self.studies / key).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def write_json(self, name: str, data: Any) -> None:
        write_json_atomic(self.root / name, data)

    def write_index(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.root / f".index-{uuid.uuid4().hex[:8]}.jsonl"
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(self.root / "index.jsonl")


def _temporary_name(prefix: str, key: str) -> str:
    return TMP_SEP.join((prefix, socket.gethostname(), str(os.getpid()), uuid.uuid4().hex[:8], key))


def _abandoned(name: str) -> bool:
    """True for a temporary whose writer ran on this host and is gone."""
    fields = name.split(TMP_SEP)
    if len(fields) != 5 or fields[0] not in (".tmp", ".old"):
        return False
    if fields[1] != socket.gethostname() or not fields[2].isdigit():
        return False
    try:
        os.kill(int(fields[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _rename_unless_written(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; when a concurrent writer put the same study there first, keep theirs."""
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def foreground_points(image: np.ndarray, seed: int = 0, threshold: float = FOREGROUND_HU) -> np.ndarray:
    """A random sample (at most MAX_FG_POINTS) of voxel indices with HU above ``threshold``: (N, 3) int32."""
    image = np.asarray(image)
    # Same points as np.argwhere + choice, without argwhere's (N, 3) int64 array (GBs for a whole CT at 0.8 mm).
    flat = np.flatnonzero(image > threshold)
    if len(flat) > MAX_FG_POINTS:
        flat = flat[np.random.default_rng(seed).choice(len(flat), MAX_FG_POINTS, replace=False)]
    return np.stack(np.unravel_index(flat, image.shape), axis=1).astype(np.int32).reshape(-1, image.ndim)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
