"""``t3d demo``: the main job on embedded default data, end to end on a laptop CPU.

synthetic CT + reports -> preprocessing cache -> pre-training (quickstart config). Every stage is the real command;
re-running the demo reuses finished stages (the cache is idempotent, the pre-training run resumes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from t3d.config import PretrainConfig, load_config

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on a small synthetic dataset (CPU, minutes)")
    p.add_argument("--out", default="demo_out", help="folder for the demo's data, cache and runs")
    p.add_argument("--num-studies", type=int, default=48, help="synthetic studies to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=str(QUICKSTART), help="pre-training config (default: configs/quickstart.yaml)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps of the config")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from t3d.data.preprocess import preprocess_manifest
    from t3d.data.synthetic import generate_dataset
    from t3d.pretrain.main import run_pretrain

    out = Path(args.out)
    data, cache, run = out / "data", out / "cache", out / "runs" / "pretrain"
    t0 = time.perf_counter()
    print(f"[1/3] synthetic CT + reports -> {data}")
    synth = generate_dataset(data, args.num_studies, args.seed, preset="small", workers=2)
    print(f"      {json.dumps(_short(synth))}")

    overrides = [
        "--data.manifest", str(data / "pretrain.jsonl"),
        "--data.cache", str(cache),
        "--data.split_file", str(data / "splits.json"),
        "--train.out", str(run),
    ]  # fmt: skip
    if args.steps is not None:
        overrides += ["--train.steps", str(args.steps)]
    cfg = load_config(PretrainConfig, args.config, overrides)

    print(f"[2/3] preprocessing -> {cache}")
    pre = preprocess_manifest(data / "pretrain.jsonl", cache, cfg.preprocess, workers=2)
    print(f"      {json.dumps(_short(pre))}")

    print(
        f"[3/3] pre-training '{cfg.method}' ({cfg.model.encoder}/{cfg.model.preset}, crops {cfg.crops.size}) -> {run}"
    )
    summary = run_pretrain(cfg, resume=True)
    terms = "  ".join(f"{k}={summary['final'][k]:.4f}" for k in summary["terms"] if k in summary["final"])
    print(f"      final losses: {terms}")
    print(f"      loss curves: {run / 'loss_curves.png'}   TensorBoard: tensorboard --logdir {run}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s. These tiny CPU numbers demonstrate the pipeline,")
    print("not the method's strength; the transfer benchmark measures that.")
    return 0


def _short(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
