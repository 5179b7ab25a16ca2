"""Labelled studies for classification: the findings CSV, its images, the cache and the train/val/test split.

    table = read_labels("multi_abnormality_labels.csv", images="dataset/valid")   # CT-RATE layout
    table = prepare_label_cache(table, "runs/cls/cache", pre.preprocess, workers=2)
    splits = split_studies(table.ids, "splits.json", fraction=0.1, seed=0)         # {"train", "val", "test"}
    y = table.labels_of(splits["test"])                                          # (N, L) float32

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
from t3d.data.manifest import id_mismatch

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
    from t3d.data.manifest import read_manifest

    studies = read_manifest(path, root=root)  # no report columns: each study notes "empty report", fine here
    for study in studies:
        if study.problem and study.problem_kind != "empty report":
            log.warning("%s: %s", study.id, study.problem)
    return [s.id for s in studies], [s.image for s in studies]


def prepare_label_cache(table: LabelTable, cache: str | Path, cfg: PreprocessConfig, workers: int = 1) -> LabelTable:
    """Preprocess the table's images into ``cache`` (idempotent, shared with segmentation) and return the table
    of the studies that were cached (quarantined ones are logged and left out)."""
    from t3d.finetune.segdata import SegCase, prepare_cache

    keys = prepare_cache([SegCase(i, p) for i, p in zip(table.ids, table.images)], cache, cfg, workers=workers)
    kept = [i for i in table.ids if i in keys]
    if len(kept) < len(table.ids):
        log.warning("%d of %d labelled studies could not be cached", len(table.ids) - len(kept), len(table.ids))
    return table.restrict(kept)


def split_studies(
    ids: list[str],
    splits: str | Path | None = None,
    train_split: str = "finetune",
    test_split: str = "test",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` study ids, each in ``ids`` order (``t3d.finetune.segdata.make_splits``).

    With a split file the test set is its ``test_split`` and the pool is its ``train_split``; without one the test
    set is a seeded ``test_fraction`` of all studies. Validation (``val_fraction`` of the pool) is carved before the
    label ``fraction`` is applied, and training subsets are nested across fractions (same seed). Ids that are not
    in ``ids`` (not labelled or not cached) are dropped.
    """
    from t3d.evaluate.studies import read_split
    from t3d.finetune.segdata import make_splits

    have = set(ids)
    if splits:
        pool = [i for i in read_split(splits, train_split) if i in have]
        test = [i for i in read_split(splits, test_split) if i in have]
        both = set(pool) & set(test)
        if both:
            raise ValueError(f"{splits}: {len(both)} studies are in both '{train_split}' and '{test_split}'")
        if not test:
            wanted, where = read_split(splits, test_split), f"split '{test_split}' of {splits}"
            raise ValueError(
                f"{splits}: no labelled, cached study in split '{test_split}': "
                + id_mismatch(list(ids), wanted, "labelled, cached studies", where)
            )
    else:
        pool, test = list(ids), []
    parts = make_splits(pool, test, fraction, val_fraction, test_fraction, seed)
    if not parts["test"]:
        raise ValueError(f"no test studies: {len(ids)} labelled studies with test_fraction={test_fraction}")
    position = {i: n for n, i in enumerate(ids)}
    return {name: sorted(parts[name], key=position.__getitem__) for name in ("train", "val", "test")}
