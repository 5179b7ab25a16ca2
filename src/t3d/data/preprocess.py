"""``t3d preprocess``: a manifest of raw studies -> the int16 HU crop cache of ``t3d.data.cache`` (docs/method.md §1).

    t3d preprocess --manifest reports.csv --root /data/ct --out cache --workers 8 '--preprocess.spacing=[0.8,0.8,1.5]'

What happens to one study is in ``t3d.data.volume`` (read, check, RAS, resample, pad, int16). This module runs it
over a manifest:

* **Idempotent, resumable.** Each cached study records ``source_hash`` = sha256 of the source bytes (the file, or
  every file of a DICOM folder), of the label's bytes and of the preprocessing settings; a re-run skips a study
  whose hash is unchanged. Hashing a CT costs about as much as reading it, so a study whose files still have the
  paths, sizes and mtimes recorded when it was hashed (``source_stat``) is skipped without re-hashing; ``--verify``
  hashes everything (the hash is the truth; the stat shortcut only trusts that nobody rewrote a file in place
  while keeping its size and mtime). Each study is written under a temporary name and renamed into place, and
  temporaries left by a killed run are removed at start, so a killed run resumes where it stopped.
* **Bad studies never stop the run.** They go to ``CACHE/quarantine.json`` ({id, image, reason, kind}); the rest
  are processed. Problems with the manifest as a whole (unknown format, missing columns, duplicate ids, rows
  without id or image) stop the run before anything is written -- for duplicate ids we refuse rather than guess
  which row is right, so nothing is silently dropped.
* **Sources are only read.** Report text is patient data: it goes to ``index.jsonl`` and is never logged.

Outputs: ``index.jsonl`` (one row per cached study of this manifest, in manifest order: id, key, findings,
impression, report, image, label and the extra manifest columns), ``quarantine.json``, ``summary.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from t3d.config import ConfigError, PreprocessConfig, PretrainConfig, load_config
from t3d.data.cache import StudyCache, StudyMeta, safe_key, write_json_atomic
from t3d.data.io import StudyError, content_hash, image_format, source_files, stat_fingerprint
from t3d.data.manifest import Study, read_manifest
from t3d.data.volume import prepare_study, settings_of

log = logging.getLogger(__name__)

START_METHOD = "forkserver"
"""How worker processes start. Not ``fork``: forking a process that already ran torch/OpenMP threads can deadlock
the children. The fork server imports this module once and workers fork from it, instead of each importing MONAI
(several seconds) as with ``spawn``."""


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


def preprocess_manifest(
    manifest: str | Path,
    out: str | Path,
    cfg: PreprocessConfig | None = None,
    root: str | Path | None = None,
    workers: int = 1,
    label_key: str | None = None,
    verify: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Preprocess every study of ``manifest`` into the cache folder ``out``; return the run summary.

    ``root``: folder relative paths resolve against (default: the manifest's folder); ``workers``: processes
    (1 = in this process); ``label_key``: manifest column with label paths; ``verify``: hash every source
    instead of trusting unchanged size + mtime. Raises ManifestError for a manifest that cannot be used.
    """
    start = time.perf_counter()
    cfg = cfg or PreprocessConfig()
    studies = read_manifest(manifest, root=root, label_key=label_key)
    cache = StudyCache(out)
    cache.root.mkdir(parents=True, exist_ok=True)
    cleaned = cache.clean_temporaries()
    if cleaned:
        log.info("removed %d unfinished study folder(s) left by an earlier run", cleaned)
    keys = assign_keys(studies)
    outcomes: dict[str, Outcome] = {}
    todo = []
    for study in studies:
        key = keys[study.id]
        if study.problem:
            outcomes[study.id] = Outcome(study.id, key, "quarantined", study.problem, study.problem_kind)
        elif not verify and unchanged_by_stat(cache, study, key, cfg):
            outcomes[study.id] = Outcome(study.id, key, "skipped")
        else:
            todo.append((study, key))
    for outcome in run_studies(todo, cfg, cache.root, workers, progress):
        outcomes[outcome.id] = outcome
    return write_outputs(cache, studies, outcomes, cfg, manifest, workers, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- planning


def assign_keys(studies: list[Study]) -> dict[str, str]:
    """Unique, filesystem-safe cache folder names (ids that clash after sanitising get a short hash suffix)."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for study in studies:
        key = safe_key(study.id)
        if key.lower() in used:  # case-insensitive: macOS/Windows file systems
            key = f"{key[:140]}-{hashlib.sha256(study.id.encode('utf-8', 'replace')).hexdigest()[:8]}"
        used.add(key.lower())
        keys[study.id] = key
    return keys


def unchanged_by_stat(cache: StudyCache, study: Study, key: str, cfg: PreprocessConfig) -> bool:
    """True when the cached entry was built from these very files (same paths, sizes, mtimes) and settings."""
    meta = cached_meta(cache, key)
    if meta is None or meta.id != study.id or meta.source != str(study.image):
        return False
    if meta.label_source != str(study.label or "") or meta.preprocess != settings_of(cfg):
        return False
    try:
        image_files, label_files = study_files(study)
        return meta.source_stat == stat_fingerprint(image_files + label_files)
    except (StudyError, OSError):
        return False


def cached_meta(cache: StudyCache, key: str) -> StudyMeta | None:
    """The complete cached entry's meta, or None (absent, unreadable or from an incompatible version)."""
    if not cache.is_complete(key):
        return None
    try:
        return cache.meta(key)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def study_files(study: Study) -> tuple[list[Path], list[Path]]:
    """Source files of the image and of the label (StudyError when missing or of unknown format)."""
    found = []
    for path, what in ((study.image, "image"), (study.label, "label")):
        if path is None:
            found.append([])
            continue
        if not path.exists():
            raise StudyError(f"{what} not found: {path}", kind="missing file")
        image_format(path)
        found.append(source_files(path))
    return found[0], found[1]


def study_hash(image_files: list[Path], label_files: list[Path], settings: dict[str, Any]) -> str:
    """sha256 over the image bytes, the label bytes and the settings: the identity of a cached entry."""
    parts = [content_hash(image_files), content_hash(label_files), json.dumps(settings, sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- running


def process_study(study: Study, key: str, cfg: PreprocessConfig, cache_root: str | Path) -> Outcome:
    """Hash the sources; skip if unchanged, else prepare the volume and write it atomically (worker entry)."""
    start = time.perf_counter()
    cache = StudyCache(cache_root)
    try:
        image_files, label_files = study_files(study)
        stat = stat_fingerprint(image_files + label_files)
        digest = study_hash(image_files, label_files, settings_of(cfg))
        old = cached_meta(cache, key)
        if old is not None and old.id == study.id and old.source_hash == digest:
            # Touched (or moved) but identical: remember the new paths/stat so the next run takes the shortcut.
            path = cache.studies / key / "meta.json"
            moved = {"source_stat": stat, "source": str(study.image), "label_source": str(study.label or "")}
            write_json_atomic(path, {**json.loads(path.read_text()), **moved})
            return Outcome(study.id, key, "skipped", seconds=time.perf_counter() - start)
        volume, label, meta = prepare_study(study, cfg)
    except StudyError as err:
        return Outcome(study.id, key, "quarantined", str(err), err.kind, time.perf_counter() - start)
    meta.key, meta.source_hash, meta.source_stat = key, digest, stat
    seed = int(hashlib.sha256(study.id.encode("utf-8", "replace")).hexdigest()[:8], 16)
    cache.write_study(meta, volume, label, rng_seed=seed)
    return Outcome(study.id, key, "processed", seconds=time.perf_counter() - start)


def run_studies(
    todo: list[tuple[Study, str]], cfg: PreprocessConfig, cache_root: Path, workers: int, progress: bool
) -> list[Outcome]:
    """Process ``todo`` in this process (workers <= 1) or in a pool of spawned processes, with a progress bar."""
    bar = tqdm(total=len(todo), desc="preprocess", unit="study", disable=None if progress else True)
    outcomes = []
    try:
        if workers <= 1 or len(todo) <= 1:
            for study, key in todo:
                outcomes.append(process_study(study, key, cfg, cache_root))
                bar.update()
            return outcomes
        context = multiprocessing.get_context(START_METHOD)
        if START_METHOD == "forkserver":
            context.set_forkserver_preload([__name__])
        pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_init_worker)
        try:
            futures = [pool.submit(process_study, study, key, cfg, cache_root) for study, key in todo]
            for future in as_completed(futures):
                outcomes.append(future.result())
                bar.update()
        except BrokenProcessPool:
            raise RuntimeError(
                "a preprocessing worker died (out of memory?); studies finished so far are kept: "
                "rerun with fewer --workers to resume"
            ) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return outcomes
    finally:
        bar.close()


def _init_worker() -> None:
    torch.set_num_threads(1)  # K workers x 1 thread: resampling parallelises over studies, not voxels


# ----------------------------------------------------------------------------------------------- outputs


def write_outputs(
    cache: StudyCache,
    studies: list[Study],
    outcomes: dict[str, Outcome],
    cfg: PreprocessConfig,
    manifest: str | Path,
    workers: int,
    seconds: float,
) -> dict[str, Any]:
    """Write index.jsonl, quarantine.json and summary.json; return the summary."""
    rows, quarantine = [], []
    for study in studies:
        outcome = outcomes[study.id]
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
    cache.write_index(rows)
    cache.write_json("quarantine.json", quarantine)
    counts = Counter(o.status for o in outcomes.values())
    processed = [o.seconds for o in outcomes.values() if o.status == "processed"]
    summary = {
        "manifest": str(Path(manifest).absolute()),
        "cache": str(cache.root.absolute()),
        "total": len(studies),
        "processed": counts["processed"],
        "skipped": counts["skipped"],
        "quarantined": counts["quarantined"],
        "reasons": dict(Counter(o.kind for o in outcomes.values() if o.status == "quarantined").most_common()),
        "workers": workers,
        "seconds": round(seconds, 3),
        "seconds_per_processed_study": round(sum(processed) / len(processed), 3) if processed else None,
        "preprocess": settings_of(cfg),
    }
    cache.write_json("summary.json", summary)
    log.info("preprocess: %(processed)d processed, %(skipped)d skipped, %(quarantined)d quarantined", summary)
    return summary


def format_summary(summary: dict[str, Any], quarantine: list[dict[str, Any]], shown: int = 10) -> str:
    """The human-readable summary printed by the command (ids and reasons only: never report text)."""
    lines = [
        f"{summary['total']} studies -> {summary['cache']}: {summary['processed']} processed, "
        f"{summary['skipped']} skipped (unchanged), {summary['quarantined']} quarantined in {summary['seconds']:.1f} s"
    ]
    if quarantine:
        lines.append("quarantined: " + ", ".join(f"{n} {kind}" for kind, n in summary["reasons"].items()))
        lines += [f"  {row['id']}: {row['reason']}" for row in quarantine[:shown]]
        if len(quarantine) > shown:
            lines.append(f"  ... {len(quarantine) - shown} more")
        lines.append(f"  (all of them in {Path(summary['cache']) / 'quarantine.json'})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command


def run_command(args: argparse.Namespace) -> int:
    stray = [a for a in args.overrides if a.startswith("--") and not a.startswith(("--preprocess.", "--data."))]
    if stray:
        raise ConfigError(f"t3d preprocess only takes --preprocess.* and --data.* overrides, got {' '.join(stray)}")
    full = load_config(PretrainConfig, args.config, args.overrides)
    manifest = args.manifest or full.data.manifest
    out = args.out or (full.data.cache if args.config else "")
    if not manifest or not out:
        raise ConfigError("pass --manifest FILE and --out CACHE_DIR (or set data.manifest and data.cache in --config)")
    summary = preprocess_manifest(
        manifest,
        out,
        full.preprocess,
        root=args.root or full.data.root or None,
        workers=args.workers,
        label_key=args.label_key,
        verify=args.verify,
        progress=not args.quiet,
    )
    quarantine = json.loads((Path(out) / "quarantine.json").read_text(encoding="utf-8"))
    print(format_summary(summary, quarantine))
    return 0 if summary["processed"] + summary["skipped"] > 0 else 1
