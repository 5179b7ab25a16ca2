"""Studies of a downstream dataset (an image, for segmentation also a label map) and their preprocessed cache.

    cases = [SegCase(case_id(path), path, label) for path, label in pairs]
    keys = prepare_cache(cases, "runs/seg/cache", preprocess_cfg, workers=2)   # id -> cache key

Studies go through the pre-training preprocessing (``t3d.data.preprocess``: RAS, target spacing, HU checks, labels
resampled nearest onto the image grid), so a fine-tuned network sees the voxel size and intensity domain its
encoder was pre-trained on. Segmentation, classification and prediction share this cache format.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from t3d.config import PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.preprocess import preprocess_manifest

log = logging.getLogger(__name__)

NO_REPORT = "(segmentation study without report)"
"""Placeholder report text: the preprocessing manifest requires one, and the cache index carries it."""


@dataclass
class SegCase:
    """One labelled (or, for prediction, unlabelled) study of a segmentation dataset."""

    id: str
    image: Path
    label: Path | None = None


def case_id(path: str | Path) -> str:
    """Study id from a file name: ``imagesTr/liver_7.nii.gz`` -> ``liver_7``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def prepare_cache(
    cases: Sequence[SegCase], cache_dir: str | Path, cfg: PreprocessConfig, workers: int = 1
) -> dict[str, str]:
    """Preprocess ``cases`` (image + label) into ``cache_dir``; returns id -> cache key of the cached ones.

    Unchanged studies are skipped (the preprocessing is idempotent); quarantined ones are logged and left out.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # The manifest reader keeps every path inside its data root: use the deepest folder holding all files.
    files = [Path(os.path.abspath(p)) for c in cases for p in (c.image, c.label) if p is not None]
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    manifest = cache_dir / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as fh:
        for c in cases:
            row = {"id": c.id, "image": os.path.relpath(os.path.abspath(c.image), root), "report": NO_REPORT}
            if c.label is not None:
                row["label"] = os.path.relpath(os.path.abspath(c.label), root)
            fh.write(json.dumps(row) + "\n")
    label_key = "label" if any(c.label is not None for c in cases) else None
    summary = preprocess_manifest(manifest, cache_dir, cfg, root=root, workers=workers, label_key=label_key)
    if summary["quarantined"]:
        bad = json.loads((cache_dir / "quarantine.json").read_text())
        for row in bad:
            log.warning("left out %s: %s", row["id"], row["reason"])
    keys = {row["id"]: row["key"] for row in StudyCache(cache_dir).index()}
    if not keys:
        raise ValueError(f"no study could be preprocessed into {cache_dir}; see {cache_dir / 'quarantine.json'}")
    return keys
