"""`t3d demo` end to end on the tiny preset: every stage runs and a second run reuses the finished ones."""

import json
import math

from t3d.cli import main as cli_main
from t3d.demo import run_demo
from t3d.evaluate.compare import paired_case_diff, probe_split, verdict

ROWS = ["finding AUROC (study probe)", "lesion AUROC < 10 mm", "lesion AUROC (all sizes)"]


def test_demo_runs_the_whole_chain_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--num-studies", "12", "--preset", "tiny"]
    args += ["--steps", "2", "--finetune-steps", "2"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "final losses:" in printed and "demonstrate the pipeline, not the method's strength" in printed
    assert "difference [95% CI]" in printed and ("no measurable difference" in printed or "helped" in printed)
    for name in ("pretrained", "random"):
        assert (out / "runs" / f"seg-{name}" / "metrics.json").is_file()
    assert (out / "runs" / "pretrain" / "loss_curves.png").is_file()
    table = json.loads((out / "table.json").read_text())
    assert table["method"] == "t3d" and set(ROWS) <= set(table["rows"])  # the configured default method
    assert sum(table["probes"]["n_studies"].values()) == 12  # every study is a probe study, split as the demo's

    stamp = (out / "runs" / "seg-pretrained" / "metrics.json").stat().st_mtime_ns
    again = run_demo(out, num_studies=12, preset="tiny", steps=2, finetune_steps=2)
    assert (out / "runs" / "seg-pretrained" / "metrics.json").stat().st_mtime_ns == stamp  # read back, not re-run
    for row in again["rows"].values():
        assert set(row) == {"pretrained", "random", "diff"}
        for cell in (row["pretrained"], row["random"]):
            assert math.isnan(cell["value"]) or 0.0 <= cell["value"] <= 1.0
    assert again["verdict"] == table["verdict"]
    assert again["pretrain"]["final"]["loss"] > 0  # a finished run reports its last logged terms


def test_paired_case_diff_pairs_cases_and_drops_nan():
    a = [{"id": "s1", "dice": [0.8, 0.6]}, {"id": "s2", "dice": [0.4, float("nan")]}, {"id": "s3", "dice": None}]
    b = [{"id": "s1", "dice": [0.5, 0.5]}, {"id": "s2", "dice": [0.2, 0.2]}, {"id": "s3", "dice": [0.1]}]
    got = paired_case_diff(a, b, "dice", n_boot=200)
    assert math.isclose(got["pretrained"]["value"], (0.7 + 0.4) / 2)  # s3 is NaN in one run: dropped from both
    assert math.isclose(got["diff"]["value"], ((0.7 - 0.5) + (0.4 - 0.2)) / 2)
    assert got["diff"]["low"] <= got["diff"]["value"] <= got["diff"]["high"]


def test_verdict_says_helped_only_when_the_interval_excludes_zero():
    assert "no measurable difference" in verdict({"auroc": {"value": 0.2, "low": -0.01, "high": 0.4}})
    line = verdict({"auroc": {"value": 0.2, "low": 0.05, "high": 0.4}, "dice": {"value": 0.0, "low": -1, "high": 1}})
    assert line.startswith("Pre-training helped on auroc") and "dice" not in line
    assert "worse than random on dice" in verdict({"dice": {"value": -0.2, "low": -0.3, "high": -0.1}})


def test_probe_split_scores_only_studies_pre_training_never_saw(tmp_path):
    splits = tmp_path / "splits.json"
    ids = {"pretrain": [f"p{i}" for i in range(8)], "finetune": ["f0", "f1"], "test": ["t0"]}
    splits.write_text(json.dumps(ids))
    got = probe_split(splits, seed=0)
    assert {i for i, s in got.items() if s == "test"} == {"f0", "f1", "t0"}
    assert sum(s == "val" for s in got.values()) == 2 and sum(s == "train" for s in got.values()) == 6
    assert got == probe_split(splits, seed=0)  # seeded
