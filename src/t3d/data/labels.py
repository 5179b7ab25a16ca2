"""Findings labels of studies: the findings CSV, its images, and their preprocessed cache.

    table = read_labels("multi_abnormality_labels.csv", images="dataset/valid")   # CT-RATE layout
    table = prepare_label_cache(table, "runs/cls/cache", pre.preprocess, workers=2)
    y = table.labels_of(ids)                                                     # (N, L) float32

The CSV is CT-RATE's ``multi_abnormality_labels.csv`` layout: ``VolumeName`` (``train_1_a_1.nii.gz``) and one 0/1
column per finding; ``id`` + ``image`` + finding columns also work. Images resolve as the pre-training manifest
reader resolves CT-RATE names (``t3d.data.manifest``: root/name, the CT-RATE nesting, or a unique match under root).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t3d.config import PreprocessConfig
from t3d.data.cases import SegCase, prepare_cache
from t3d.data.manifest import read_manifest

log = logging.getLogger(__name__)


@dataclass
class LabelTable:
    """Multi-label findings of a set of studies."""

    ids: list[str]
    classes: list[str]
    y: np.ndarray
    """(N, L) float32 0/1, row i = study ``ids[i]``."""
    images: list[Path] = field(default_factory=list)
    source: str = ""

    def labels_of(self, ids: list[str]) -> np.ndarray:
        """(len(ids), L) labels of ``ids`` in that order."""
        pos = {i: n for n, i in enumerate(self.ids)}
        return self.y[[pos[i] for i in ids]]

    def restrict(self, ids: list[str]) -> LabelTable:
        keep = set(ids)
        rows = [n for n, i in enumerate(self.ids) if i in keep]
        images = [self.images[n] for n in rows] if self.images else []
        return LabelTable([self.ids[n] for n in rows], self.classes, self.y[rows], images, self.source)


def default_images_root(csv_path: str | Path) -> Path:
    """The CSV's folder, or its ``images/`` subfolder when present (the synthetic dataset keeps labels/ beside)."""
    folder = Path(csv_path).parent
    return folder / "images" if (folder / "images").is_dir() else folder


def read_labels(path: str | Path, images: str | Path | None = None) -> LabelTable:
    """Read a findings CSV and resolve its images (under ``images``, default ``default_images_root``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} does not exist")
    root = Path(images) if images else default_images_root(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if "VolumeName" in columns:
        key_cols = ["VolumeName"]
    elif "id" in columns and "image" in columns:
        key_cols = ["id", "image"]
    else:
        raise ValueError(
            f"labels CSV {path}: no VolumeName column (CT-RATE multi_abnormality_labels layout) and no id + image "
            f"columns; found: {', '.join(columns)}"
        )
    classes = [c for c in columns if c not in key_cols and c not in ("id", "image", "Unnamed: 0")]
    if not classes or not rows:
        raise ValueError(f"labels CSV {path} has no finding columns or no rows; expected one 0/1 column per finding")
    y = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for n, row in enumerate(rows):
        for c, name in enumerate(classes):
            y[n, c] = _binary(row.get(name, ""), path, n + 2, name)
    ids, paths = _resolve(path, rows, key_cols, root)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"labels CSV {path}: study '{dup}' appears more than once; keep one row per study")
    return LabelTable(ids, classes, y, paths, str(path))


def _binary(value: str, path: Path, line: int, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number not in (0.0, 1.0):
        raise ValueError(
            f"labels CSV {path} line {line}, column '{column}': {value!r} is not 0 or 1; findings are binary labels "
            "(drop non-label columns such as free text or scores)"
        )
    return number


def _resolve(path: Path, rows: list[dict], key_cols: list[str], root: Path) -> tuple[list[str], list[Path]]:
    """Study ids and image paths; VolumeName rows go through the manifest reader's CT-RATE resolution."""
    if key_cols == ["id", "image"]:
        return [r["id"] for r in rows], [root / r["image"] for r in rows]  # an absolute image path stays as it is
    studies = read_manifest(path, root=root)  # no report columns: each study notes "empty report", fine here
    for study in studies:
        if study.problem and study.problem_kind != "empty report":
            log.warning("%s: %s", study.id, study.problem)
    return [s.id for s in studies], [s.image for s in studies]


def prepare_label_cache(table: LabelTable, cache: str | Path, cfg: PreprocessConfig, workers: int = 1) -> LabelTable:
    """Preprocess the table's images into ``cache`` (idempotent, shared with segmentation) and return the table
    of the studies that were cached (quarantined ones are logged and left out)."""
    keys = prepare_cache([SegCase(i, p) for i, p in zip(table.ids, table.images)], cache, cfg, workers=workers)
    kept = [i for i in table.ids if i in keys]
    if len(kept) < len(table.ids):
        log.warning("%d of %d labelled studies could not be cached", len(table.ids) - len(kept), len(table.ids))
    return table.restrict(kept)
