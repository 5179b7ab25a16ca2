"""``t3d demo``: the main job on embedded default data, end to end on a laptop CPU in about ten minutes.

synthetic CT + reports -> preprocessing cache -> pre-training (``configs/quickstart.yaml``) -> segmentation and
classification fine-tuning from the pre-trained encoder and from random initialisation -> a side-by-side table.
Every stage is the real command's Python API. Re-running the demo reuses finished stages: the synthetic data and the
cache are idempotent, pre-training resumes from its checkpoint, and finished fine-tuning runs are read back.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from t3d.config import QUICKSTART_CONFIG, PretrainConfig, load_config
from t3d.data.preprocess import preprocess_manifest
from t3d.data.synthetic import generate_dataset
from t3d.data.synthetic.command import format_summary
from t3d.finetune.cls import run_cls
from t3d.finetune.config import ClsConfig, SegConfig
from t3d.finetune.seg import run_seg
from t3d.pretrain.main import run_pretrain


def command(args: argparse.Namespace) -> int:
    run_demo(args.out, args.num_studies, args.seed, args.config, args.steps, args.finetune_steps, args.preset)
    return 0


def run_demo(
    out: str | Path,
    num_studies: int = 48,
    seed: int = 0,
    config: str | Path = QUICKSTART_CONFIG,
    steps: int | None = None,
    finetune_steps: int = 120,
    preset: str = "small",
) -> dict:
    """Run every stage; return ``{"pretrain": summary, "rows": [table rows]}``."""
    out = Path(out)
    data, cache, runs = out / "data", out / "cache", out / "runs"
    t0 = time.perf_counter()
    print(f"[1/5] synthetic CT + reports -> {data}")
    synth = generate_dataset(data, num_studies, seed, preset=preset, workers=2, progress=True)
    print("      " + format_summary(synth).replace("\n", "\n      "))

    overrides = [
        "--data.manifest", str(data / "pretrain.jsonl"),
        "--data.cache", str(cache),
        "--train.out", str(runs / "pretrain"),
        "--seed", str(seed),
    ]  # fmt: skip
    if steps is not None:
        overrides += ["--train.steps", str(steps)]
    cfg = load_config(PretrainConfig, config, overrides)

    print(f"[2/5] preprocessing the pre-training studies -> {cache}")
    pre = preprocess_manifest(data / "pretrain.jsonl", cache, cfg.preprocess, workers=2)
    print(f"      {pre['processed']} processed, {pre['skipped']} unchanged, {pre['quarantined']} quarantined")

    model = f"{cfg.model.encoder}/{cfg.model.preset}"
    print(f"[3/5] pre-training '{cfg.method}' ({model}, crops {list(cfg.crops.size)}) -> {runs / 'pretrain'}")
    summary = run_pretrain(cfg, resume=True)
    final = summary["final"]
    print("      final losses: " + "  ".join(f"{k}={final[k]:.4f}" for k in summary["terms"] if k in final))
    print(f"      chance level of the contrastive terms: log B = {math.log(cfg.train.batch_size):.3f}")

    print("[4/5] segmentation fine-tuning: pre-trained vs random initialisation")
    seg = {name: _segment(data, runs, name, finetune_steps, seed) for name in ("pretrained", "random")}
    print("[5/5] classification linear probe: pre-trained vs random initialisation")
    cls = {name: _classify(data, runs, name, seed) for name in ("pretrained", "random")}

    rows = [_row(name, seg[name], cls[name]) for name in ("pretrained", "random")]
    _print_table(rows, runs)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s.")
    print("These tiny CPU numbers demonstrate the pipeline, not the method's strength: the transfer benchmark")
    print("(benchmarks/transfer.py) measures that, with several seeds and baselines.")
    return {"pretrain": summary, "rows": rows}


def _finetune(task: str, runs: Path, name: str, args: list[str]) -> dict:
    """Run (or read back) one fine-tuning run; ``name``: ``pretrained`` (weights) or ``random`` (same architecture)."""
    out = runs / f"{task}-{name}"
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    init = ["--init" if name == "pretrained" else "--arch_from", str(runs / "pretrain")]
    common = ["--out", str(out), "--cache", str(runs / f"{task}-cache"), "--workers", "1", *init]
    config_cls, run = (SegConfig, run_seg) if task == "seg" else (ClsConfig, run_cls)
    return run(load_config(config_cls, None, [*args, *common]))


def _segment(data: Path, runs: Path, name: str, steps: int, seed: int) -> dict:
    return _finetune(
        "seg",
        runs,
        name,
        [
            "--data", str(data / "dataset.json"), "--seed", str(seed), "--batch_size", "2",
            # Validate once at the end on two studies, windows overlapping by a quarter: keeps the demo in minutes.
            "--steps", str(steps), "--val_every", str(steps), "--max_val_cases", "2", "--overlap", "0.25",
            "--lr", "1e-3", "--warmup_steps", "10",
        ],
    )  # fmt: skip


def _classify(data: Path, runs: Path, name: str, seed: int) -> dict:
    args = ["--data", str(data / "findings.csv"), "--splits", str(data / "splits.json"), "--freeze_encoder", "true"]
    return _finetune("cls", runs, name, [*args, "--seed", str(seed)])


def _row(name: str, seg: dict, cls: dict) -> dict:
    test = seg.get("test", {})
    macro = cls.get("test", {}).get("macro", {}).get("auroc", {})
    return {
        "init": name,
        "dice_mean": test.get("dice_mean", float("nan")),
        "small_lesion_dice": test.get("small_lesion_dice", float("nan")),
        "auroc": macro.get("value", float("nan")),
        "auroc_ci": (macro.get("low", float("nan")), macro.get("high", float("nan"))),
    }


def _print_table(rows: list[dict], runs: Path) -> None:
    print(f"\n{'init':<12}{'seg Dice (mean)':>17}{'small-lesion Dice':>19}{'finding AUROC [95% CI]':>28}")
    for r in rows:
        lo, hi = r["auroc_ci"]
        print(
            f"{r['init']:<12}{r['dice_mean']:>17.3f}{r['small_lesion_dice']:>19.3f}"
            f"{r['auroc']:>12.3f} [{lo:.3f}, {hi:.3f}]"
        )
    print("\nfigures:")
    pngs = [runs / "pretrain" / "loss_curves.png", *sorted(runs.glob("seg-*/*.png")), *sorted(runs.glob("cls-*/*.png"))]
    for png in pngs:
        print(f"  {png}")
