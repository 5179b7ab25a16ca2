"""Held-out studies for evaluation: preprocess them like the checkpoint's training data, pick a split, get reports.

prepare_cache("heldout.jsonl", "eval_cache", jm.cfg.preprocess, workers=2)   # idempotent (t3d preprocess)
ids = read_split("splits.json", "test")
ids, reports = report_texts("eval_cache", jm.cfg.text.sections, ids)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from t3d.config import PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.preprocess import preprocess_manifest
from t3d.pretrain.data import report_text

log = logging.getLogger(__name__)


def prepare_cache(
    manifest: str | Path,
    cache: str | Path,
    cfg: PreprocessConfig,
    root: str | Path | None = None,
    workers: int = 2,
) -> dict:
    """Run ``t3d preprocess`` on ``manifest`` into ``cache`` with the checkpoint's preprocessing settings.

    Studies already cached with the same settings are skipped; quarantined ones are logged and left out. Raises
    when nothing could be cached.
    """
    summary = preprocess_manifest(manifest, cache, cfg, root=root, workers=workers)
    if summary.get("quarantined"):
        log.warning(
            "%d of %d studies quarantined by preprocessing (see %s): %s",
            summary["quarantined"],
            summary["total"],
            Path(cache) / "quarantine.json",
            summary.get("reasons"),
        )
    if summary["total"] - summary.get("quarantined", 0) == 0:
        raise ValueError(f"no study of {manifest} could be preprocessed; see {Path(cache) / 'quarantine.json'}")
    return summary


def read_split(path: str | Path, name: str) -> list[str]:
    """Study ids of split ``name`` in a JSON split file (``{"pretrain": [...], "finetune": [...], "test": [...]}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    splits = json.loads(path.read_text())
    if not isinstance(splits, dict) or name not in splits:
        have = ", ".join(splits) if isinstance(splits, dict) else type(splits).__name__
        raise ValueError(f"split '{name}' is not in {path}; it holds: {have}")
    return [str(i) for i in splits[name]]


def cached_ids(cache: str | Path, ids: list[str] | None = None) -> list[str]:
    """Ids of the studies present in the cache, in ``ids`` order when given (missing ones dropped with a warning)."""
    present = [row["id"] for row in StudyCache(cache).index()]
    if ids is None:
        return present
    have = set(present)
    missing = [i for i in ids if i not in have]
    if missing:
        log.warning("%d requested studies are not in %s (quarantined or absent): %s", len(missing), cache, missing[:5])
    return [i for i in ids if i in have]


def report_texts(cache: str | Path, sections: str, ids: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(ids, report texts restricted to ``sections``) of the cached studies that have a non-empty report."""
    rows = {row["id"]: row for row in StudyCache(cache).index()}
    order = cached_ids(cache, ids)
    texts = [report_text(rows[i], sections) for i in order]
    kept = [(i, t) for i, t in zip(order, texts) if t.strip()]
    if len(kept) < len(order):
        log.warning("%d studies without report text in sections '%s' left out", len(order) - len(kept), sections)
    return [i for i, _ in kept], [t for _, t in kept]
