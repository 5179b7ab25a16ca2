"""The transfer benchmark's pure parts: intervals, paired tests, tables, stage caching, its configs (no training)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import provenance  # noqa: E402
import transfer  # noqa: E402
import transfer_claims  # noqa: E402
import transfer_config  # noqa: E402
import transfer_controls  # noqa: E402
import transfer_plan  # noqa: E402
import transfer_probes  # noqa: E402
import transfer_report  # noqa: E402
import transfer_results  # noqa: E402
import transfer_retrieval  # noqa: E402
import transfer_stages  # noqa: E402
import transfer_stats  # noqa: E402
from t3d.config import ConfigError  # noqa: E402
from transfer_plan import Plan, write_seg_subset  # noqa: E402

# ----------------------------------------------------------------------------------------------- statistics


def test_weighted_mean_skips_nan_and_uses_weights():
    values = np.array([[1.0, np.nan, 3.0], [5.0, 7.0, np.nan]])
    weights = np.array([[1.0, 4.0, 1.0], [2.0, 1.0, 9.0]])
    assert transfer_stats.weighted_mean(values, weights) == pytest.approx((1 + 3 + 10 + 7) / 5)
    assert transfer_stats.weighted_mean(values) == pytest.approx(4.0)
    assert math.isnan(transfer_stats.weighted_mean(np.full((2, 2), np.nan)))


def test_identity_draws_reproduce_the_point_estimate():
    rng = np.random.default_rng(0)
    values = rng.random((3, 7))
    values[1, 2] = np.nan
    weights = rng.integers(0, 4, size=(3, 7)).astype(float)
    seeds, cases = np.arange(3)[None], np.arange(7)[None]
    assert transfer_stats.mean_replicates(values, weights, seeds, cases)[0] == pytest.approx(
        transfer_stats.weighted_mean(values, weights)
    )
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1], [1, 0]], dtype=float)
    scores = rng.random((3, 7, 2))
    assert transfer_stats.auroc_replicates_2level(y, scores, seeds, cases)[0] == pytest.approx(
        transfer_stats.auroc_statistic(y, scores)
    )


def test_auroc_statistic_matches_sklearn_and_skips_single_valued_classes():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random((20, 3)) < 0.4).astype(float)
    y[:, 2] = 0.0  # no positives: left out
    scores = rng.random((2, 20, 3))
    expected = np.mean([np.mean([roc_auc_score(y[:, c], scores[s, :, c]) for c in range(2)]) for s in range(2)])
    assert transfer_stats.auroc_statistic(y, scores) == pytest.approx(expected)
    assert math.isnan(transfer_stats.auroc_statistic(np.zeros((5, 2)), rng.random((1, 5, 2))))


def test_dice_cell_interval_brackets_the_mean_and_collapses_for_constant_values():
    rng = np.random.default_rng(2)
    values = rng.normal(0.6, 0.1, size=(3, 12))
    out = transfer_stats.dice_cell(values, None, n_boot=500, seed=0)
    assert out["low"] < out["mean"] < out["high"]
    assert out["mean"] == pytest.approx(values.mean())
    assert (out["n_seeds"], out["n_cases"]) == (3, 12)
    const = transfer_stats.dice_cell(np.full((2, 5), 0.3), None, n_boot=100)
    assert const["low"] == pytest.approx(0.3) and const["high"] == pytest.approx(0.3)


def test_seed_t_interval():
    out = transfer_stats.seed_t_interval([0.5, 0.7, 0.6])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert out["mean"] == pytest.approx(0.6)
    assert out["high"] - out["mean"] == pytest.approx(half)
    assert math.isnan(transfer_stats.seed_t_interval([0.5])["low"])


def test_paired_dice_detects_a_constant_improvement_and_nothing_for_equal_methods():
    rng = np.random.default_rng(3)
    b = rng.random((3, 10))
    better = transfer_stats.paired_dice(b + 0.1, b, None, n_boot=300)
    assert better["mean"] == pytest.approx(0.1)
    assert better["low"] == pytest.approx(0.1) and better["p_boot"] == 0.0
    assert better["wilcoxon"]["p"] < 0.01 and better["wilcoxon"]["n"] == 10
    assert transfer_stats.verdict(better).startswith("A better")
    same = transfer_stats.paired_dice(b, b, None, n_boot=300)
    assert same["mean"] == 0.0 and same["p_boot"] == 1.0 and same["wilcoxon"]["p"] == 1.0
    assert transfer_stats.verdict(same) == "no clear difference"


def test_verdict_needs_the_wilcoxon_test_where_there_is_one():
    few = transfer_stats.paired_dice(np.array([[0.5, 0.6, 0.7]]), np.array([[0.4, 0.5, 0.6]]), None, n_boot=200)
    assert few["low"] > 0 and few["wilcoxon"]["p"] > 0.05  # 3 cases: the bootstrap interval alone is too narrow
    assert transfer_stats.verdict(few).startswith("no clear difference (CI excludes 0")
    assert transfer_stats.verdict({"low": -0.2, "high": -0.1}) == "A worse (CI < 0)"
    assert transfer_stats.verdict({"low": float("nan"), "high": 0.1}) == "undetermined"


def test_paired_dice_scores_only_cases_defined_for_both():
    a = np.array([[0.9, np.nan, 0.5]])
    b = np.array([[0.7, 0.2, np.nan]])
    out = transfer_stats.paired_dice(a, b, None, n_boot=50)
    assert (out["a_mean"], out["b_mean"]) == (pytest.approx(0.9), pytest.approx(0.7))


def test_paired_auroc_prefers_the_informative_scores():
    rng = np.random.default_rng(4)
    y = (rng.random((30, 2)) < 0.5).astype(float)
    good = y[None] + rng.normal(0, 0.3, size=(3, 30, 2))
    noise = rng.random((3, 30, 2))
    out = transfer_stats.paired_auroc(y, good, noise, n_boot=300)
    assert out["mean"] > 0.2 and out["low"] > 0 and len(out["per_seed_delta"]) == 3
    assert out["p_boot"] < 0.05


def test_bootstrap_p_is_two_sided():
    assert transfer_stats.bootstrap_p(np.array([1.0, 2.0, 3.0])) == 0.0
    assert transfer_stats.bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.5)
    assert math.isnan(transfer_stats.bootstrap_p(np.array([np.nan])))


# ----------------------------------------------------------------------------------------------- results and tables

LABELS = {"0": "background", "1": "liver", "2": "kidney", "3": "liver_lesion"}


def seg_result(method, seed, shift, fraction=1.0):
    cases = [
        {"id": f"c{i}", "dice": [0.8 + shift, 0.6 + shift, None if i == 0 else 0.3 + shift],
         "small_lesion_dice": None if i == 0 else 0.2 + shift, "small_lesions": 0 if i == 0 else i}
        for i in range(8)
    ]  # fmt: skip
    return {"kind": "seg", "method": method, "seed": seed, "fraction": fraction, "labels": LABELS, "cases": cases}


def probe_result(method, seed, scores, fraction=1.0):
    y = [[1, 0], [0, 1], [1, 1], [0, 0]]
    return {"kind": "probe", "method": method, "seed": seed, "fraction": fraction, "ids": ["a", "b", "c", "d"],
            "y": y, "p": scores}  # fmt: skip


def test_seg_case_values_group_organs_and_lesions():
    run = seg_result("t3d", 0, 0.0)
    assert transfer_results.seg_groups(LABELS, None) == ([1, 2], [3])  # 'liver_lesion' is a lesion by name
    assert transfer_results.seg_case_value(run, run["cases"][1], "organ_dice", None) == (pytest.approx(0.7), 1.0)
    assert transfer_results.seg_case_value(run, run["cases"][1], "lesion_dice", None) == (pytest.approx(0.3), 1.0)
    assert math.isnan(transfer_results.seg_case_value(run, run["cases"][0], "lesion_dice", None)[0])
    assert transfer_results.seg_case_value(run, run["cases"][2], "small_lesion_dice", None) == (pytest.approx(0.2), 2.0)
    assert transfer_results.seg_groups(LABELS, [2, 3]) == ([1], [2, 3])


def fake_results():
    good = [[0.9, 0.1], [0.1, 0.9], [0.8, 0.7], [0.2, 0.1]]
    flat = [[0.5, 0.5]] * 4
    out = []
    for seed in (0, 1):
        out += [seg_result("t3d", seed, 0.05), seg_result("vssl", seed, 0.0), seg_result("clip", seed, -0.1)]
        out += [probe_result("t3d", seed, good), probe_result("vssl", seed, flat)]
    return out


def test_summarise_compares_t3d_with_the_best_baseline_and_clip():
    results = transfer_results.Results(fake_results())
    metrics = [*transfer_results.SEG_METRICS, "probe_auroc"]
    s = transfer_results.summarise(results, ["vssl", "clip", "t3d"], [1.0], ["vssl", "clip"], metrics, n_boot=200)
    assert s["cells"]["1.0"]["t3d"]["organ_dice"]["mean"] == pytest.approx(0.75)
    assert s["cells"]["1.0"]["t3d"]["probe_auroc"]["mean"] == pytest.approx(1.0)
    roles = {(c["metric"], c["b"]) for c in s["comparisons"]}
    assert ("organ_dice", "vssl") in roles  # vssl beats clip on organ Dice, so it is 'the best baseline'
    assert ("small_lesion_dice", "clip") in roles
    organ = next(c for c in s["comparisons"] if c["metric"] == "organ_dice" and c["role"] == "best vSSL")
    assert organ["mean"] == pytest.approx(0.05) and organ["verdict"].startswith("A better")
    assert organ["seeds"] == [0, 1]


def test_tables_render_cells_missing_values_and_precondition():
    cells = {"t3d": {"organ_dice": {"mean": 0.75, "low": 0.7, "high": 0.8, "n_seeds": 3}}}
    lines = transfer_report.results_table(cells, ["vssl", "t3d"], ["organ_dice", "probe_auroc"])
    assert lines[0] == "| method | seeds | organ Dice | finding AUROC (probe) |"
    assert lines[2] == "| t3d | 3 | 0.750 [0.700, 0.800] | n/a |"
    assert len(lines) == 3  # vssl has no cell: no row
    assert transfer_report.fmt({"mean": 0.5, "low": float("nan"), "high": 0.6}) == "0.500"
    pre = [
        {"method": "t3d", "seed": 0, "steps": 30, "batch": 4, "log_b": math.log(4), "final": {"align": 1.2},
         "curve": [{"step": 5, "align": 1.5}, {"step": 10, "align": 1.2}]},
        {"method": "vssl", "seed": 0, "steps": 30, "batch": 4, "log_b": math.log(4), "final": {"view": 1.0}},
    ]  # fmt: skip
    table = transfer_report.precondition_table(pre)
    assert "**yes**" in table[2] and "| 13 % |" in table[2] and "| n/a |" in table[3]
    pre[0]["final"]["align"] = 1.38  # below log 4 = 1.386, but by a hair: not learning
    assert "| no |" in transfer_report.precondition_table(pre)[2]


def test_run_floor_prefers_the_logged_target_entropy():
    assert transfer_report.run_floor({"target_entropy": 0.12, "target_self_prob": 0.5}, 4) == pytest.approx(0.12)
    assert transfer_report.run_floor({"target_self_prob": 0.5}, 4) == pytest.approx(transfer_report.align_floor(0.5, 4))
    run = {"final": {"align": 0.7, "target_entropy": 0.2}, "log_b": math.log(4), "batch": 4}
    assert transfer_report.align_share(run) == pytest.approx((math.log(4) - 0.7) / (math.log(4) - 0.2))


def test_align_floor_is_the_entropy_of_an_evenly_spread_row():
    assert transfer_report.align_floor(None, 4) == 0.0 and transfer_report.align_floor(1.0, 8) == 0.0
    assert transfer_report.align_floor(0.25, 4) == pytest.approx(math.log(4))  # uniform row: the floor is chance itself
    p, q = 0.5, 0.5 / 3
    assert transfer_report.align_floor(0.5, 4) == pytest.approx(-p * math.log(p) - 3 * q * math.log(q))
    assert (
        transfer_report.align_progress(math.log(4), math.log(4), 0.0) == 0.0
        and transfer_report.align_progress(0.0, 1.0, 0.0) == 1.0
    )


# ----------------------------------------------------------------------------------------------- stages


def test_run_stages_skips_done_stages_and_isolates_failures(tmp_path):
    calls = []

    def make(name, fail=False):
        def run():
            calls.append(name)
            if fail:
                raise RuntimeError("boom")
            return {"value": name}

        return run

    done = tmp_path / "a"
    done.mkdir()
    (done / transfer_config.RESULT).write_text(json.dumps({"value": "old"}))
    stages = [
        transfer_config.Stage("a", done, make("a"), {"kind": "x"}),
        transfer_config.Stage("b", tmp_path / "b", make("b"), {"kind": "x", "seed": 1}),
        transfer_config.Stage("c", tmp_path / "c", make("c", fail=True)),
        transfer_config.Stage("d", tmp_path / "d", make("d"), needs=("c",)),
        transfer_config.Stage("report", tmp_path, make("report"), cached=False),
    ]
    status = transfer_config.run_stages(stages, progress=False)
    assert status == {"a": "cached", "b": "done", "c": "failed", "d": "skipped", "report": "done"}
    assert calls == ["b", "c", "report"]
    stored = json.loads((tmp_path / "b" / transfer_config.RESULT).read_text())
    assert stored["value"] == "b" and stored["seed"] == 1 and "seconds" in stored
    assert stored["revision"] == provenance.git_revision()  # the code a stage ran: a report mixes cached stages
    table = transfer_results.Results([{**stored, "kind": "x", "method": "m"}, {"kind": "x", "method": "n", "seed": 0}])
    assert table.revisions() == {stored["revision"]: 1, "not recorded": 1}
    assert "boom" in (tmp_path / "c" / "error.txt").read_text()
    assert not (tmp_path / "c" / transfer_config.RESULT).exists() and not (tmp_path / transfer_config.RESULT).exists()
    calls.clear()
    stages[2] = transfer_config.Stage("c", tmp_path / "c", make("c"))
    status = transfer_config.run_stages(stages, progress=False)
    assert calls == ["c", "d", "report"] and status["b"] == "cached"
    assert not (tmp_path / "c" / "error.txt").exists()


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 10):
        perm = transfer_stages.derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))


def test_flatten_feeds_load_config():
    assert transfer_config.flatten({"train": {"steps": 3, "lr": 0.1}, "crops.size": [64, 64, 32]}) == [
        "--train.steps", "3", "--train.lr", "0.1", "--crops.size", "[64, 64, 32]",
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["transfer_cpu.yaml", "transfer_gpu.yaml", "transfer_gate_smoke.yaml"])
@pytest.mark.parametrize("smoke", [False, True])
def test_benchmark_configs_load_and_plan(name, smoke, tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / name, smoke=smoke)
    stages = Plan(cfg, tmp_path / cfg.name).stages()  # builds and validates every run's config, runs nothing
    names = [s.name for s in stages]
    assert "prepare" in names and "probe_data" in names and names[-1].endswith("/report")
    assert cfg.controls[:2] == ["random", "supervised"]  # the gate needs the controls in every configuration
    for method in [*cfg.controls, *cfg.main_methods]:
        has_pretrain = f"seed{cfg.seeds[0]}/{method}/pretrain" in names  # supervised-seg: its segmentation run
        assert has_pretrain == (method != "random")
        assert f"seed{cfg.seeds[0]}/{method}/seg f={cfg.fractions[0]:g}" in names
        assert f"seed{cfg.seeds[0]}/{method}/probes" in names
    by_name = {s.name: s for s in stages}
    seg = by_name[f"seed{cfg.seeds[0]}/random/seg f={cfg.fractions[0]:g}"]
    assert seg.meta["finetune_seed"] == cfg.seeds[0] + cfg.finetune_seed_offset != cfg.seeds[0]
    if not smoke and name == "transfer_cpu.yaml":
        # One seed, 100 % labels, no ablations, no frozen-encoder probe: with 500-step segmentation (random's organ
        # Dice 0.55), more do not fit 2 h of --jobs 2 on 2 cores (the measured costs are in the header).
        # The low-label fraction is in the GPU configuration, the frozen-encoder probe in the gate configuration.
        assert len(cfg.seeds) >= 1 and cfg.fractions == [1.0] and cfg.frozen_seg is None
        assert {"vssl", "clip", "t3d"} <= set(cfg.main_methods) and "random" not in cfg.main_methods
        assert cfg.pretrain["train"]["batch_size"] >= 16  # the contrastive batch of docs/method.md §7
        n = cfg.probes.data.num_studies
        assert round(n * cfg.probes.test_fraction) >= 200 and n - round(n * cfg.probes.test_fraction) >= 400
    if not smoke and name == "transfer_gpu.yaml":
        assert 1.0 in cfg.fractions and min(cfg.fractions) < 1  # a low-label fraction, where pre-training can matter
    if not smoke and name == "transfer_gate_smoke.yaml":
        assert cfg.frozen_seg and cfg.frozen_seg["steps"] > 0


def test_method_pretrain_overrides_one_method_only(tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", smoke=True)
    cfg.method_pretrain = {"supervised": {"train": {"steps": 7, "lr": 0.5}}}
    plan = Plan(cfg, tmp_path / cfg.name)
    sup, t3d = plan.pretrain_config("supervised", 0), plan.pretrain_config("t3d", 0)
    assert (sup.train.steps, sup.train.lr) == (7, 0.5)
    assert (t3d.train.steps, t3d.train.lr) == (
        cfg.pretrain["train"]["steps"],
        cfg.pretrain["train"].get("lr", t3d.train.lr),
    )
    assert sup.train.batch_size == t3d.train.batch_size  # the rest of the shared budget stays
    override = ['--method_pretrain={"t3d-hard": {"train": {"steps": 7}}}']  # not run by this configuration: say so
    with pytest.raises(ConfigError, match="t3d-hard"):
        transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", smoke=True, overrides=override)


def test_a_worker_of_jobs_shares_the_work_folder_of_the_whole_configuration(tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml")
    transfer.check_work_folder(tmp_path, cfg)
    for group in transfer.partition(cfg, 2):
        worker = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml")
        transfer.narrow(worker, group)
        assert [*worker.controls, *worker.main_methods] == [m for m in [*cfg.controls, *cfg.main_methods] if m in group]
        transfer.check_work_folder(tmp_path, worker)  # same fingerprint: no ConfigError


def test_work_folder_refuses_other_settings(tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", smoke=True)
    transfer.check_work_folder(tmp_path, cfg)
    transfer.check_work_folder(tmp_path, cfg)  # same settings: fine
    cfg.seg = {**cfg.seg, "steps": 999}
    with pytest.raises(ConfigError, match="seg"):
        transfer.check_work_folder(tmp_path, cfg)
    other = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", smoke=True)
    other.probes.data.num_studies += 1  # other probe studies: every probe stage would be stale
    with pytest.raises(ConfigError, match="probe_data"):
        transfer.check_work_folder(tmp_path, other)


def test_a_probe_stage_reruns_when_its_probe_settings_change(tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", smoke=True)
    stage = next(s for s in Plan(cfg, tmp_path).stages() if s.meta.get("kind") == "probes")
    assert stage.meta["settings"]["lesion_pooling"] == "centre" and "data" not in stage.meta["settings"]
    stage.out.mkdir(parents=True)
    stage.result_path.write_text(json.dumps({**stage.meta, "lesion": {}}))
    assert stage.done()
    cfg.probes.focal_findings = ["Liver lesion"]  # how the report groups findings: the stage stays done
    assert next(s for s in Plan(cfg, tmp_path).stages() if s.name == stage.name).done()
    cfg.probes.lesion_pooling = "crop"
    again = next(s for s in Plan(cfg, tmp_path).stages() if s.name == stage.name)
    assert not again.done()


def test_lesion_pooling_is_checked_at_load_time():
    with pytest.raises(ConfigError, match="lesion_pooling"):
        transfer_config.load_transfer_config(
            ROOT / "benchmarks" / "transfer_cpu.yaml", True, ["--probes.lesion_pooling", '"centroid"']
        )


def test_seg_subset_keeps_the_first_test_studies(tmp_path):
    desc = {"labels": {"0": "bg"}, "training": [{"image": "images/t.nii.gz", "label": "labels/t.nii.gz"}],
            "test": [{"image": f"images/s{i}.nii.gz", "label": f"labels/s{i}.nii.gz"} for i in (3, 1, 2)]}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    info = write_seg_subset(str(tmp_path / "dataset.json"), str(tmp_path / "out" / "sub.json"), 2)
    sub = json.loads((tmp_path / "out" / "sub.json").read_text())
    assert info == {"kept": 2, "of": 3}
    assert [Path(e["image"]).name for e in sub["test"]] == ["s1.nii.gz", "s2.nii.gz"]
    assert Path(sub["training"][0]["label"]).is_absolute()


def _labelled_world(work: Path, labelled: bool = True) -> None:
    """The files a plan reads for the segmentation control: pre-training manifest (+ label maps), splits, seg set."""
    data = work / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    rows = []
    for i in range(4):
        for kind in ("images", "labels"):
            (data / kind / f"s{i}.nii.gz").write_bytes(b"")
        row = {"id": f"s{i}", "image": f"images/s{i}.nii.gz", "report": "No findings."}
        rows.append({**row, "label": f"labels/s{i}.nii.gz"} if labelled or i else row)
    (data / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "splits.json").write_text(json.dumps({"pretrain": ["s0", "s1", "s2"], "finetune": ["s3"], "test": []}))
    desc = {"labels": {"0": "background", "1": "liver"}, "training": [], "test": [{"image": "t.nii.gz", "label": "l"}]}
    (work / "prep").mkdir()
    (work / "prep" / "seg_dataset.json").write_text(json.dumps(desc))


def test_the_segmentation_control_trains_on_the_pretraining_label_maps(tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_gate_smoke.yaml", smoke=True)
    cfg.controls = [*cfg.controls, "supervised-seg"]
    cfg.seg_control = {"steps": 9}
    plan = Plan(cfg, tmp_path / "w")
    _labelled_world(plan.work)
    stages = {s.name: s for s in plan.stages()}
    control = stages["seed0/supervised-seg/pretrain"]
    assert control.meta["kind"] == "seg_control" and control.out == plan.run_dir("supervised-seg", 0) / "pretrain"
    scfg = transfer_controls.seg_control_config(plan, 0)
    desc = json.loads(Path(scfg.data).read_text())
    assert [Path(e["image"]).name for e in desc["training"]] == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
    assert all(Path(e["label"]).is_absolute() and e["label"].endswith(".nii.gz") for e in desc["training"])
    assert desc["test"] == [{"image": "t.nii.gz", "label": "l"}] and desc["labels"]["1"] == "liver"
    assert (scfg.steps, scfg.seed, scfg.init, scfg.fraction) == (9, 0, "random", 1.0)  # the pre-training seed
    assert scfg.lr == cfg.seg["lr"] and scfg.model == plan.pretrain_config("t3d", 0).model
    seg = plan.downstream_config(transfer_plan.SegConfig, cfg.seg, "supervised-seg", 0)
    assert seg.init == str(control.out)  # every downstream stage starts from the control's segmentation run
    assert transfer.method_cost("supervised-seg", 1) > transfer.method_cost("random", 1)
    for gone in ("prep", "data"):
        shutil.rmtree(plan.work / gone)
    _labelled_world(plan.work, labelled=False)
    with pytest.raises(ValueError, match="no label map for 1 of them .*s0.*'label' column"):
        transfer_controls.seg_control_config(plan, 0)


def test_jobs_partition_covers_every_method_once_and_balances_cost():
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml")
    groups = transfer.partition(cfg, 2)
    flat = [m for g in groups for m in g]
    main = cfg.controls + cfg.main_methods
    assert sorted(flat) == sorted(main + cfg.ablations)
    loads = [
        sum(transfer.method_cost(m, len(cfg.seeds if m in main else cfg.ablation_seeds)) for m in g) for g in groups
    ]
    assert len(groups) == 2 and max(loads) <= 1.25 * min(loads)
    assert sorted(transfer.partition(cfg, 50)) == sorted([m] for m in flat)  # more workers than methods: one each


def test_strip_option_removes_the_option_and_its_value_only():
    argv = ["--config", "x.yaml", "--jobs", "2", "--seg.steps", "2", "--jobs=3"]
    assert transfer.strip_option(argv, "--jobs") == ["--config", "x.yaml", "--seg.steps", "2"]


# ----------------------------------------------------------------------------------------------- sensitivity gate


def _probe_result(method: str, seed: int, signal: float) -> dict:
    """A probes stage result whose scores separate the labels by ``signal`` (0 = chance)."""
    y = (np.random.default_rng(99).random((80, 2)) < 0.4).astype(float)  # the same test studies for every run
    rng = np.random.default_rng(seed)
    p = signal * y + rng.random((80, 2))
    label = np.tile([1.0, 0.0], 60)
    score = signal * label + rng.random(120)
    stratum = np.repeat([0, 1], 60)
    lesion_test = {"label": label.tolist(), "score": score.tolist(), "stratum": stratum.tolist(),
                   "ids": [f"s{i // 2}@{i}" for i in range(120)]}  # fmt: skip
    return {"kind": "probes", "method": method, "seed": seed,
            "study_scores": {"ids": [f"s{i}" for i in range(80)], "y": y.tolist(), "p": p.tolist()},
            "lesion": {"test": lesion_test, "strata": {}}}  # fmt: skip


def _seg_result(kind: str, method: str, seed: int, organ: float) -> dict:
    rng = np.random.default_rng(seed)
    cases = [{"id": f"c{i}", "dice": [organ + 0.02 * rng.standard_normal(), 0.1], "small_lesion_dice": None,
              "small_lesions": 0} for i in range(12)]  # fmt: skip
    labels = {"0": "background", "1": "liver", "2": "liver_lesion"}
    return {"kind": kind, "method": method, "seed": seed, "fraction": 1.0, "cases": cases, "labels": labels}


def test_sensitivity_gate_from_stage_results():
    results = []
    for seed in (0, 1):
        runs = (("random", 0.0, 0.3), ("supervised", 2.0, 0.8), ("vssl", 0.1, 0.31), ("supervised-seg", 2.0, 0.3))
        for method, signal, organ in runs:
            results.append(_probe_result(method, seed, signal))
            results += [_seg_result(k, method, seed, organ) for k in ("seg", "frozen_seg")]
    gate = transfer_probes.sensitivity_gate(results, [10.0], [1.0], n_boot=300)
    assert set(gate) == {"study_probe_auroc", "lesion_probe_auroc_small", "lesion_probe_auroc_large", "organ_dice",
                         "lesion_dice", "small_lesion_dice", "frozen_seg_organ_dice"}  # fmt: skip
    for name in ("study_probe_auroc", "lesion_probe_auroc_small", "lesion_probe_auroc_large", "organ_dice"):
        assert gate[name]["sensitive"], (name, gate[name])
        assert gate[name]["ci_low"] > 0 and gate[name]["seeds"] == [0, 1]
    assert gate["frozen_seg_organ_dice"]["sensitive"]
    assert gate["organ_dice"]["supervised_minus_random"] == pytest.approx(0.5, abs=0.02)
    assert abs(gate["organ_dice"]["vssl_minus_random"]) < 0.05
    assert not gate["lesion_dice"]["sensitive"]  # equal for every method
    assert not gate["small_lesion_dice"]["sensitive"]  # not measured: no small lesions in these cases
    assert gate["study_probe_auroc"]["sensitive_by"] == ["supervised", "supervised-seg"]
    assert gate["organ_dice"]["sensitive_by"] == ["supervised"]  # the segmentation control: no better than random
    assert abs(gate["organ_dice"]["supervised_seg_minus_random"]) < 0.05
    summary_lines = transfer_report.gate_lines({"gate": gate})
    assert summary_lines[0].startswith("## Sensitivity gate") and "not sensitive at this budget" in "\n".join(
        summary_lines
    )


def test_the_gate_splits_organ_and_lesion_classes_as_the_report_does():
    """A lesion class whose name does not say so (pleural effusion) counts as a lesion where ``lesion_labels`` says
    it is one, in the gate as in the report's tables, and not among the organs."""
    results = []
    for method, effusion in (("random", 0.1), ("supervised-seg", 0.7)):
        for kind in ("seg", "frozen_seg"):
            r = _seg_result(kind, method, 0, 0.5)
            r["labels"] = {"0": "background", "1": "liver", "2": "pleural_effusion"}
            for case in r["cases"]:
                case["dice"][1] = effusion
            results.append(r)
    by_name = transfer_probes.sensitivity_gate(results, [10.0], [1.0], n_boot=200)
    given = transfer_probes.sensitivity_gate(results, [10.0], [1.0], n_boot=200, lesion_labels=[2])
    assert by_name["organ_dice"]["supervised_seg_minus_random"] == pytest.approx(0.3, abs=0.02)  # liver + effusion
    assert given["organ_dice"]["supervised_seg_minus_random"] == pytest.approx(0.0, abs=0.02)
    assert given["lesion_dice"]["supervised_seg_minus_random"] == pytest.approx(0.6, abs=1e-6)
    assert given["lesion_dice"]["sensitive"] and not given["organ_dice"]["sensitive"]


def test_the_study_probe_is_gated_on_focal_and_diffuse_findings_apart():
    """A control that separates only the diffuse findings passes the diffuse stratum and fails the focal one; the
    column names come from ``study_scores`` or, in results stored without them, the per-finding metrics."""
    names = ["Liver lesion", "Splenomegaly", "Lung nodule", "Pleural effusion"]
    y = (np.random.default_rng(99).random((150, 4)) < 0.4).astype(float)
    results = []
    for method, signal in (("random", 0.0), ("supervised", 3.0)):
        for seed in (0, 1):
            p = np.random.default_rng(seed).random((150, 4)) + signal * y * np.array([0, 1, 0, 1])  # diffuse only
            scores = {"ids": [f"s{i}" for i in range(150)], "y": y.tolist(), "p": p.tolist()}
            if seed == 0:
                scores["names"] = names
            study = {"metrics": {"macro": {"auroc": {"value": 0.5}}, "per_class": {n: {} for n in names}}}
            lesion = {
                "test": {"label": [], "score": [], "stratum": [], "ids": []},
                "strata": {"small": {}, "large": {}},
            }
            results.append({"kind": "probes", "method": method, "seed": seed, "study_scores": scores, "study": study,
                            "lesion": lesion})  # fmt: skip
    focal = ["Liver lesion", "Lung nodule", "Kidney stone"]  # a name the data lack is ignored
    gate = transfer_probes.sensitivity_gate(results, [10.0], [1.0], n_boot=300, focal=focal)
    diffuse, focal_entry = gate["study_probe_auroc_diffuse"], gate["study_probe_auroc_focal"]
    assert diffuse["sensitive"] and diffuse["supervised_minus_random"] > 0.3
    assert not focal_entry["sensitive"] and abs(focal_entry["supervised_minus_random"]) < 0.1
    assert "study_probe_auroc_focal" not in transfer_probes.sensitivity_gate(results, [10.0], [1.0], n_boot=50)
    cells = transfer_probes.probe_cells(results, ["random", "supervised"], [10.0], focal, n_boot=200)
    assert cells["supervised"]["0"]["study_probe_auroc_diffuse"]["value"] > 0.85
    assert abs(cells["supervised"]["1"]["study_probe_auroc_focal"]["value"] - 0.5) < 0.15
    found = transfer_claims.claims(results, [10.0], [1.0], ["random"], gate, 300, focal=focal, a="supervised")
    diffuse_claim = next(c for c in found if c["metric"] == "study_probe_auroc_diffuse")
    assert diffuse_claim["sensitive"] and not diffuse_claim["claim"] and diffuse_claim["diff"] > 0.3
    only_focal = ["Liver lesion", "Splenomegaly", "Lung nodule", "Pleural effusion"]  # no diffuse column: no groups
    assert transfer_probes.finding_groups(results[0], only_focal) == {}


def test_results_table_lists_controls_apart():
    cells = {m: {"organ_dice": {"mean": 0.5, "low": 0.4, "high": 0.6, "n_seeds": 1}} for m in ("random", "t3d")}
    lines = transfer_report.results_table(cells, ["random", "t3d"], ["organ_dice"], controls=["random"])
    assert lines[2].startswith("| *controls*") and lines[3].startswith("| random (control)")
    assert lines[4].startswith("| *methods*") and lines[5].startswith("| t3d |")


def test_claims_compare_t3d_with_the_best_vssl_and_clip_and_carry_the_gate():
    results = []
    for seed in (0, 1):
        for method, signal, organ in (
            ("random", 0.0, 0.3), ("supervised", 2.0, 0.8), ("vssl", 0.1, 0.31), ("vssl-restore", 0.5, 0.32),
            ("clip", 0.5, 0.31), ("t3d", 2.0, 0.31),
        ):  # fmt: skip
            results.append(_probe_result(method, seed, signal))
            results += [_seg_result(k, method, seed, organ) for k in ("seg", "frozen_seg")]
    gate = transfer_probes.sensitivity_gate(results, [10.0], [1.0], n_boot=300)
    found = transfer_claims.claims(results, [10.0], [1.0], ["vssl", "vssl-restore"], gate, n_boot=300)
    pairs = {(c["b"], c["metric"]): c for c in found}
    # The best vSSL candidate is the one with the larger gain over random (vssl-restore here); clip on small lesions.
    # Small-lesion Dice is not measured (these cases hold no small lesion): no comparison rather than a NaN one.
    # Both baselines are also compared on the supporting metrics (large lesions, organs), marked as not claims.
    assert {k for k, c in pairs.items() if c["claim"]} == {
        ("vssl-restore", "study_probe_auroc"), ("vssl-restore", "lesion_probe_auroc_small"),
        ("vssl-restore", "lesion_dice"), ("clip", "lesion_probe_auroc_small"),
    }  # fmt: skip
    assert {k for k, c in pairs.items() if not c["claim"]} == {
        (b, m) for b in ("vssl-restore", "clip") for m in ("lesion_probe_auroc_large", "organ_dice")
    }
    probe = pairs[("vssl-restore", "study_probe_auroc")]
    assert probe["a"] == "t3d" and probe["diff"] > 0.1 and probe["ci_low"] > 0 and probe["sensitive"]
    assert pairs[("vssl-restore", "lesion_dice")]["sensitive"] is False  # the gate failed on lesion Dice
    lines = transfer_claims.claims_table(found)
    text = "\n".join(lines)
    assert "t3d better" in text and "not sensitive at this budget: no claim" in text
    assert "(supporting)" not in "\n".join(lines[2:6]) and "(supporting)" in lines[-1]  # the claims come first


def test_alignment_gates_table_from_alignment_stages():
    passes = {"align_share": True, "retrieval_above_chance": False, "heldout_study_cos": True, "text_diagnostic": None}
    stage = {"kind": "alignment", "method": "clip", "seed": 0, "align_share": 0.4, "retrieval_r5": 0.1,
             "retrieval_r5_ci_low": 0.05, "retrieval_chance": 0.078, "heldout_study_cos": 0.5,
             "passes": passes}  # fmt: skip
    gates = transfer_claims.alignment_gates([stage, {"kind": "seg", "method": "clip", "seed": 0}])
    assert list(gates) == ["clip"] and set(gates["clip"]) == {"0"}
    row = gates["clip"]["0"]
    assert row["text_diag_diff"] is None and row["align_share"] == 0.4 and row["passes"] == passes
    line = transfer_claims.alignment_table(gates)[2]
    assert line.startswith("| clip | 0 | 0.40 **pass** | 0.100 [0.050] vs 0.078 fail | 0.500 **pass** | n/a |")
    assert line.endswith("| — | — |")  # a stage from before the diagnostics: nothing invented
    why = {"output_change_all_voxels": 0.0183, "output_change": 0.02, "lesion_share": 0.001}
    t3d = stage | {"method": "t3d", "text_diag_diff": 0.0016, "text_diag_ci_low": -0.0006, "text_diag_why": why,
                   "text_diag_diff_focal_whole": 0.0041, "text_diag_ci_low_focal_whole": 0.0013,
                   "passes": passes | {"text_diagnostic": False}}  # fmt: skip
    row = transfer_claims.alignment_gates([t3d])["t3d"]["0"]
    assert row["text_diag_output_change"] == 0.0183 and row["text_diag_ci_low_focal_whole"] == 0.0013
    line = transfer_claims.alignment_table({"t3d": {"0": row}})[2]
    assert "| +0.0016 [-0.0006] fail |" in line and line.endswith("| 0.0183 | +0.0041 [+0.0013] |")


def test_joint_space_runs_get_an_alignment_stage(tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", smoke=True)
    cfg.main_methods = ["vssl", "clip", "t3d"]
    names = {s.name for s in Plan(cfg, tmp_path / cfg.name).stages()}
    assert {"seed0/clip/alignment", "seed0/t3d/alignment"} <= names
    assert not {"seed0/vssl/alignment", "seed0/supervised/alignment", "seed0/random/alignment"} & names


def test_every_encoder_gets_a_retrieval_probe_stage_with_its_settings(tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", smoke=True)
    by_name = {s.name: s for s in Plan(cfg, tmp_path / cfg.name).stages()}
    for method in [*cfg.controls, *cfg.main_methods]:
        stage = by_name[f"seed0/{method}/retrieval_probe"]
        assert stage.meta["kind"] == "retrieval_probe" and stage.meta["settings"]["weight_decays"]
    cfg.retrieval_probe = None
    assert not any(n.endswith("/retrieval_probe") for n in (s.name for s in Plan(cfg, tmp_path / "x").stages()))


def _retrieval_stage(method: str, low: float, value: float = 0.1, ceiling: bool = False) -> dict:
    r = {"kind": "retrieval_probe", "method": method, "seed": 0, "chance": 0.042, "train_r5": 0.9, "weight_decay": 5.0,
         "n_train": 180, "n_test": 120, "r@5": {"value": value, "low": low, "high": 0.2}}  # fmt: skip
    if ceiling:
        cell = {"r@5": {"value": 0.7, "low": 0.6, "high": 0.8}}
        r["ceiling"] = {"findings": cell, "diffuse_findings": cell}
    return r


def test_the_retrieval_gate_is_sensitive_only_when_a_positive_control_clears_chance():
    at_chance = [_retrieval_stage("random", 0.02, ceiling=True), _retrieval_stage("supervised", 0.03)]
    rc = transfer_retrieval.retrieval_controls([*at_chance, {"kind": "alignment", "method": "t3d", "seed": 0}])
    assert set(rc["runs"]) == {"random", "supervised"} and rc["sensitive"] == {"0": False}
    assert rc["ceiling"]["0"]["findings"]["r5"] == 0.7
    lines = transfer_retrieval.retrieval_control_lines(rc)
    assert "| supervised | 0 | 0.100 [0.030, 0.200] | 0.042 | 0.90 | — |" in lines
    assert any("exact finding vectors" in line for line in lines)
    assert "no positive control clears chance" in lines[-2]
    # The random control clearing chance does not make the gate sensitive; a positive control does.
    rc = transfer_retrieval.retrieval_controls([_retrieval_stage("random", 0.05), _retrieval_stage("supervised", 0.03)])
    assert rc["sensitive"] == {"0": False}
    rc = transfer_retrieval.retrieval_controls([_retrieval_stage("supervised-seg", 0.05)])
    assert rc["sensitive"] == {"0": True} and "is sensitive" in transfer_retrieval.retrieval_control_lines(rc)[-2]
    rc = transfer_retrieval.retrieval_controls([_retrieval_stage("vssl", 0.05)])
    assert rc["sensitive"] == {"0": None}
    assert transfer_retrieval.retrieval_control_lines({}) == []


def test_the_report_prints_the_retrieval_controls_with_or_without_joint_space_runs():
    rc = transfer_retrieval.retrieval_controls([_retrieval_stage("supervised", 0.05)])
    alone = transfer_report.alignment_lines({"retrieval_controls": rc})
    assert alone[0].startswith("## Retrieval through the frozen encoders") and any("| supervised |" in x for x in alone)
    passes = {
        "align_share": False,
        "retrieval_above_chance": False,
        "heldout_study_cos": False,
        "text_diagnostic": None,
    }
    stage = {
        "kind": "alignment",
        "method": "t3d",
        "seed": 0,
        "align_share": 0.1,
        "retrieval_r5": 0.05,
        "passes": passes,
        "retrieval_r5_ci_low": 0.0,
        "retrieval_chance": 0.04,
        "heldout_study_cos": 0.9,
    }
    lines = transfer_report.alignment_lines(
        {"alignment_gates": transfer_claims.alignment_gates([stage]), "retrieval_controls": rc}
    )
    assert lines[0].startswith("## Alignment gates") and lines.index(alone[2]) > 2
    assert transfer_report.alignment_lines({}) == []


# ----------------------------------------------------------------------------------------------- fine-tuning runs


def test_run_draws_stay_within_their_seed_and_leave_the_seed_draws_unchanged():
    seeds, cases = transfer_stats.resample(3, 7, 200, seed=4)
    rows, cases_r = transfer_stats.resample(3, 7, 200, seed=4, repeats=2)
    assert rows.shape == (200, 6) and np.array_equal(cases, cases_r)
    assert np.array_equal(rows // 2, np.repeat(seeds, 2, axis=1))  # the runs of each drawn seed, drawn within it
    assert set(np.unique(rows % 2)) == {0, 1}


def test_fine_tuning_luck_widens_the_dice_interval_and_hides_a_difference_it_explains():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, size=20)
    b = np.stack([base, base + 0.1])  # one seed, two fine-tuning runs 0.1 apart
    one = transfer_stats.dice_cell(b[:1], None, n_boot=500)
    both = transfer_stats.dice_cell(b, None, n_boot=500, repeats=2)
    assert (
        both["n_seeds"] == 1
        and both["n_runs"] == 2
        and both["run_means"] == pytest.approx([base.mean(), base.mean() + 0.1])
    )
    assert both["high"] - both["low"] > one["high"] - one["low"]
    # a - b = +0.05 in run 0 and -0.05 in run 1: case resampling alone would call run 0 a win
    a = np.stack([base + 0.05, base + 0.05])
    assert transfer_stats.paired_dice(a[:1], b[:1], None, n_boot=500)["low"] > 0
    runs = transfer_stats.paired_dice(a, b, None, n_boot=500, repeats=2)
    assert runs["low"] < 0 < runs["high"] and runs["n_runs"] == 2
    assert runs["per_run_delta"] == pytest.approx([0.05, -0.05])
    steady = transfer_stats.paired_dice(b + 0.05, b, None, n_boot=500, repeats=2)
    assert steady["low"] > 0  # a difference every run shows survives
    with pytest.raises(ValueError, match="whole seeds"):
        transfer_stats.dice_cell(np.ones((3, 4)), None, n_boot=10, repeats=2)


def test_results_pair_the_fine_tuning_runs_both_methods_have():
    runs = [seg_result("t3d", 0, 0.05), seg_result("vssl", 0, 0.0), {**seg_result("t3d", 0, -0.05), "repeat": 1}]
    table = transfer_results.Results(runs)
    assert table.seeds("seg", "t3d", 1.0) == [0] and table.repeats("seg", ["t3d"], [0], 1.0) == [0, 1]
    assert table.repeats("seg", ["t3d", "vssl"], [0], 1.0) == [0]
    values, _, ids, n_runs = table.seg_matrix("organ_dice", "t3d", 1.0)
    assert values.shape == (2, len(ids)) and n_runs == 2
    assert values[0] - values[1] == pytest.approx(np.full(len(ids), 0.1))
    delta = transfer_results.compare(table, "organ_dice", "t3d", "vssl", 1.0, n_boot=200)
    assert delta["repeats"] == [0] and delta["mean"] == pytest.approx(0.05)  # vssl has run 0 only
    runs.append({**seg_result("vssl", 0, 0.0), "repeat": 1})
    delta = transfer_results.compare(transfer_results.Results(runs), "organ_dice", "t3d", "vssl", 1.0, n_boot=200)
    assert delta["repeats"] == [0, 1] and delta["mean"] == pytest.approx(0.0) and delta["n_runs"] == 2
    gate = transfer_probes.paired(transfer_results.Results(runs), "seg", "organ_dice", 1.0, "t3d", "vssl", 200)
    assert gate["per_run_delta"] == pytest.approx([0.05, -0.05])


def test_seg_repeats_plan_extra_fine_tuning_runs_with_their_own_seeds(tmp_path):
    cfg = transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", smoke=True)
    cfg.seg_repeats = 3
    by_name = {s.name: s for s in Plan(cfg, tmp_path / cfg.name).stages()}
    first, third = by_name["seed0/t3d/seg f=1"], by_name["seed0/t3d/seg f=1 run2"]
    assert "repeat" not in first.meta and first.meta["finetune_seed"] == cfg.finetune_seed_offset
    assert third.meta["repeat"] == 2 and third.meta["finetune_seed"] == cfg.finetune_seed_offset + 200
    assert third.out.name == "seg_f1_run2" and third.out.parent == first.out.parent
    assert "seed0/t3d/seg f=1 run1" in by_name and "seed0/t3d/seg f=1 run3" not in by_name
    assert not any(n.endswith("run1") for n in by_name if "/probe" in n)  # probes are fitted once
    with pytest.raises(ConfigError, match="seg_repeats"):
        transfer_config.load_transfer_config(ROOT / "benchmarks" / "transfer_cpu.yaml", overrides=["--seg_repeats=0"])
    with pytest.raises(ConfigError, match="< 100"):
        transfer_config.load_transfer_config(
            ROOT / "benchmarks" / "transfer_cpu.yaml", overrides=["--seeds=[100]", "--seg_repeats=2"]
        )


def test_the_report_shows_each_fine_tuning_run():
    runs = [seg_result("vssl", 0, 0.0), {**seg_result("vssl", 0, 0.1), "repeat": 1}, seg_result("random", 0, 0.0)]
    table = transfer_results.Results(runs)
    summary = transfer_results.summarise(table, ["random", "vssl"], [1.0], ["vssl"], ["organ_dice"], n_boot=100)
    cells = summary["cells"]["1.0"]
    assert cells["vssl"]["organ_dice"]["n_runs"] == 2 and cells["random"]["organ_dice"]["n_runs"] == 1
    lines = transfer_report.runs_table(cells, ["random", "vssl"], ["random"])
    assert len(lines) == 3 and lines[2].startswith("| vssl | 0.700, 0.800 |") and lines[2].endswith("| 0.100 |")
    assert "1 (Dice: 2 runs)" in "\n".join(transfer_report.results_table(cells, ["random", "vssl"], ["organ_dice"]))
    assert transfer_report.runs_table(summary["cells"]["1.0"], ["random"]) == []
