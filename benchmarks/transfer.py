"""Transfer benchmark (docs/method.md §7): does text-informed pre-training beat visual SSL and CLIP-style pre-training?

    python benchmarks/transfer.py --config benchmarks/transfer_cpu.yaml            # the 2-hour CPU configuration
    python benchmarks/transfer.py --config benchmarks/transfer_cpu.yaml --smoke    # 2 methods x 1 seed, minutes
    python benchmarks/transfer.py --config benchmarks/transfer_cpu.yaml --report-only   # tables from what is done
    python benchmarks/transfer.py --config ... --methods t3d,vssl --seg.steps 50     # dotted overrides as in t3d

For every method of docs/method.md §5 (``random`` = no pre-training) and seed: pre-train on the unlabeled (volume,
report) pairs of the pretrain split; fine-tune segmentation (organs + lesions) and a linear probe for findings at each
label fraction of the labelled finetune split; test on the held-out test split; for methods with a joint image-text
space also zero-shot classification and image-report retrieval; for ``diagnostic_methods`` the "does the text matter"
control (restoration error with the true vs a shuffled report). Everything runs through the package's own APIs.

Stages are cached: each writes ``result.json`` into its folder under ``benchmarks/work/<name>/`` (``data/``,
``<method>/seed<k>/pretrain|seg_f<fraction>|probe_f<fraction>|zeroshot|retrieval|textdiag``) and is skipped when
that file exists; a killed pre-training resumes from its latest checkpoint, a killed fine-tuning restarts. A stage
that fails writes ``error.txt``, the stages that need it are skipped, and the rest go on. The report
(``<output>.md``, ``.json``, ``.png``, ``_align.png``) is rewritten after every seed round and at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from provenance import git_revision
from t3d.config import ConfigError, to_dict
from t3d.data.cache import write_json_atomic
from t3d.losses import method_spec
from transfer_config import TransferConfig, load_transfer_config, run_stages
from transfer_controls import SEG_CONTROL
from transfer_plan import Plan

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- bookkeeping


def fingerprint(cfg: TransferConfig) -> dict[str, Any]:
    """The settings that change what a stage computes (not which stages run): a work folder keeps one of them."""
    pre = ROOT / cfg.pretrain_config
    content = hashlib.sha256(pre.read_bytes()).hexdigest()[:16] if pre.is_file() else cfg.pretrain_config
    values = to_dict(cfg)
    keep = ("data", "pretrain", "method_pretrain", "seg", "seg_control", "cls", "cls_finetune", "diagnostic_repeats")
    # The probe studies are shared by every probe stage; the probes' other settings are checked per stage (Stage.done).
    return {"pretrain_config": content, **{k: values[k] for k in keep}, "probe_data": values["probes"]["data"]}


def check_work_folder(work: Path, cfg: TransferConfig) -> None:
    """Refuse to mix results of different settings in one work folder (stages are cached by folder only)."""
    path = work / "fingerprint.json"
    mine = json.loads(json.dumps(fingerprint(cfg)))
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(
                f"{work} holds results of other settings (differences in: {', '.join(diff)}); set --name to use "
                "another work folder, or delete that folder to start over"
            )
    write_json_atomic(path, mine)


def command_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/transfer.py", *argv])


# ----------------------------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "transfer_cpu.yaml"), help="benchmark YAML")
    p.add_argument("--smoke", action="store_true", help="apply the config's smoke section (minutes, code check)")
    p.add_argument("--methods", help="comma-separated subset of the configured methods")
    p.add_argument("--report-only", action="store_true", help="render the report from finished stages; run nothing")
    p.add_argument("--plan", action="store_true", help="list the stages and whether each is done; run nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="INFO logging of the package")
    p.add_argument(
        "--jobs", type=int, default=1, help="run the methods in N worker processes (set threads: 1 in the config)"
    )
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # worker of --jobs: parent reports
    return p.parse_known_args(argv)


def narrow(cfg: TransferConfig, methods: list[str]) -> None:
    """Keep only ``methods`` in the method lists (``--methods``; a worker of ``--jobs``). The settings that decide what
    a stage computes stay whole, so a worker's fingerprint is the full configuration's."""
    keep = set(methods)
    cfg.controls = [m for m in cfg.controls if m in keep]
    cfg.main_methods = [m for m in cfg.main_methods if m in keep]
    cfg.ablations = [m for m in cfg.ablations if m in keep]


def method_cost(method: str, n_seeds: int) -> float:
    """Rough relative cost of a method's stages, to balance ``--jobs`` workers: the restoration decoder dominates
    pre-training (it restores one view per site with contrastive terms on, both views without: vssl-restore), and
    every pre-trained encoder adds the same fine-tuning work."""
    if method == "random":
        return 1.0 * n_seeds
    if method == SEG_CONTROL:
        return 2.5 * n_seeds  # its training is a segmentation run of seg_control.steps (1500: 3 x a 500-step one)
    spec = method_spec(method)
    if spec.findings:
        return 1.5 * n_seeds
    if not spec.restore:
        return 1.5 * n_seeds
    return (3.0 if spec.contrastive else 5.0) * n_seeds


def partition(cfg: TransferConfig, jobs: int) -> list[list[str]]:
    """Methods split into ``jobs`` groups of similar cost (largest first onto the least loaded group)."""
    main = [*cfg.controls, *cfg.main_methods]
    methods = [(m, len(cfg.seeds)) for m in main] + [(m, len(cfg.ablation_seeds)) for m in cfg.ablations]
    groups: list[list[str]] = [[] for _ in range(jobs)]
    load = [0.0] * jobs
    for method, n in sorted(methods, key=lambda mn: -method_cost(*mn)):
        i = load.index(min(load))
        groups[i].append(method)
        load[i] += method_cost(method, n)
    return [g for g in groups if g]


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def run_jobs(plan: Plan, cfg: TransferConfig, argv: list[str], jobs: int) -> dict[str, str]:
    """Data stages here, then one worker process per method group (logs under ``work/jobs``); a progress bar counts
    the finished stages of all workers. Returns the workers' stage status as read back from the work folder."""
    stages = plan.stages()
    shared = [s for s in stages if s.meta.get("kind") in ("data", "prepare", "probe_data")]
    status = run_stages(shared)
    if any(v == "failed" for v in status.values()):
        return status
    tqdm.write("preprocessing the shared downstream caches before the workers start")
    plan.warm_caches()
    base = strip_option(argv, "--jobs")
    logs = plan.work / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, group in enumerate(partition(cfg, jobs)):
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--methods", ",".join(group), "--no-report"]
        log = (logs / f"job{i}.log").open("w")
        tqdm.write(f"worker {i}: {', '.join(group)} (log: {logs / f'job{i}.log'})")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    work = [s for s in stages if s.cached and s not in shared]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` of the parent stops the workers too
    try:
        with tqdm(total=len(work), desc="transfer", unit="stage", dynamic_ncols=True) as bar:
            while any(p.poll() is None for p, _ in procs):
                bar.update(sum(s.done() for s in work) - bar.n)
                time.sleep(10)
            bar.update(sum(s.done() for s in work) - bar.n)
    except BaseException:  # Ctrl-C / SIGTERM of the parent: stop the workers too (a rerun resumes every stage)
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait()
        raise
    finally:
        for _, log in procs:
            log.close()
    for s in work:
        status[s.name] = "done" if s.done() else ("failed" if (s.out / "error.txt").is_file() else "skipped")
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_transfer_config(args.config, args.smoke, overrides)
    if args.methods:
        narrow(cfg, args.methods.split(","))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = Plan(cfg, ROOT / cfg.work / cfg.name, command_line(argv), git_revision())
    stages = plan.stages()
    if args.plan:
        for s in stages:
            print(f"{'done ' if s.done() else 'to do'}  {s.name}")
        return 0
    if args.report_only:
        plan.report()
        return 0
    check_work_folder(plan.work, cfg)
    if args.no_report:
        stages = [s for s in stages if s.cached]
    else:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        run = {"command": plan.command, "started": started, "git_revision": plan.revision}
        write_json_atomic(plan.work / "run.json", run)
    if args.jobs > 1:
        status = run_jobs(plan, cfg, argv, args.jobs)
        plan.report()
    else:
        status = run_stages(stages)
    failed = sorted(n for n, s in status.items() if s == "failed")
    print(
        f"transfer benchmark: {sum(s == 'done' for s in status.values())} stages run, "
        f"{sum(s == 'cached' for s in status.values())} cached, {len(failed)} failed -> {plan.output}.md"
    )
    for name in failed:
        print(f"  failed: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
