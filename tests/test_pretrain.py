"""``t3d pretrain`` end to end on the session's tiny synthetic cache (``tests/conftest.py``).

Every method of docs/method.md §5 runs through the real CLI for two steps; a run killed with SIGKILL resumes to the same
losses as an uninterrupted one; contrastive terms fall below chance (log B); a non-finite step is skipped.
Everything runs on CPU with one intra-op thread: the tests are deterministic and leave the shared cores alone.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain_helpers import expected_terms, pretrain_args, read_log, subprocess_env, toy_batch, toy_step
from t3d.checkpoint import latest_checkpoint, load_checkpoint
from t3d.cli import main as cli_main
from t3d.config import METHODS, PretrainConfig, load_config
from t3d.losses import PretrainObjective, method_spec
from t3d.pretrain.model import PretrainModel

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "rng", "config", "text_mean", "step"}
BOOKKEEPING = {"step", "grad_norm", "lr", "skipped_steps", "crops_per_s", "peak_mem_mb", "global_batch"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ----------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_writes_a_complete_run_folder(tiny_cache, tmp_path, method):
    run = tmp_path / "run"
    findings = {"data.findings": tiny_cache.data / "ground_truth.jsonl"} if method == "supervised" else {}
    assert cli_main(pretrain_args(tiny_cache.cache, run, method, **{"train.batch_size": 2}, **findings)) == 0

    cfg = load_config(PretrainConfig, run / "config.yaml")
    assert cfg.method == method and cfg.train.steps == 2 and tuple(cfg.crops.size) == (32, 32, 32)

    rows = read_log(run)
    assert [r["step"] for r in rows] == [1, 2]
    terms = expected_terms(method)
    assert terms == set(PretrainObjective(cfg.loss, method_spec(method)).term_names())
    for row in rows:
        # view / align / restore are logged exactly when the method uses them: no misleading zeros.
        assert set(row) == terms | BOOKKEEPING, sorted(row)
        assert all(math.isfinite(row[k]) for k in terms), row
        assert row["skipped_steps"] == 0 and row["global_batch"] == 2

    path = latest_checkpoint(run)
    assert path == run / "checkpoints" / "final.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(state), sorted(state)
    assert state["step"] == 2 and state["config"]["method"] == method
    assert state["text_mean"].shape == (384,)
    model = PretrainModel(cfg, method_spec(method), text_dim=384, num_findings=len(state.get("finding_classes", [])))
    model.load_state_dict(state["model"])  # strict: the checkpoint holds exactly this method's weights
    assert (model.decoder is not None) == method_spec(method).restore

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    png = run / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_holds_every_logged_term(tiny_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert cli_main(pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=3)) == 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    rows = read_log(run)
    for key in ("loss", "view", "lr", "grad_norm"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_existing_run_without_resume_is_a_clear_error(tiny_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=1)) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli_main(pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=1)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and str(run) in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing touched


def test_resume_with_another_method_is_a_clear_error(tiny_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=1)) == 0
    capsys.readouterr()
    assert cli_main([*pretrain_args(tiny_cache.cache, run, "t3d-hard", steps=2), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "vssl-contrastive" in err and "t3d-hard" in err and "config.yaml" in err


# ----------------------------------------------------------------------------------------------- resume


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, min_step: int, timeout: float = 300.0) -> int:
    """Poll ``run/latest`` until it names ``step_*`` >= ``min_step``; return that step (0 if the run ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pointer = run / "latest"
        if pointer.is_file():
            name = Path(pointer.read_text().strip()).stem
            if name.startswith("step_") and int(name[5:]) >= min_step:
                return int(name[5:])
        if proc.poll() is not None:
            return 0
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no checkpoint for step >= {min_step} in {run} after {timeout} s")


@pytest.mark.parametrize("method", ["t3d-crops", "t3d"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_cache, tmp_path, method):
    steps = 8
    # 12 studies, batch 2: 6 batches per epoch, so the kill falls mid-epoch and the resumed run crosses epochs.
    # Two sites: the ResNet's BatchNorm sees 4 clean crops per call (2 would make it ill-conditioned, so that rounding
    # noise at the ulp level, e.g. from memory alignment, changes the gradients and no two runs compare exactly).
    extra = {"train.batch_size": 2, "train.checkpoint_every": 2, "train.keep_checkpoints": 2, "train.warmup_steps": 3}
    extra["crops.sites"] = 2
    reference = tmp_path / "reference"
    assert cli_main(pretrain_args(tiny_cache.cache, reference, method, steps=steps, **extra)) == 0

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "t3d", *pretrain_args(tiny_cache.cache, run, method, steps=steps, **extra)]
    stderr = tmp_path / "killed.stderr"  # a file, not a pipe: a full pipe buffer would stall the child
    with stderr.open("w") as err:
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            killed_at = wait_for_checkpoint(proc, run, min_step=4)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)  # the kill under test (or clean-up when waiting failed)
            proc.wait()
    assert killed_at, f"the run ended before it could be killed: {stderr.read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(run) is not None and not (run / "checkpoints" / "final.pt").exists()
    # Whatever the kill interrupted, every file that looks like a checkpoint is a complete one.
    for path in (run / "checkpoints").glob("*.pt"):
        assert load_checkpoint(path)["step"] >= 2

    resumed = subprocess.run([*cmd, "--resume"], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = read_log(reference), read_log(run)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # one row per step: the killed run's tail is cut
    terms = expected_terms(method) | {"grad_norm", "lr"}
    for a, b in zip(want, got, strict=True):
        for key in sorted(terms):
            assert torch.allclose(torch.tensor(b[key]), torch.tensor(a[key]), rtol=1e-5, atol=1e-7), (a["step"], key)
    final_ref, final_run = load_checkpoint(reference), load_checkpoint(run)
    assert final_run["step"] == steps
    for key, value in final_ref["model"].items():
        assert torch.allclose(final_run["model"][key].float(), value.float(), rtol=1e-5, atol=1e-6), key
    assert not list(run.glob(".*.tmp"))
    # TensorBoard: the killed run's events beyond the checkpoint are purged, so every step appears once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, steps + 1))


def test_resume_between_log_rows_logs_the_same_window_means(tiny_cache, tmp_path):
    """log_every 3, checkpoints every 2: the steps since the last row travel in the checkpoint, so the row after a
    resume averages the same steps as an uninterrupted run does."""
    reference = tmp_path / "reference"
    extra = {"train.log_every": 3, "train.checkpoint_every": 2}
    args = pretrain_args(tiny_cache.cache, reference, "vssl-contrastive", steps=5, **extra)
    assert cli_main(args) == 0
    want = read_log(reference)
    assert [r["step"] for r in want] == [3, 5]
    # What a kill right after the step-4 checkpoint leaves: latest -> step 4, and a log row for step 5.
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "checkpoints" / "final.pt").unlink()
    (run / "latest").write_text("checkpoints/step_0000004.pt\n")
    assert cli_main([*pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=5, **extra), "--resume"]) == 0
    got = read_log(run)
    assert [r["step"] for r in got] == [3, 5]
    for key in ("loss", "view", "grad_norm", "lr"):
        assert got[1][key] == pytest.approx(want[1][key], rel=1e-5), key


# ----------------------------------------------------------------------------------------------- learning


def tail_mean(rows: list[dict], key: str, n: int = 5) -> float:
    return sum(r[key] for r in rows[-n:]) / n


EASY_VIEWS = {"crops.augment": "false", "train.lr": 1e-3, "train.warmup_steps": 3}


@pytest.mark.parametrize(
    "method, steps, extra, terms",
    [
        # Four sites per study average four B-way problems per step: a smooth curve in 40 cheap steps.
        ("vssl-contrastive", 40, {"crops.sites": 4, "crops.max_shift": 0.125}, ("view",)),
        # One whole-volume view per study, 32^3: the deepest map is one voxel. With BatchNorm the run memorises the
        # four studies in 30 steps; with the default GroupNorm it is still at ~1.35 (log B = 1.39) after 30 steps
        # and ~1.1 after 60, so the pooling check runs with BatchNorm (allowed for non-tiled methods).
        ("clip", 30, {"model.norm": "batch"}, ("align",)),
        # With restoration on, the encoder sees masked views (half of each crop hidden): L_view still falls, but
        # L_align of the masked crops' mean stays near log B for 150 steps on this preset (it falls without the
        # masking), so only L_view is asserted here.
        pytest.param("t3d-hard", 100, {"crops.sites": 2, "crops.max_shift": 0.125}, ("view",), marks=pytest.mark.slow),
    ],
)
def test_contrastive_terms_fall_below_chance(tiny_cache, tmp_path, method, steps, extra, terms):
    """The instance-norm pitfall: if pooling erased what differs between samples, the loss would sit at log B.

    Hard targets (Y = I), so the minimum of every contrastive term is 0 and chance is log B; clean, barely shifted
    views make the task easy enough to show in a few dozen steps.
    """
    run = tmp_path / "run"
    assert cli_main(pretrain_args(tiny_cache.cache, run, method, steps=steps, **(EASY_VIEWS | extra))) == 0
    rows = read_log(run)
    log_b = math.log(rows[0]["global_batch"])
    for term in terms:
        curve = [round(r[term], 2) for r in rows]
        assert tail_mean(rows, term) < 0.7 * log_b, f"{term} stays near log B = {log_b:.2f}: {curve}"
        # Bias-free heads keep two views of one crop close from the first step (L_view starts near 0.5 log B here),
        # so the fall asked for is relative to that start.
        assert tail_mean(rows, term) < 0.8 * tail_mean(rows[:5], term), f"{term} does not fall: {curve}"


# ----------------------------------------------------------------------------------------------- non-finite guard


def test_non_finite_step_is_skipped_reported_and_training_continues(tiny_cache, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = PretrainObjective.forward

    def nan_on_second_call(self, out):
        terms = forward(self, out)
        calls["n"] += 1
        if calls["n"] == 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(PretrainObjective, "forward", nan_on_second_call)
    run = tmp_path / "run"
    extra = {"train.checkpoint_every": 1, "train.keep_checkpoints": 5}
    assert cli_main(pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=3, **extra)) == 0
    rows = read_log(run)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert not math.isfinite(rows[1]["loss"]) and math.isfinite(rows[2]["loss"])
    ckpt = {s: load_checkpoint(run / "checkpoints" / f"step_{s:07d}.pt") for s in (1, 2)}
    ckpt[3] = load_checkpoint(run / "checkpoints" / "final.pt")
    assert ckpt[3]["skipped_steps"] == 1

    def params(state):
        model = PretrainModel(load_config(PretrainConfig, run / "config.yaml"), method_spec("vssl-contrastive"), 384)
        model.load_state_dict(state["model"])
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    p1, p2, p3 = (params(ckpt[s]) for s in (1, 2, 3))
    assert all(torch.equal(p1[n], p2[n]) for n in p1), "the skipped step changed parameters"
    assert any(not torch.equal(p2[n], p3[n]) for n in p2), "training did not continue after the skipped step"
    assert all(torch.isfinite(p).all() for p in p3.values())


# ----------------------------------------------------------------------------------------------- accumulation


def test_gradient_accumulation_makes_the_full_batch_update():
    """Two micro-batches of 4 = one batch of 8 for a per-sample loss (the contrastive terms are not per-sample:
    accumulating them changes the negatives, and BatchNorm changes the statistics, so no such identity holds)."""
    batch = toy_batch(8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    full_terms, full_state = toy_step([batch])
    acc_terms, acc_state = toy_step(halves)
    assert acc_terms["loss"] == pytest.approx(full_terms["loss"], rel=1e-6)
    assert acc_terms["grad_norm"] == pytest.approx(full_terms["grad_norm"], rel=1e-5)
    for key, value in full_state.items():
        torch.testing.assert_close(acc_state[key], value, rtol=1e-6, atol=1e-7)


def test_accumulation_consumes_micro_batches_and_checkpoints_the_data_position(tiny_cache, tmp_path):
    run = tmp_path / "run"
    # 12 studies, batch 2: 6 micro-batches per epoch, 2 per step -> 3 steps per epoch; step 4 = epoch 1, batch 2.
    extra = {"train.batch_size": 2, "train.accumulate": 2, "train.checkpoint_every": 2}
    assert cli_main(pretrain_args(tiny_cache.cache, run, "vssl-contrastive", steps=4, **extra)) == 0
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    assert (final["step"], final["epoch"], final["batch_in_epoch"]) == (4, 1, 2)
    step2 = load_checkpoint(run / "checkpoints" / "step_0000002.pt")
    assert (step2["step"], step2["epoch"], step2["batch_in_epoch"]) == (2, 0, 4)
    # global_batch is the contrastive batch (studies per micro-batch over all ranks), the B of log B.
    assert [r["global_batch"] for r in read_log(run)] == [2, 2, 2, 2]


# ----------------------------------------------------------------------------------------------- pairing


@pytest.mark.parametrize("method", ["t3d", "clip"])
def test_every_study_meets_its_own_report(tiny_cache, tmp_path, method):
    """The text feature a batch gets for a study is the (centred) embedding of *that study's* report, also when a split
    file selects studies out of cache order (positions in the dataset then differ from cache-index rows)."""
    import json

    import torch.nn.functional as F

    from t3d.config import TextConfig
    from t3d.pretrain.data import build_dataset, build_text_lookup, report_text
    from t3d.text import load_text_features

    reports = {}
    for line in (tiny_cache.data / "reports.jsonl").read_text().splitlines():
        row = json.loads(line)
        reports[row["id"]] = report_text(row, "both")
    ids = sorted(reports)[::-1][:8]  # reversed: dataset order differs from the cache index
    (tmp_path / "splits.json").write_text(json.dumps({"train": ids}))
    split = {"data.split_file": tmp_path / "splits.json", "data.split": "train"}
    cfg = load_config(PretrainConfig, None, pretrain_args(tiny_cache.cache, tmp_path / "run", method, **split)[1:])
    spec = method_spec(method)
    dataset = build_dataset(cfg, spec)
    lookup = build_text_lookup(cfg, spec, dataset, torch.device("cpu"))
    texts = [reports[i] for i in ids]
    feats = load_text_features(texts, TextConfig(), tiny_cache.cache / "text", progress=False)
    expected = F.normalize(feats.pooled - lookup.mean, dim=-1)  # the lookup's mean is over these same 8 reports
    for k in range(len(dataset)):
        item = dataset[k]
        got = lookup.for_batch({"index": torch.tensor([item["index"]])})["frozen"][0]
        torch.testing.assert_close(got, expected[ids.index(item["id"])], rtol=1e-5, atol=1e-6)
