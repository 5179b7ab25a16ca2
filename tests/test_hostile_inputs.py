"""``t3d preprocess`` against hostile and careless input: one bad study never stops the run, nothing is allocated
for a header that lies, nothing outside the data root is read, and every file a study is read from is hashed.

Every hostile file is generated here (``tests/hostile.py``); each case sits beside good studies, which must be
cached whatever happens to the bad one.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

import hostile
import t3d.data.io as io_module
import t3d.data.preprocess as preprocess_module
import t3d.data.volume as volume_module
from studyfiles import write_jsonl
from t3d.cli import main
from t3d.config import PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.preprocess import preprocess_manifest

CFG = PreprocessConfig(spacing=(2.0, 2.0, 2.0), min_size=(8, 8, 8))
GOOD = ("good1", "good2")


def run_with(tmp_path: Path, bad: dict[str, str], cfg: PreprocessConfig = CFG, **kw) -> tuple[dict, dict]:
    """Preprocess two good studies plus ``bad`` (id -> image path under root); return the summary and the
    quarantine rows by id."""
    root = tmp_path / "root"
    for n, name in enumerate(GOOD):
        hostile.good_study(root, name, seed=n)
    images = {name: f"{name}.nii.gz" for name in GOOD} | bad
    manifest = hostile.manifest(root / "m.jsonl", images)
    summary = preprocess_manifest(manifest, tmp_path / "cache", cfg, progress=False, **kw)
    quarantine = json.loads((tmp_path / "cache" / "quarantine.json").read_text())
    assert {row["id"] for row in StudyCache(tmp_path / "cache").index()} >= set(GOOD)
    return summary, {row["id"]: row for row in quarantine}


@pytest.fixture
def no_bad_pixel_reads(monkeypatch):
    """Record every reader call on a file that is not one of the good studies: the bounds must stop those first."""
    reads = []
    for reader in (io_module.NibabelReader, io_module.SimpleITKReader, io_module.NrrdReader):

        def read(self, data, _real=reader.read, **kw):
            if not Path(str(data)).name.startswith("good"):
                reads.append(str(data))
            return _real(self, data, **kw)

        monkeypatch.setattr(reader, "read", read)
    yield
    assert reads == []


# ----------------------------------------------------------------------------------------------- isolation


def test_singular_affine_and_rgb_are_quarantined_naming_the_file(tmp_path):
    root = tmp_path / "root"
    hostile.singular_affine(root / "singular.nii.gz")
    hostile.rgb_nifti(root / "rgb.nii.gz")
    summary, bad = run_with(tmp_path, {"singular": "singular.nii.gz", "rgb": "rgb.nii.gz"})
    assert (summary["processed"], summary["quarantined"]) == (2, 2)
    assert "singular" in bad["singular"]["reason"] and "singular.nii.gz" in bad["singular"]["reason"]
    assert "rgb.nii.gz" in bad["rgb"]["reason"] and "\n" not in bad["rgb"]["reason"]


def test_any_error_of_one_study_is_a_one_line_quarantine_reason(tmp_path, monkeypatch):
    real = preprocess_module.prepare_study

    def flaky(study, cfg):
        if study.id == "boom":
            raise TypeError("unsupported dtype\nsecond line of a library's message")
        return real(study, cfg)

    monkeypatch.setattr(preprocess_module, "prepare_study", flaky)
    hostile.good_study(tmp_path / "root", "boom")
    summary, bad = run_with(tmp_path, {"boom": "boom.nii.gz"})
    assert (summary["processed"], summary["quarantined"]) == (2, 1)
    reason = bad["boom"]["reason"]
    assert "boom.nii.gz" in reason and "TypeError: unsupported dtype" in reason and "\n" not in reason


@pytest.mark.usefixtures("no_bad_pixel_reads")
def test_huge_header_in_a_tiny_file_is_refused_before_allocating(tmp_path):
    root = tmp_path / "root"
    small = hostile.header_only_nifti(root / "huge.nii.gz")
    hostile.header_only_mha(root / "wide.mha")  # 103 bytes declaring 32767 x 32767 x 1
    hostile.header_only_mha(root / "cut.mha", size=(64, 64, 64), data=b"\0" * 100)  # within budget, truncated
    assert small.stat().st_size < 200
    summary, bad = run_with(tmp_path, {"huge": "huge.nii.gz", "wide": "wide.mha", "cut": "cut.mha"})
    assert (summary["processed"], summary["quarantined"]) == (2, 3)
    assert bad["huge"]["kind"] == "too large" and "preprocess.max_voxels" in bad["huge"]["reason"]
    assert bad["wide"]["kind"] == "too large"
    assert bad["cut"]["kind"] == "truncated file" and "cut.mha" in bad["cut"]["reason"]


def test_resampled_size_is_checked_against_the_budget_before_resampling(tmp_path, monkeypatch):
    root = tmp_path / "root"
    hostile.write_nifti(root / "coarse.nii.gz", hostile.ct_volume((24, 24, 24)), spacing=(19.0, 19.0, 19.0))
    calls = []
    real = volume_module.Spacing
    monkeypatch.setattr(volume_module, "Spacing", lambda **kw: calls.append(kw) or real(**kw))
    budget = PreprocessConfig(spacing=(0.8, 0.8, 1.5), min_size=(8, 8, 8), max_voxels=10_000_000)
    summary, bad = run_with(tmp_path, {"coarse": "coarse.nii.gz"}, cfg=budget)
    assert bad["coarse"]["kind"] == "too large" and "max_voxels" in bad["coarse"]["reason"]
    assert len(calls) == 2 * 1  # the two good studies were resampled (image only); the coarse one never was
    assert summary["processed"] == 2


def test_fifo_is_refused_without_opening_it(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "x.nii.gz")  # opening it for reading would block forever

    def hung(signum, frame):
        raise AssertionError("preprocess opened the FIFO and blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        summary, bad = run_with(tmp_path, {"fifo": "x.nii.gz"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert bad["fifo"]["kind"] == "not a regular file" and "x.nii.gz" in bad["fifo"]["reason"]


def test_symlink_loop_is_a_quarantine_reason(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(root / "b.nii.gz", root / "a.nii.gz")
    os.symlink(root / "a.nii.gz", root / "b.nii.gz")
    summary, bad = run_with(tmp_path, {"loop": "a.nii.gz"})
    assert bad["loop"]["kind"] == "symlink loop" and summary["processed"] == 2


def test_outputs_are_written_when_the_run_is_interrupted(tmp_path, monkeypatch):
    real = preprocess_module.process_study

    def interrupted(study, *args):
        if study.id == "good2":
            raise KeyboardInterrupt
        return real(study, *args)

    monkeypatch.setattr(preprocess_module, "process_study", interrupted)
    root = tmp_path / "root"
    for n, name in enumerate(GOOD):
        hostile.good_study(root, name, seed=n)
    manifest = hostile.manifest(root / "m.jsonl", {name: f"{name}.nii.gz" for name in GOOD})
    out = tmp_path / "cache"
    assert (
        main(["preprocess", "--manifest", str(manifest), "--out", str(out), "--quiet", "--preprocess.min_size=[8,8,8]"])
        == 130
    )
    assert [row["id"] for row in StudyCache(out).index()] == ["good1"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processed"], summary["pending"]) == (1, 1)
    assert json.loads((out / "quarantine.json").read_text()) == []


# ----------------------------------------------------------------------------------------------- containment


def test_mhd_whose_data_file_is_outside_the_root_is_not_read(tmp_path):
    root = tmp_path / "root"
    hostile.mhd_pair(root, "escape", data_file=tmp_path / "outside" / "secret.raw")
    summary, bad = run_with(tmp_path, {"escape": "escape.mhd"})
    assert bad["escape"]["kind"] == "outside data root" and "secret.raw" in bad["escape"]["reason"]


def test_dicom_folder_of_symlinks_to_outside_the_root_is_not_read(tmp_path):
    root = tmp_path / "root"
    hostile.dicom_links(root / "series", tmp_path / "outside" / "series")
    summary, bad = run_with(tmp_path, {"linked": "series"})
    assert bad["linked"]["kind"] == "outside data root" and "outside" in bad["linked"]["reason"]


def test_symlinks_inside_the_root_are_fine(tmp_path):
    root = tmp_path / "root"
    hostile.dicom_links(root / "series", root / "real_series")
    summary, bad = run_with(tmp_path, {"linked": "series"})
    assert "linked" not in bad and summary["processed"] == 3


# ----------------------------------------------------------------------------------------------- provenance


def test_editing_the_raw_of_an_mhd_reprocesses_it(tmp_path):
    root = tmp_path / "root"
    header, raw = hostile.mhd_pair(root, "pair")
    manifest = hostile.manifest(root / "m.jsonl", {"pair": "pair.mhd"})
    out = tmp_path / "cache"
    assert preprocess_manifest(manifest, out, CFG, progress=False)["processed"] == 1
    before = StudyCache(out).meta("pair").source_hash
    stat = raw.stat()
    data = np.fromfile(raw, dtype=np.int16)
    data[: data.size // 2] = 300  # same size, new content
    data.tofile(raw)
    assert preprocess_manifest(manifest, out, CFG, progress=False)["processed"] == 1  # stat of the .raw changed
    changed = StudyCache(out).meta("pair").source_hash
    assert changed != before
    data[: data.size // 2] = 301
    data.tofile(raw)
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only --verify can tell
    assert preprocess_manifest(manifest, out, CFG, progress=False, verify=True)["processed"] == 1
    assert StudyCache(out).meta("pair").source_hash not in (before, changed)


def test_detached_nrrd_data_is_hashed(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    root = tmp_path / "root"
    root.mkdir()
    volume = hostile.ct_volume()
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([1.0, 1.0, 2.0]),
        "space origin": np.zeros(3),
    }
    nrrd.write(str(root / "d.nrrd"), volume, header, detached_header=True)  # d.nhdr + d.nrrd (data)
    manifest = hostile.manifest(root / "m.jsonl", {"d": "d.nhdr"})
    out = tmp_path / "cache"
    assert preprocess_manifest(manifest, out, CFG, progress=False)["processed"] == 1
    before = StudyCache(out).meta("d").source_hash
    nrrd.write(str(root / "d.nrrd"), volume + 1, header, detached_header=True)
    assert preprocess_manifest(manifest, out, CFG, progress=False, verify=True)["processed"] == 1
    assert StudyCache(out).meta("d").source_hash != before


# ----------------------------------------------------------------------------------------------- careless input


def test_csv_with_an_unbalanced_quote_is_refused_not_half_read(tmp_path, capsys):
    root = tmp_path / "root"
    for name in ("a", "b", "c", "d"):
        hostile.good_study(root, name)
    rows = ["id,image,report", "a,a.nii.gz,fine", 'b,b.nii.gz,"unbalanced', "c,c.nii.gz,fine", "d,d.nii.gz,fine"]
    manifest = root / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    assert main(["preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "cache"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "m.csv line 3" in err and "quote" in err and "Traceback" not in err


@pytest.mark.parametrize("problem", ["file", "read-only"])
def test_out_that_is_a_file_or_read_only_is_a_message(tmp_path, capsys, problem):
    root = tmp_path / "root"
    hostile.good_study(root, "a")
    manifest = hostile.manifest(root / "m.jsonl", {"a": "a.nii.gz"})
    if problem == "file":
        out = tmp_path / "cache"
        out.write_text("not a folder")
    elif os.geteuid() == 0:  # root writes anywhere: a read-only file system stands in
        out = Path("/sys/t3d-cache")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "cache"
    assert main(["preprocess", "--manifest", str(manifest), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--out" in err and "Traceback" not in err


def test_ctrate_volume_name_with_folders_gives_the_bare_id(tmp_path):
    root = tmp_path / "root"
    hostile.good_study(root / "volumes", "train_1_a_1")
    rows = "VolumeName,Findings_EN,Impressions_EN\nvolumes/train_1_a_1.nii.gz,Normal.,None.\n"
    (root / "reports.csv").write_text(rows)
    summary = preprocess_manifest(root / "reports.csv", tmp_path / "cache", CFG, progress=False)
    assert summary["processed"] == 1
    assert [row["id"] for row in StudyCache(tmp_path / "cache").index()] == ["train_1_a_1"]


def test_a_manifest_error_writes_no_partial_index(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "image": "a.nii.gz", "report": "r"}, {"id": "a"}])
    assert main(["preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "cache"), "--quiet"]) == 2
    assert not (tmp_path / "cache" / "index.jsonl").exists()
