"""One cache, many writers: manifests add up, ``--prune`` is the only way to drop studies, ``--shard I/N`` jobs fill
one cache concurrently, a second run never destroys a first run's work, and workers die with their parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hostile
from pretrain_helpers import subprocess_env
from t3d.cli import main
from t3d.config import PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.preprocess import parse_shard, preprocess_manifest, shard_of

CFG = PreprocessConfig(spacing=(2.0, 2.0, 2.0), min_size=(8, 8, 8))
IDS = [f"s{n:02d}" for n in range(9)]


def studies(root: Path, ids=IDS, name: str = "m.jsonl") -> Path:
    for n, sid in enumerate(ids):
        if not (root / f"{sid}.nii.gz").exists():
            hostile.good_study(root, sid, seed=n)
    return hostile.manifest(root / name, {sid: f"{sid}.nii.gz" for sid in ids})


def index_rows(cache: Path) -> dict[str, dict]:
    return {row["id"]: row for row in StudyCache(cache).index()}


def test_a_second_manifest_adds_to_the_index_and_prune_is_explicit(tmp_path):
    root, out = tmp_path / "root", tmp_path / "cache"
    first = studies(root, IDS[:3], "first.jsonl")
    second = studies(root, IDS[3:5], "second.jsonl")
    preprocess_manifest(first, out, CFG, progress=False)
    summary = preprocess_manifest(second, out, CFG, progress=False)
    assert set(index_rows(out)) == set(IDS[:5]) and summary["indexed"] == 5
    assert preprocess_manifest(first, out, CFG, progress=False)["skipped"] == 3  # nothing lost, nothing redone
    assert set(index_rows(out)) == set(IDS[:5])
    summary = preprocess_manifest(second, out, CFG, progress=False, prune=True)
    assert summary["pruned"] == 3 and set(index_rows(out)) == set(IDS[3:5])
    assert sorted(p.name for p in StudyCache(out).studies.iterdir()) == IDS[3:5]


def test_quarantine_list_is_the_union_too(tmp_path):
    root, out = tmp_path / "root", tmp_path / "cache"
    first = hostile.manifest(root / "first.jsonl", {"gone": "gone.nii.gz"})
    second = studies(root, IDS[:1], "second.jsonl")
    preprocess_manifest(first, out, CFG, progress=False)
    preprocess_manifest(second, out, CFG, progress=False)
    assert [row["id"] for row in json.loads((out / "quarantine.json").read_text())] == ["gone"]


def test_shards_partition_the_manifest():
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) == (0, 1)
    owners = [shard_of(sid, 3) for sid in IDS]
    assert set(owners) <= {0, 1, 2} and owners == [shard_of(sid, 3) for sid in IDS]  # deterministic
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)


def cli(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "t3d",
        "preprocess",
        *args,
        "--quiet",
        "--preprocess.spacing",
        "[2,2,2]",
        "--preprocess.min_size=[8,8,8]",
    ]


def test_three_shards_run_concurrently_into_one_cache_equal_a_single_run(tmp_path):
    root = tmp_path / "root"
    manifest = studies(root)
    single = tmp_path / "single"
    preprocess_manifest(manifest, single, CFG, progress=False)
    shared = tmp_path / "shared"
    jobs = [
        subprocess.Popen(
            cli("--manifest", str(manifest), "--out", str(shared), "--shard", f"{i}/3"), env=subprocess_env()
        )
        for i in range(3)
    ]
    assert [job.wait(600) for job in jobs] == [0, 0, 0]
    assert index_rows(shared) == index_rows(single)
    assert sorted(p.name for p in StudyCache(shared).studies.iterdir()) == IDS


SLOW_WRITER = """
import sys, time
from pathlib import Path
import t3d.data.cache as cache
from t3d.config import PreprocessConfig
from t3d.data.preprocess import preprocess_manifest

manifest, out, started, go = sys.argv[1:5]
real = cache.np.save

def save(path, array, *args, **kwargs):  # pause inside the first study's temporary folder until told to go on
    if "/.tmp" in str(path) and not Path(started).exists():
        Path(started).write_text("writing")
        deadline = time.monotonic() + 300
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return real(path, array, *args, **kwargs)

cache.np.save = save
preprocess_manifest(manifest, out, PreprocessConfig(spacing=(2.0, 2.0, 2.0), min_size=(8, 8, 8)), progress=False)
"""


def test_a_second_run_never_destroys_a_running_first_runs_work(tmp_path):
    root, out = tmp_path / "root", tmp_path / "cache"
    first = studies(root, IDS[:2], "first.jsonl")
    second = studies(root, IDS[2:4], "second.jsonl")
    started, go = tmp_path / "started", tmp_path / "go"
    args = [sys.executable, "-c", SLOW_WRITER, str(first), str(out), str(started), str(go)]
    writer = subprocess.Popen(args, env=subprocess_env())
    try:
        deadline = time.monotonic() + 300
        while not started.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the first writer never started a study"
            time.sleep(0.05)
        preprocess_manifest(second, out, CFG, progress=False)  # starts (and cleans up) while the first is writing
    finally:
        go.write_text("go")
        code = writer.wait(300)
    assert code == 0
    assert set(index_rows(out)) == set(IDS[:4])


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_parent_leaves_no_worker_running(tmp_path):
    root, out = tmp_path / "root", tmp_path / "cache"
    manifest = studies(root, [f"k{n:02d}" for n in range(40)])
    args = [sys.executable, "-m", "t3d", "preprocess", "--manifest", str(manifest), "--out", str(out)]
    args += ["--workers", "2", "--quiet", "--preprocess.spacing", "[0.25,0.25,0.25]", "--preprocess.min_size=[8,8,8]"]
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "studies").is_dir() or not any((out / "studies").iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "no study was written"
            time.sleep(0.05)
        family = _descendants(proc.pid)
        assert len(family) >= 2  # the workers (and the fork server / resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 120  # a cap for a loaded machine, not a timing claim
        while any(_running(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in family if _running(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []
    written = sorted(p.name for p in (out / "studies").iterdir())
    time.sleep(1.0)
    assert sorted(p.name for p in (out / "studies").iterdir()) == written  # nobody keeps writing


def test_shard_flag_on_the_command_line(tmp_path, capsys):
    root, out = tmp_path / "root", tmp_path / "cache"
    manifest = studies(root, IDS[:4])
    base = ["preprocess", "--manifest", str(manifest), "--out", str(out), "--quiet", "--preprocess.min_size=[8,8,8]"]
    for i in range(2):
        assert main([*base, "--shard", f"{i}/2"]) == 0
    assert set(index_rows(out)) == set(IDS[:4])
    assert main([*base, "--shard", "2/2"]) == 2
    assert "I/N" in capsys.readouterr().err
