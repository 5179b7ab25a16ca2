"""Preprocessing runs: manifests of every layout, idempotent re-runs, atomic writes, workers, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np
import pytest

import t3d.data.cache as cache_module
import t3d.data.pool as pool_module
import t3d.data.preprocess as preprocess_module
from studyfiles import ct_volume, tree_state, write_jsonl, write_nifti
from t3d.cli import main
from t3d.config import PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.preprocess import preprocess_manifest

CFG = PreprocessConfig(spacing=(2.0, 2.0, 2.0), min_size=(8, 8, 8))


def make_studies(root, ids=("a", "b", "c")):
    for i, sid in enumerate(ids):
        write_nifti(root / "images" / f"{sid}.nii.gz", ct_volume(seed=i), spacing=(1.0, 1.0, 2.0))
    rows = [{"id": s, "image": f"images/{s}.nii.gz", "findings": f"Finding {s}.", "impression": "Ok."} for s in ids]
    return write_jsonl(root / "pretrain.jsonl", rows)


def run(manifest, out, cfg=CFG, **kw):
    return preprocess_manifest(manifest, out, cfg, progress=False, **kw)


def test_csv_jsonl_and_ctrate_manifests_end_to_end(tmp_path):
    jsonl = make_studies(tmp_path)
    (tmp_path / "pretrain.csv").write_text(
        'id,image,report,site\na,images/a.nii.gz,"Line one.\nLine two.",north\nb,images/b.nii.gz,Normal.,south\n'
    )
    nested = tmp_path / "ctrate" / "train" / "train_4" / "train_4_a"
    write_nifti(nested / "train_4_a_2.nii.gz", ct_volume(seed=9), spacing=(0.8, 0.8, 1.5))
    (tmp_path / "reports.csv").write_text(
        "VolumeName,Findings_EN,Impressions_EN\ntrain_4_a_2.nii.gz,Small nodule right upper lobe.,Nodule.\n"
    )
    assert run(jsonl, tmp_path / "c1")["processed"] == 3
    assert run(tmp_path / "pretrain.csv", tmp_path / "c2")["processed"] == 2
    assert run(tmp_path / "reports.csv", tmp_path / "c3", root=tmp_path / "ctrate")["processed"] == 1
    rows = StudyCache(tmp_path / "c1").index()
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["report"] == "Finding a.\nOk." and rows[0]["findings"] == "Finding a." and rows[0]["label"] is None
    assert rows[0]["image"] == str(tmp_path / "images" / "a.nii.gz")
    csv_rows = StudyCache(tmp_path / "c2").index()
    assert csv_rows[0]["report"] == "Line one.\nLine two." and csv_rows[0]["site"] == "north"
    (ct,) = StudyCache(tmp_path / "c3").index()
    assert (
        ct["id"] == "train_4_a_2"
        and ct["impression"] == "Nodule."
        and ct["image"].endswith("train_4_a/train_4_a_2.nii.gz")
    )
    assert StudyCache(tmp_path / "c3").meta(ct["key"]).original_spacing == (0.8, 0.8, 1.5)


def test_rerun_skips_unchanged_and_reprocesses_only_the_changed(tmp_path, monkeypatch):
    manifest = make_studies(tmp_path)
    sources = tree_state(tmp_path / "images")
    assert run(manifest, tmp_path / "cache")["processed"] == 3
    cache = StudyCache(tmp_path / "cache")
    first_meta = {k: cache.meta(k) for k in "abc"}

    # Unchanged files: skipped by the size+mtime shortcut, without hashing anything.
    with monkeypatch.context() as m:
        m.setattr(preprocess_module, "content_hash", lambda files: pytest.fail("hashed an unchanged study"))
        summary = run(manifest, tmp_path / "cache")
    assert (summary["processed"], summary["skipped"]) == (0, 3)

    # Same bytes, new mtime: hashed, found identical, skipped; the new stat is remembered.
    os.utime(tmp_path / "images" / "a.nii.gz", ns=(10**18, 10**18))
    assert (run(manifest, tmp_path / "cache")["skipped"]) == 3
    assert cache.meta("a").source_stat != first_meta["a"].source_stat
    assert cache.meta("a").source_hash == first_meta["a"].source_hash

    # New content in one file: only that study is re-processed.
    write_nifti(tmp_path / "images" / "b.nii.gz", ct_volume(seed=42), spacing=(1.0, 1.0, 2.0))
    summary = run(manifest, tmp_path / "cache")
    assert (summary["processed"], summary["skipped"]) == (1, 2)
    assert cache.meta("b").source_hash != first_meta["b"].source_hash
    assert cache.meta("c").source_hash == first_meta["c"].source_hash

    # --verify hashes everything (nothing changed since); new settings re-process everything.
    assert run(manifest, tmp_path / "cache", verify=True)["skipped"] == 3
    summary = run(manifest, tmp_path / "cache", PreprocessConfig(spacing=(3.0, 3.0, 3.0), min_size=(8, 8, 8)))
    assert summary["processed"] == 3 and cache.meta("a").spacing == (3.0, 3.0, 3.0)
    assert {k: v[0] for k, v in tree_state(tmp_path / "images").items() if "b.nii" not in k} == {
        k: v[0] for k, v in sources.items() if "b.nii" not in k
    }


def test_sources_are_never_modified(tmp_path):
    manifest = make_studies(tmp_path)
    before = tree_state(tmp_path)
    run(manifest, tmp_path / "cache", workers=1)
    run(manifest, tmp_path / "cache", verify=True)
    after = {k: v for k, v in tree_state(tmp_path).items() if "/cache/" not in k}
    assert after == before  # same sha256 and same mtime for every source file (and the manifest)


def test_crash_mid_write_leaves_no_complete_looking_entry_and_rerun_finishes(tmp_path, monkeypatch):
    manifest = make_studies(tmp_path)
    real_save = np.save

    def failing_save(path, array, *args, **kwargs):
        if "/.tmp~" in str(path) and str(path).endswith("~b/fg.npy"):  # image.npy already written
            raise OSError("No space left on device (simulated)")
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(cache_module.np, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        run(manifest, tmp_path / "cache")
    monkeypatch.undo()
    cache = StudyCache(tmp_path / "cache")
    assert cache.is_complete("a") and not (cache.studies / "b").exists()
    assert not any(p.name.startswith(".tmp") for p in cache.studies.iterdir())
    # A hard kill (no cleanup) leaves a temporary folder: the next run on this host removes it (its pid is gone)
    # and finishes the work.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cache.studies / f".tmp~{socket.gethostname()}~{dead.pid}~deadbeef~c"
    stale.mkdir()
    (stale / "image.npy").write_bytes(b"partial")
    summary = run(manifest, tmp_path / "cache")
    assert (summary["processed"], summary["skipped"]) == (2, 1)
    assert [r["id"] for r in cache.index()] == ["a", "b", "c"]
    assert sorted(p.name for p in cache.studies.iterdir()) == ["a", "b", "c"]


def test_summary_counts_and_files(tmp_path):
    manifest = make_studies(tmp_path)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows += [{"id": "gone", "image": "images/gone.nii.gz", "report": "r"}, {"id": "blank", "image": "x", "report": ""}]
    manifest = write_jsonl(manifest, rows)
    run(manifest, tmp_path / "cache", PreprocessConfig(spacing=None, min_size=(8, 8, 8)))
    summary = run(manifest, tmp_path / "cache", PreprocessConfig(spacing=None, min_size=(8, 8, 8)))
    assert summary == json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert (summary["total"], summary["processed"], summary["skipped"], summary["quarantined"]) == (5, 0, 3, 2)
    assert summary["reasons"] == {"missing file": 1, "empty report": 1}
    quarantine = json.loads((tmp_path / "cache" / "quarantine.json").read_text())
    assert [q["id"] for q in quarantine] == ["gone", "blank"] and all(q["reason"] for q in quarantine)
    assert summary["preprocess"]["spacing"] is None and summary["preprocess"]["pipeline"] >= 1


def test_parallel_workers_match_a_single_process(tmp_path, monkeypatch):
    # fork: the pool plumbing without re-importing MONAI in a fork server (test_forkserver_workers covers that)
    monkeypatch.setattr(pool_module, "START_METHOD", "fork")
    manifest = make_studies(tmp_path)
    assert run(manifest, tmp_path / "one")["processed"] == 3
    assert run(manifest, tmp_path / "two", workers=2)["processed"] == 3
    one, two = StudyCache(tmp_path / "one"), StudyCache(tmp_path / "two")
    assert one.index() == two.index()
    for key in "abc":
        np.testing.assert_array_equal(one.image(key), two.image(key))


@pytest.mark.slow
def test_forkserver_workers(tmp_path):
    manifest = make_studies(tmp_path)
    assert run(manifest, tmp_path / "two", workers=2)["processed"] == 3


def test_cli_end_to_end(tmp_path, capsys):
    manifest = make_studies(tmp_path)
    out = tmp_path / "cache"
    args = ["preprocess", "--manifest", str(manifest), "--out", str(out), "--quiet"]
    assert main([*args, "--preprocess.spacing", "[2.5,2.5,2.5]", "--preprocess.min_size=[8,8,8]"]) == 0
    printed = capsys.readouterr().out
    assert "3 processed, 0 skipped (unchanged), 0 quarantined" in printed
    assert StudyCache(out).meta("a").spacing == (2.5, 2.5, 2.5)
    assert main([*args, "--preprocess.spacing", "[2.5,2.5,2.5]", "--preprocess.min_size=[8,8,8]"]) == 0
    assert "0 processed, 3 skipped" in capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("preprocess:\n  spacing: native\n  min_size: [8, 8, 8]\n")
    assert main([*args, "--config", str(config)]) == 0
    assert StudyCache(out).meta("a").spacing == (1.0, 1.0, 2.0)


def test_cli_errors_are_for_people(tmp_path, capsys):
    rows = [{"id": "a", "image": "a.nii.gz", "report": "r"}, {"id": "a", "image": "b.nii.gz", "report": "r"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    assert main(["preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "c")]) == 2
    assert "duplicate id" in capsys.readouterr().err
    assert main(["preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "c"), "--train.lr", "1"]) == 2
    assert "--preprocess.*" in capsys.readouterr().err
    write_jsonl(manifest, [{"id": "a", "image": "missing.nii.gz", "report": "r"}])
    assert main(["preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "c"), "--quiet"]) == 1
    assert "1 missing file" in capsys.readouterr().out
