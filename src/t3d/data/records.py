"""What a preprocessing run leaves in the cache besides the studies: ``index.jsonl``, ``quarantine.json`` and
``summary.json`` (``t3d.data.preprocess`` runs the studies; this module records them).

The index and the quarantine list describe the whole cache, not one run: they are rewritten under the cache's
lock as this run's rows followed by the earlier rows of studies this run did not touch (and that are still in the
cache), so a second manifest, a shard of a SLURM array or a concurrent run adds to them instead of replacing them.
``prune`` (``--prune``) is the one explicit way to drop studies that are not in the current manifest.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t3d.config import PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.manifest import Study
from t3d.data.volume import settings_of

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What happened to one study in this run."""

    id: str
    key: str
    status: str
    """``processed``, ``skipped`` (unchanged since the last run) or ``quarantined``."""
    reason: str = ""
    kind: str = ""
    seconds: float = 0.0


def write_outputs(
    cache: StudyCache,
    studies: list[Study],
    outcomes: dict[str, Outcome],
    cfg: PreprocessConfig,
    manifest: str | Path,
    workers: int,
    seconds: float,
    shard: tuple[int, int] = (0, 1),
    keep: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write index.jsonl, quarantine.json and summary.json; return the summary.

    ``studies`` without an outcome were not reached (an interrupted run): they count as pending and keep their
    earlier rows. ``keep`` (id -> key of the whole manifest): prune every other study from the cache.
    """
    rows, quarantine = [], []
    for study in studies:
        outcome = outcomes.get(study.id)
        if outcome is None:
            continue
        if outcome.status == "quarantined":
            row = {"id": study.id, "image": str(study.image), "reason": outcome.reason, "kind": outcome.kind}
            quarantine.append(row)
            continue
        rows.append(
            {
                **study.extra,
                "id": study.id,
                "key": outcome.key,
                "findings": study.findings,
                "impression": study.impression,
                "report": study.report,
                "image": str(study.image),
                "label": str(study.label) if study.label else None,
            }
        )
    with cache.lock():
        pruned = prune(cache, keep) if keep is not None else 0
        rows, quarantine = merge_earlier(cache, rows, quarantine, set(outcomes), keep)
        cache.write_index(rows)
        cache.write_json("quarantine.json", quarantine)
    counts = Counter(o.status for o in outcomes.values())
    processed = [o.seconds for o in outcomes.values() if o.status == "processed"]
    summary = {
        "manifest": str(Path(manifest).absolute()),
        "cache": str(cache.root.absolute()),
        "shard": f"{shard[0]}/{shard[1]}",
        "total": len(studies),
        "processed": counts["processed"],
        "skipped": counts["skipped"],
        "quarantined": counts["quarantined"],
        "pending": len(studies) - len(outcomes),
        "pruned": pruned,
        "indexed": len(rows),
        "reasons": dict(Counter(o.kind for o in outcomes.values() if o.status == "quarantined").most_common()),
        "workers": workers,
        "seconds": round(seconds, 3),
        "seconds_per_processed_study": round(sum(processed) / len(processed), 3) if processed else None,
        "preprocess": settings_of(cfg),
    }
    cache.write_json("summary.json", summary)
    log.info("preprocess: %(processed)d processed, %(skipped)d skipped, %(quarantined)d quarantined", summary)
    return summary


def merge_earlier(
    cache: StudyCache, rows: list[dict], quarantine: list[dict], ran: set[str], keep: dict[str, str] | None
) -> tuple[list[dict], list[dict]]:
    """This run's rows plus the earlier index/quarantine rows of studies this run has no outcome for.

    An earlier index row stays only while its folder still holds that study; with ``keep``, only ids in it stay.
    """
    seen = ran | {row["id"] for row in rows}
    for row in _read_rows(cache.root / "index.jsonl"):
        sid = row.get("id")
        if sid in seen or (keep is not None and sid not in keep) or cache.owner(str(row.get("key", ""))) != sid:
            continue
        seen.add(sid)
        rows.append(row)
    indexed = {row["id"] for row in rows}
    done = ran | {row["id"] for row in quarantine}
    for row in _read_json_list(cache.root / "quarantine.json"):
        sid = row.get("id")
        if sid in done or sid in indexed or (keep is not None and sid not in keep):
            continue
        done.add(sid)
        quarantine.append(row)
    return rows, quarantine


def prune(cache: StudyCache, keep: dict[str, str]) -> int:
    """Delete cached studies whose folder is not the one ``keep`` (id -> key) names for the id it holds."""
    if not cache.studies.is_dir():
        return 0
    removed = 0
    for folder in sorted(cache.studies.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        owner = cache.owner(folder.name)
        if owner is not None and keep.get(owner) == folder.name:
            continue
        cache.remove_study(folder.name)
        removed += 1
    if removed:
        log.info("--prune: removed %d cached studies that are not in the manifest", removed)
    return removed


def _read_rows(path: Path) -> list[dict]:
    """JSON lines of ``path`` that parse as objects with an id (a damaged line is dropped, not fatal)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def _read_json_list(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [row for row in data if isinstance(row, dict) and "id" in row] if isinstance(data, list) else []


def format_summary(summary: dict[str, Any], quarantine: list[dict[str, Any]], shown: int = 10) -> str:
    """The human-readable summary printed by the command (ids and reasons only: never report text)."""
    lines = [
        f"{summary['total']} studies -> {summary['cache']}: {summary['processed']} processed, "
        f"{summary['skipped']} skipped (unchanged), {summary['quarantined']} quarantined in {summary['seconds']:.1f} s"
        + (f"; {summary['pending']} not reached (rerun to finish)" if summary.get("pending") else "")
        + (f"; pruned {summary['pruned']}" if summary.get("pruned") else "")
    ]
    if quarantine:
        if summary["reasons"]:
            lines.append("quarantined: " + ", ".join(f"{n} {kind}" for kind, n in summary["reasons"].items()))
        lines += [f"  {row['id']}: {row['reason']}" for row in quarantine[:shown]]
        if len(quarantine) > shown:
            lines.append(f"  ... {len(quarantine) - shown} more")
        lines.append(f"  (all of them in {Path(summary['cache']) / 'quarantine.json'})")
    return "\n".join(lines)
