"""``t3d demo``: the main job on embedded default data, end to end on a laptop CPU in about ten minutes.

synthetic CT + reports -> preprocessing cache -> pre-training (``configs/quickstart.yaml``, its default method) ->
segmentation fine-tuning and the frozen-encoder probes (finding probe, lesion probe; ``t3d.evaluate.compare``) from
the pre-trained encoder and from random initialisation -> a table of both with the paired difference and its
95 % CI, and one line that says whether pre-training helped at this size (only where a CI excludes 0).
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
from t3d.data.cache import write_json_atomic
from t3d.data.preprocess import preprocess_manifest
from t3d.data.synthetic import generate_dataset
from t3d.data.synthetic.command import format_summary
from t3d.evaluate.compare import SMALL_MM as SMALL
from t3d.evaluate.compare import compare_probes, paired_case_diff, verdict
from t3d.finetune.config import SegConfig
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
    """Run every stage; return ``{"method", "pretrain": summary, "rows": {metric: {"pretrained", "random", "diff"}},
    "verdict", "probes"}`` (also in ``OUT/table.json``, with the final logged losses in place of the summary)."""
    out = Path(out)
    data, cache, runs = out / "data", out / "cache", out / "runs"
    t0 = time.perf_counter()
    print(f"[1/5] synthetic CT + reports -> {data}")
    synth = generate_dataset(data, num_studies, seed, preset=preset, workers=2, progress=True)
    print("      " + format_summary(synth).replace("\n", "\n      "))

    overrides = [
        "--data.manifest", str(data / "pretrain.jsonl"),
        "--data.cache", str(cache),
        "--data.split_file", str(data / "splits.json"),  # the cache holds every study; pre-training sees its split
        "--train.out", str(runs / "pretrain"),
        "--seed", str(seed),
    ]  # fmt: skip
    if steps is not None:
        overrides += ["--train.steps", str(steps)]
    cfg = load_config(PretrainConfig, config, overrides)

    print(f"[2/5] preprocessing every study with its label map (pre-training split + probe studies) -> {cache}")
    pre = preprocess_manifest(data / "reports.jsonl", cache, cfg.preprocess, workers=2)
    print(f"      {pre['processed']} processed, {pre['skipped']} unchanged, {pre['quarantined']} quarantined")

    model = f"{cfg.model.encoder}/{cfg.model.preset}"
    print(f"[3/5] pre-training '{cfg.method}' ({model}, crops {list(cfg.crops.size)}) -> {runs / 'pretrain'}")
    summary = run_pretrain(cfg, resume=True)
    final = summary["final"]
    print("      final losses: " + "  ".join(f"{k}={final[k]:.4f}" for k in summary["terms"] if k in final))
    print(f"      chance level of the contrastive terms: log B = {math.log(cfg.train.batch_size):.3f}")

    print("[4/5] segmentation fine-tuning: pre-trained vs random initialisation")
    seg = {name: _segment(data, runs, name, finetune_steps, seed) for name in ("pretrained", "random")}
    print("[5/5] frozen-encoder probes (finding probe per study, lesion probe per crop): pre-trained vs random")
    probes = compare_probes(runs / "pretrain", cfg, cache, data, seed=seed)
    cases = [seg[name].get("test", {}).get("cases", []) for name in ("pretrained", "random")]
    rows = {
        "finding AUROC (study probe)": probes["study_probe_auroc"],
        f"lesion AUROC < {SMALL:g} mm": probes["lesion_probe_auroc_small"],
        "lesion AUROC (all sizes)": probes["lesion_probe_auroc_all"],
        "seg Dice (mean per case)": paired_case_diff(*cases, "dice", seed=seed),
        "small-lesion Dice": paired_case_diff(*cases, "small_lesion_dice", seed=seed),
    }
    line = verdict({name: row["diff"] for name, row in rows.items()})
    _print_table(rows, probes["n_studies"], line, runs)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s.")
    print("These tiny CPU numbers demonstrate the pipeline, not the method's strength: the transfer benchmark")
    print("(benchmarks/transfer.py) measures that, with several seeds and baselines.")
    result = {"method": cfg.method, "pretrain": summary["final"], "rows": rows, "verdict": line, "probes": probes}
    write_json_atomic(out / "table.json", result)
    print(f"table: {out / 'table.json'}")
    return {**result, "pretrain": summary}


def _finetune(task: str, runs: Path, name: str, args: list[str]) -> dict:
    """Run (or read back) one fine-tuning run; ``name``: ``pretrained`` (weights) or ``random`` (same architecture)."""
    out = runs / f"{task}-{name}"
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    init = ["--init" if name == "pretrained" else "--arch_from", str(runs / "pretrain")]
    common = ["--out", str(out), "--cache", str(runs / f"{task}-cache"), "--workers", "1", *init]
    return run_seg(load_config(SegConfig, None, [*args, *common]))


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


def _cell(c: dict) -> str:
    if not math.isfinite(c.get("value", math.nan)):
        return "n/a"
    lo, hi = c.get("low", math.nan), c.get("high", math.nan)
    return f"{c['value']:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else f"{c['value']:.3f}"


def _print_table(rows: dict[str, dict], n_studies: dict, line: str, runs: Path) -> None:
    """Pre-trained, random and their paired difference per metric, each with its 95 % bootstrap CI."""
    split = ", ".join(f"{n} {k}" for k, n in n_studies.items())
    print(f"\nfrozen-encoder probes on {split} studies; segmentation fine-tuned, scored on the test studies")
    print(f"{'metric':<30}{'pre-trained [95% CI]':>26}{'random [95% CI]':>26}{'difference [95% CI]':>28}")
    for name, r in rows.items():
        print(f"{name:<30}{_cell(r['pretrained']):>26}{_cell(r['random']):>26}{_cell(r['diff']):>28}")
    print(line)
    print("\nfigures:")
    pngs = [runs / "pretrain" / "loss_curves.png", *sorted(runs.glob("seg-*/*.png"))]
    for png in pngs:
        print(f"  {png}")
