"""`t3d demo` end to end on the tiny preset: every stage runs and a second run reuses the finished ones."""

import math

from t3d.cli import main as cli_main
from t3d.demo import run_demo


def test_demo_runs_the_whole_chain_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--num-studies", "12", "--preset", "tiny"]
    args += ["--steps", "2", "--finetune-steps", "2"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "final losses:" in printed and "demonstrate the pipeline, not the method's strength" in printed
    for name in ("pretrained", "random"):
        assert (out / "runs" / f"seg-{name}" / "metrics.json").is_file()
        assert (out / "runs" / f"cls-{name}" / "roc.png").is_file()
    assert (out / "runs" / "pretrain" / "loss_curves.png").is_file()

    stamp = (out / "runs" / "seg-pretrained" / "metrics.json").stat().st_mtime_ns
    again = run_demo(out, num_studies=12, preset="tiny", steps=2, finetune_steps=2)
    assert (out / "runs" / "seg-pretrained" / "metrics.json").stat().st_mtime_ns == stamp  # read back, not re-run
    assert [r["init"] for r in again["rows"]] == ["pretrained", "random"]
    assert all(0.0 <= r["dice_mean"] <= 1.0 for r in again["rows"])
    assert all(math.isnan(r["auroc"]) or 0.0 <= r["auroc"] <= 1.0 for r in again["rows"])
    assert again["pretrain"]["final"]["loss"] > 0  # a finished run reports its last logged terms
