"""Frozen-encoder probes of any encoders, paired against the ``random`` control on a benchmark's probe studies.

    .venv/bin/python benchmarks/encoder_probes.py --config benchmarks/transfer_gate_smoke.yaml \
        --encoder dense=runs/dense_seg [--encoder NAME=RUN ...] --output benchmarks/results/encoder_probes.json

An encoder is a ``t3d pretrain`` run or a ``t3d finetune seg`` run. The second kind gives the probes a positive
control that does not depend on any pre-training method: an encoder trained with dense labels (say, segmentation of
the pre-training split's organs and lesions) holds whatever its segmentation Dice says it holds, so a probe that
cannot tell it from ``random`` is not sensitive to that content, and one that can, is.

Uses the configuration's probe studies, split, sites and probe settings exactly as ``benchmarks/transfer.py`` does
(``run_probe_stage``; the benchmark's work folder ``<work>/<name>``, checked against its settings), and writes per
encoder: study-probe macro AUROC and lesion-probe AUROC per size stratum, the paired difference to ``random`` with
its bootstrap interval (the gate's quantity), and for a segmentation run its test Dice per class (``metrics.json``).
The JSON records the git revision and command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from provenance import git_revision
from t3d.data.cache import write_json_atomic
from transfer import check_work_folder
from transfer_config import load_transfer_config, run_stages
from transfer_plan import Plan
from transfer_probes import expand_probe_results, paired, run_probe_stage
from transfer_results import Results

ROOT = Path(__file__).resolve().parents[1]


def parse_encoders(values: list[str]) -> dict[str, Path]:
    """``NAME=RUN`` pairs -> {name: run folder}; names are unique and not ``random`` (the reference)."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--encoder {value!r}: expected NAME=RUN (a t3d pretrain or t3d finetune seg run)")
        if name == "random" or name in out:
            raise SystemExit(f"--encoder {value!r}: the name {name!r} is taken (random is the reference)")
        if not Path(path).exists():
            raise SystemExit(f"--encoder {value!r}: {path} does not exist")
        out[name] = Path(path)
    return out


def seg_summary(run: Path) -> dict | None:
    """Test Dice per class of a ``t3d finetune seg`` run, or None for another kind of run."""
    path = run / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("init", "steps", "n_train", "n_test", "seed")} | {
        "dice_per_class": m["test"]["dice_per_class"],
        "dice_mean": m["test"]["dice_mean"],
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "transfer_gate_smoke.yaml"))
    p.add_argument("--encoder", action="append", default=[], help="NAME=RUN (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "encoder_probes.json"))
    args, overrides = p.parse_known_args(argv)
    encoders = parse_encoders(args.encoder)
    if not encoders:
        raise SystemExit("name at least one --encoder NAME=RUN")
    cfg = load_transfer_config(args.config, False, overrides)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    plan = Plan(cfg, ROOT / cfg.work / cfg.name)
    check_work_folder(plan.work, cfg)
    run_stages([s for s in plan.stages() if s.name in ("data", "prepare", "probe_data")])
    pcfg = plan.pretrain_config("t3d", args.seed)  # architecture, crop size and windows of the random control
    stages, out = [], {}
    for name, run in {"random": None, **encoders}.items():
        # random: the benchmark's own probe stage folder (features cached by encoder fingerprint, so shared safely)
        folder = plan.work / (f"random/seed{args.seed}/probes" if run is None else f"encoder_probes/{name}")
        res = run_probe_stage(run, pcfg, cfg.probes, plan.caches["probe"], plan.probe_findings, folder, args.seed)
        stages.append({"kind": "probes", "method": name, "seed": args.seed, **res})
        out[name] = {
            "run": str(run) if run else None,
            "study_probe_auroc": res["study"]["metrics"]["macro"]["auroc"],
            "study_probe_per_finding": {k: v["auroc"] for k, v in res["study"]["metrics"]["per_class"].items()},
            "lesion_probe_auroc": res["lesion"]["strata"],
            "segmentation": seg_summary(run) if run else None,
        }
        if name == "random":
            out["voxel statistics"] = {"lesion_probe_auroc": res["lesion_voxel_stats"]["strata"]}
    table = Results([*stages, *expand_probe_results(stages, cfg.probes.size_thresholds_mm, cfg.probes.focal_findings)])
    kinds = sorted({kind for kind, *_ in table.by_key if kind.startswith(("study_probe", "lesion_probe_"))})
    for name in encoders:
        out[name]["minus_random"] = {
            kind: paired(table, kind, "auroc", None, name, "random", cfg.n_boot) for kind in kinds
        }
    summary = {
        "revision": git_revision(),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "config": args.config,
        "probe_studies": res["n_studies"],
        "encoders": out,
    }
    write_json_atomic(Path(args.output), json.loads(json.dumps(summary, default=float)))
    print(json.dumps({k: {m: v for m, v in e.items() if m != "study_probe_per_finding"} for k, e in out.items()},
                     indent=1, default=float))  # fmt: skip
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main(sys.argv[1:]))
