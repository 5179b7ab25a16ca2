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
  temporaries left by a killed run on this host are removed at start, so a killed run resumes where it stopped.
* **One cache, many runs.** ``index.jsonl`` is the union of the cache: a second manifest adds its studies, and
  ``--prune`` (explicit) removes cached studies that are not in the current manifest. ``--shard I/N`` processes
  the studies whose id hashes to I (0 <= I < N): N jobs (a SLURM array) fill one cache, concurrently.
* **Bad studies never stop the run.** Any error while reading, checking or converting one study quarantines it in
  ``CACHE/quarantine.json`` ({id, image, reason, kind}, the reason one line naming the file); the rest are
  processed. Headers are checked against the file's bytes and ``preprocess.max_voxels`` before anything is
  allocated, FIFOs and devices are refused unopened, and every file read (header-referenced data, DICOM slices,
  symlink targets) must lie inside the data root (``t3d.data.sources``). The outputs are written also when the
  run stops early (Ctrl-C, a dead worker); studies not reached count as ``pending``. Problems with the
  manifest as a whole (unknown format, missing columns, duplicate ids, rows without id or image) stop the run
  before anything is written -- for duplicate ids we refuse rather than guess which row is right, so nothing is
  silently dropped.
* **Sources are only read.** Report text is patient data: it goes to ``index.jsonl`` and is never logged.

Outputs: ``index.jsonl`` (one row per cached study: this manifest's in manifest order, then the cache's others; id,
key, findings, impression, report, image, label and the extra manifest columns), ``quarantine.json``,
``summary.json`` (this run's counts).

Study ids: a manifest's ``id`` column is the id as written; a CT-RATE ``VolumeName`` gives the file name without
folders and without ``.nii``/``.nii.gz`` (``volumes/train_1_a_1.nii.gz`` -> ``train_1_a_1``), so a folder never
makes one scan two studies. Labels tables and split files must use these ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm import tqdm

from t3d.config import ConfigError, PreprocessConfig, PretrainConfig, load_config
from t3d.data.cache import StudyCache, StudyMeta, safe_key, write_json_atomic
from t3d.data.io import image_format
from t3d.data.manifest import Study, read_manifest
from t3d.data.pool import run_in_pool
from t3d.data.records import Outcome, format_summary, write_outputs
from t3d.data.sources import StudyError, content_hash, source_files, stat_fingerprint
from t3d.data.volume import prepare_study, settings_of

log = logging.getLogger(__name__)


def preprocess_manifest(
    manifest: str | Path,
    out: str | Path,
    cfg: PreprocessConfig | None = None,
    root: str | Path | None = None,
    workers: int = 1,
    label_key: str | None = None,
    verify: bool = False,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    prune: bool = False,
) -> dict[str, Any]:
    """Preprocess every study of ``manifest`` into the cache folder ``out``; return the run summary.

    ``root``: folder relative paths resolve against (default: the manifest's folder); ``workers``: processes
    (1 = in this process); ``label_key``: manifest column with label paths; ``verify``: hash every source
    instead of trusting unchanged size + mtime; ``shard`` (I, N): process only the studies of shard I of N;
    ``prune``: remove cached studies that are not in this manifest. Raises ManifestError for a manifest that cannot
    be used. The outputs are written even when processing stops early (KeyboardInterrupt, a dead worker).
    """
    start = time.perf_counter()
    cfg = cfg or PreprocessConfig()
    cache = StudyCache(out)
    check_out(cache.root)
    every = read_manifest(manifest, root=root, label_key=label_key)
    keys = assign_keys(every)  # over the whole manifest: every shard names a study's folder alike
    studies = [study for study in every if shard_of(study.id, shard[1]) == shard[0]]
    cleaned = cache.clean_temporaries()
    if cleaned:
        log.info("removed %d unfinished study folder(s) left by an earlier run", cleaned)
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
    try:
        run_studies(todo, cfg, cache.root, workers, progress, outcomes)
    finally:  # also on Ctrl-C: what finished is indexed, the rest is pending
        seconds = time.perf_counter() - start
        keep = keys if prune else None
        summary = write_outputs(cache, studies, outcomes, cfg, manifest, workers, seconds, shard, keep)
    return summary


def check_out(out: Path) -> None:
    """ConfigError unless ``out`` is (or can become) a writable folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; pass a folder for the cache")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the cache folder {out} ({err.strerror}); pass a writable --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"cache folder {out} is not writable; pass a writable --out or fix its permissions")


def shard_of(study_id: str, shards: int) -> int:
    """The shard (0..shards-1) a study belongs to: a hash of its id, stable across manifest edits and hosts."""
    return int(hashlib.sha256(study_id.encode("utf-8", "replace")).hexdigest()[:12], 16) % shards


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; ConfigError otherwise."""
    if not text:
        return 0, 1
    index, _, total = text.partition("/")
    if not (index.isdigit() and total.isdigit()) or not 0 <= int(index) < int(total):
        raise ConfigError(
            f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4 "
            "(in a SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-3)"
        )
    return int(index), int(total)


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
    """Every file the image and the label are read from (StudyError when missing, not regular, outside the data
    root, or of unknown format)."""
    found = []
    for path, what in ((study.image, "image"), (study.label, "label")):
        if path is None:
            found.append([])
            continue
        files = source_files(path, study.root, what)
        image_format(path)
        found.append(files)
    return found[0], found[1]


def study_hash(image_files: list[Path], label_files: list[Path], settings: dict[str, Any]) -> str:
    """sha256 over the image bytes, the label bytes and the settings: the identity of a cached entry."""
    parts = [content_hash(image_files), content_hash(label_files), json.dumps(settings, sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- running


def process_study(study: Study, key: str, cfg: PreprocessConfig, cache_root: str | Path) -> Outcome:
    """Hash the sources; skip if unchanged, else prepare the volume and write it atomically (worker entry).

    Any error of reading, checking or converting the study quarantines it (one line naming the file); errors of
    writing the cache (disk full, permissions) are not the study's and stop the run.
    """
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
    except Exception as err:  # a reader's or transform's own error on this study's data
        first = (str(err).strip().splitlines() or [""])[0][:300]
        reason = f"cannot process {study.image} ({type(err).__name__}: {first}); check or re-export the file"
        return Outcome(study.id, key, "quarantined", reason, "unreadable", time.perf_counter() - start)
    meta.key, meta.source_hash, meta.source_stat = key, digest, stat
    seed = int(hashlib.sha256(study.id.encode("utf-8", "replace")).hexdigest()[:8], 16)
    cache.write_study(meta, volume, label, rng_seed=seed)
    return Outcome(study.id, key, "processed", seconds=time.perf_counter() - start)


def run_studies(
    todo: list[tuple[Study, str]],
    cfg: PreprocessConfig,
    cache_root: Path,
    workers: int,
    progress: bool,
    outcomes: dict[str, Outcome],
) -> None:
    """Process ``todo`` in this process (workers <= 1) or in a pool of worker processes, with a progress bar;
    each outcome lands in ``outcomes`` as soon as it is known (so an interrupted run keeps them)."""
    bar = tqdm(total=len(todo), desc="preprocess", unit="study", disable=None if progress else True)
    try:
        if workers <= 1 or len(todo) <= 1:
            for study, key in todo:
                outcome = process_study(study, key, cfg, cache_root)
                outcomes[outcome.id] = outcome
                bar.update()
            return
        jobs = [(study, key, cfg, cache_root) for study, key in todo]
        try:
            for outcome in run_in_pool(process_study, jobs, min(workers, len(todo)), [__name__]):
                outcomes[outcome.id] = outcome
                bar.update()
        except BrokenProcessPool:
            raise RuntimeError(
                "a preprocessing worker died (out of memory?); studies finished so far are kept and indexed: "
                "rerun with fewer --workers to resume"
            ) from None
    finally:
        bar.close()


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
        shard=parse_shard(args.shard),
        prune=args.prune,
    )
    quarantine = json.loads((Path(out) / "quarantine.json").read_text(encoding="utf-8"))
    print(format_summary(summary, quarantine))
    return 0 if summary["processed"] + summary["skipped"] > 0 else 1
