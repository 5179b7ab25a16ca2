"""Cost of one pre-training step: ``t3d-crops`` vs ``vssl`` vs ``clip`` side by side, MFU, and crops vs a whole volume.

``t3d-crops`` is ``t3d``'s objective with the study embedding taken from the crop sites: the crop-view work every
``t3d`` step does. What the tile grid of ``t3d`` adds on top (per tile, and its memory) is
``benchmarks/pretrain_step_tiles.py``'s subject.

    python benchmarks/pretrain_step.py --json benchmarks/results/pretrain_step_cpu.json
    python benchmarks/pretrain_step.py --device cuda --encoder swinvit --preset base --batch 8 --sites 2
    python benchmarks/pretrain_step.py --device cuda --gpu-recipe --recipe-steps 20   # configs/gpu_ctrate.yaml

Every step is the engine's own: ``PretrainModel`` + ``PretrainObjective`` + ``build_optimizer`` (AdamW) +
``build_scheduler`` driven by ``t3d.pretrain.engine.train_step`` (forward, loss, backward, clip, step), with the
engine's autocast rule (``train.precision: auto`` = bf16 on CUDA, fp32 on CPU). Inputs are synthetic and already
in memory (data loading is ``benchmarks/crops.py``'s subject): random crops (B, K, 2, C, D, H, W) or, for
``clip``, whole volumes (B, C, *clip.grid), and random unit-norm frozen report features (B, Et) standing in for
the cached text features (training never runs the text encoder).

(a) Throughput: one warm-up step per method, then ``--rounds`` rounds of t3d, vssl, clip, t3d, ... (so load from
    other processes hits every method alike); medians of the rounds. ``clip`` reports volumes/s and
    crops-equivalent/s = volumes/s x voxels(clip.grid) / voxels(crop).
(b) MFU: FLOPs of forward + backward counted by ``torch.utils.flop_counter.FlopCounterMode`` (conv incl.
    transposed, mm/addmm/bmm, attention; norms and elementwise ops are not counted, as usual for MFU) over one
    step — the first warm-up step, so it costs nothing extra. With gradient checkpointing on, the count runs with
    checkpointing off on one study and is scaled by B: *model* FLOPs, recomputation excluded (PaLM's MFU).
    Peak: best of several large ``torch.mm`` in the same process (fp32; also bf16 where autocast uses it),
    measured before and after the rounds. MFU = counted FLOPs / median step time / peak.
(c) Memory: the peak a step adds on top of what is live right before it (weights, optimiser state, inputs).
    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the kernel's RSS high-water mark, reset
    before each step (``/proc/self/clear_refs`` = 5) after ``gc.collect()`` + ``malloc_trim(0)``, minus RSS right
    before it: exact up to allocator slack (glibc mmaps blocks above 32 MiB and unmaps them on free) and free of
    cost, so the table's column comes from the timed steps themselves (steady state). Crops vs whole volume uses
    one protocol for both sides: the *first* step of a freshly built model (AdamW state included), t3d-crops on the
    B*K*2 crops vs the ``clip`` objective (encoder + pooled head + align) on one whole ``--volume`` at crop spacing,
    sides padded up to multiples of 32. On CPU each runs in a child process whose additional address space is
    capped at ``--mem-limit-gb`` (RLIMIT_AS): a volume that does not fit reads "> cap" and its ratio is a lower
    bound; a child killed by the kernel claims no number. On CUDA both run in-process ("> free device memory").
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain_step_probes import MemoryProbe, count_flops, matmul_peak, proc_status
from pretrain_step_setup import Step, build_step
from provenance import git_revision
from t3d.config import METHODS, PretrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CPU_DEFAULTS = {"encoder": "resnet", "preset": "tiny", "crop": [96], "batch": 2, "sites": 1, "precision": "auto"}
CHILD_TAG = "T3D_CHILD_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--methods", nargs="+", default=["t3d-crops", "vssl", "clip"], choices=METHODS)
    p.add_argument("--encoder", choices=("resnet", "swinvit"), help="default resnet (recipe: its own)")
    p.add_argument("--preset", help="encoder preset, default tiny (recipe: its own)")
    p.add_argument("--crop", type=int, nargs="+", help="crop size: one side or three (default 96)")
    p.add_argument("--batch", type=int, help="B studies per step (default 2)")
    p.add_argument("--sites", type=int, help="K crop sites per study (default 1); each gives 2 views")
    p.add_argument("--grid", type=int, nargs=3, help="clip's whole-volume grid (default clip.grid)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), help="default auto (as the engine)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--text-dim", type=int, default=384, help="Et of the frozen report features (MiniLM: 384)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per method (the first one counts FLOPs)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--steps", type=int, default=1, help="steps per method per round")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (cpu 2048, cuda 8192)")
    p.add_argument("--volume", type=int, nargs=3, default=[480, 480, 240], help="whole volume (voxels) for (c)")
    p.add_argument("--mem-limit-gb", type=float, default=16.0, help="cap of each (c) child's extra memory")
    p.add_argument("--child-timeout", type=float, default=1800.0, help="seconds for each (c) child")
    p.add_argument("--skip-volume", action="store_true", help="skip (c)'s whole-volume step")
    p.add_argument("--gpu-recipe", action="store_true", help="time the recipe's method on the recipe config")
    p.add_argument("--recipe", default=str(REPO / "configs" / "gpu_ctrate.yaml"))
    p.add_argument("--recipe-steps", type=int, default=20, help="timed steps in --gpu-recipe mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here as JSON")
    p.add_argument("--child", choices=("crops", "volume"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- set-up


def build_config(args: argparse.Namespace, method: str | None = None, **extra) -> PretrainConfig:
    """CPU defaults (or the recipe file) <- explicit flags <- ``extra`` dotted overrides, via ``load_config``."""
    chosen = {k: getattr(args, k) for k in CPU_DEFAULTS}
    if not args.gpu_recipe:
        chosen = {k: CPU_DEFAULTS[k] if v is None else v for k, v in chosen.items()}
    crop = chosen["crop"]
    values = {
        "method": method,
        "model.encoder": chosen["encoder"],
        "model.preset": chosen["preset"],
        "model.grad_checkpointing": args.grad_checkpointing,
        "crops.size": None if crop is None else (crop * 3 if len(crop) == 1 else crop),
        "crops.sites": chosen["sites"],
        "train.batch_size": chosen["batch"],
        "train.precision": chosen["precision"],
        "clip.grid": args.grid,
        **extra,
    }
    overrides = [f"--{key}={json.dumps(value)}" for key, value in values.items() if value is not None]
    return load_config(PretrainConfig, args.recipe if args.gpu_recipe else None, overrides)


# ----------------------------------------------------------------------------------------------- measurements


def interleaved(steps: dict[str, Step], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Warm-up (FLOP count first), then rounds of every method in turn; times, CPU seconds and memory per step."""
    stats = {
        name: {"flops": count_flops(step), "wall": [], "cpu": [], "mem": [], "mem_total": []}
        for name, step in steps.items()
    }
    for step in steps.values():
        for _ in range(args.warmup - 1):
            step.run()
    probe = MemoryProbe(device)
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                probe.start()
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                step.run()
                wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
                stats[name]["wall"].append(wall)
                stats[name]["cpu"].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                stats[name]["mem"].append(probe.stop())
                stats[name]["mem_total"].append(probe.peak)
    for s in stats.values():
        s["memory_method"] = probe.method
    return stats


# ----------------------------------------------------------------------------------------------- crops vs volume


def fresh_config(args: argparse.Namespace, which: str) -> PretrainConfig:
    """``crops``: the t3d step of (a). ``volume``: the ``clip`` objective (encoder + pooled head + align) on one
    whole ``--volume`` at crop spacing, sides padded up to multiples of 32 voxels as the encoders need."""
    if which == "crops":
        return build_config(args, "t3d-crops")
    padded = [32 * math.ceil(s / 32) for s in args.volume]
    return build_config(args, "clip", **{"clip.grid": padded, "train.batch_size": 1})


def run_fresh_step(args: argparse.Namespace, device: torch.device, which: str, cap_bytes: int | None) -> dict:
    """The first step of a freshly built model (AdamW state and one-off caches included, like the other side);
    status ``ok`` with its memory, ``limit`` when an allocation failed, ``error`` for any other failure."""
    cfg = fresh_config(args, which)
    step = build_step(cfg, device, args.text_dim, args.seed)
    torch.mm(torch.ones(64, 64), torch.ones(64, 64))  # start the thread pool before any address-space cap
    probe = MemoryProbe(device)
    probe.start()
    free = None
    if device.type == "cuda":  # what the step could have used: free device memory + the allocator's idle cache
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - probe.before
    if cap_bytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = proc_status("VmSize") + cap_bytes
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    shape = list(cfg.clip.grid if which == "volume" else cfg.crops.size)
    t0 = time.perf_counter()
    try:
        step.run()
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(err, MemoryError | torch.OutOfMemoryError) and "allocate" not in str(err).lower():
            return {"status": "error", "shape": shape, "error": str(err)[:400]}  # e.g. a kernel's size limit
        bound = cap_bytes if cap_bytes is not None else free
        return {"status": "limit", "shape": shape, "lower_bound_mib": bound / 2**20, "error": str(err)[:200]}
    return {"status": "ok", "shape": shape, "mib": probe.stop() / 2**20, "seconds": time.perf_counter() - t0}


def fresh_step(args: argparse.Namespace, argv: list[str], device: torch.device, which: str) -> dict:
    """CUDA: in this process. CPU: in a child process (the RSS high water is per process) whose additional address
    space is capped at ``--mem-limit-gb``; a child killed by a signal (the kernel's OOM killer) claims no number."""
    if device.type == "cuda":
        result = run_fresh_step(args, device, which, None)
        gc.collect()
        torch.cuda.empty_cache()
        return {**result, "limit": "free device memory"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", which]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "limit": f"{args.child_timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1][len(CHILD_TAG) :]), "limit": f"{args.mem_limit_gb:g} GiB"}
    return {"status": "failed", "returncode": proc.returncode, "stderr": proc.stderr[-400:]}


def memory_comparison(args: argparse.Namespace, argv: list[str], device: torch.device, crops: int) -> dict:
    """(c): one t3d step on B*K*2 crops vs one whole-volume step, same protocol; ratio or its lower bound."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    crop, vol = fresh_step(args, argv, device, "crops"), fresh_step(args, argv, device, "volume")
    out = {"crops": crops, "crop_step": crop, "volume": args.volume, "volume_step": vol}
    if crop["status"] == "ok":
        out["voxel_ratio"] = math.prod(args.volume) / (crops * math.prod(crop["shape"]))
        if vol["status"] == "ok":
            out["ratio"] = vol["mib"] / crop["mib"]
        elif vol["status"] == "limit" and vol["lower_bound_mib"]:
            out["ratio_lower_bound"] = vol["lower_bound_mib"] / crop["mib"]
    return out


# ----------------------------------------------------------------------------------------------- main


def summarise(stats: dict[str, dict], steps: dict[str, Step], peaks: dict[str, float]) -> dict[str, dict]:
    out = {}
    for name, s in stats.items():
        step, wall = steps[name], statistics.median(s["wall"])
        cfg = step.ctx.model.cfg
        row = {
            "step_s": wall,
            "step_s_all": s["wall"],
            "cores_used": statistics.median(c / w for c, w in zip(s["cpu"], s["wall"])),
            "studies_per_step": step.studies,
            "crops_per_step": step.crops,
            "gflop_per_step": s["flops"] / 1e9,
            "achieved_gflop_s": s["flops"] / wall / 1e9,
            "peak_mem_mib": max(s["mem"]) / 2**20,
            "peak_total_mib": max(s["mem_total"]) / 2**20,
            "memory_method": s["memory_method"],
        }
        row.update({f"mfu_{k}": s["flops"] / wall / v for k, v in peaks.items()})
        if step.crops:
            row["crops_per_s"] = step.crops / wall
        else:
            row["volumes_per_s"] = step.studies / wall
            row["crops_equiv_per_s"] = step.voxels / math.prod(cfg.crops.size) / wall
        out[name] = row
    return out


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def measure_peaks(device: torch.device, n: int, autocast: torch.dtype | None) -> dict[str, float]:
    dtypes = {"fp32": torch.float32, **({"bf16": autocast} if autocast is torch.bfloat16 else {})}
    dtypes.update({"fp16": autocast} if autocast is torch.float16 else {})
    return {name: matmul_peak(device, dtype, n) for name, dtype in dtypes.items()}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # (c) on CPU: one fresh step in this child process, result as one tagged JSON line
        result = run_fresh_step(args, torch.device("cpu"), args.child, int(args.mem_limit_gb * 2**30))
        print(CHILD_TAG + json.dumps(result), flush=True)
        return result
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; run on a GPU machine or use --device cpu")
    if args.gpu_recipe:  # the recipe's own method, --recipe-steps timed steps in a row
        args.methods, args.rounds, args.steps = [build_config(args).method], 1, args.recipe_steps
    results = side_by_side(args, argv, device)
    rows = results["methods"]
    if "t3d-crops" in rows and not args.gpu_recipe and not args.skip_volume:
        results["memory"] = memory_comparison(args, argv, device, rows["t3d-crops"]["crops_per_step"])
    print_table(results)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The tiled-path figures of pretrain_step_tiles.py share the file: keep them (they carry their own command).
        old = json.loads(path.read_text()) if path.is_file() else {}
        kept = {k: v for k, v in old.items() if k.startswith(("tiled", "whole_volume_vs_tiled"))}
        results["revision"] = git_revision()  # the side-by-side figures; tiled ones carry tiled.revision
        path.write_text(json.dumps({**results, **kept}, indent=1) + "\n")
    return results


def side_by_side(args: argparse.Namespace, argv: list[str], device: torch.device) -> dict:
    """(a) and (b): every method's step timed in interleaved rounds, FLOPs counted, matmul peak measured."""
    steps = {m: build_step(build_config(args, m), device, args.text_dim, args.seed) for m in args.methods}
    first = next(iter(steps.values())).ctx
    n = args.peak_size or (8192 if device.type == "cuda" else 2048)
    before = measure_peaks(device, n, first.autocast_dtype)
    stats = interleaved(steps, args, device)
    after = measure_peaks(device, n, first.autocast_dtype)
    peaks = {k: max(v, after[k]) for k, v in before.items()}
    cfg = first.model.cfg
    results = {
        "command": " ".join(["python benchmarks/pretrain_step.py", *argv]),
        "mode": f"gpu recipe {args.recipe}" if args.gpu_recipe else "side by side",
        "device": _device_name(device),
        "torch": torch.__version__,
        "setup": {
            "encoder": f"{cfg.model.encoder}/{cfg.model.preset}",
            "crop": list(cfg.crops.size),
            "batch": cfg.train.batch_size,
            "sites": cfg.crops.sites,
            "clip_grid": list(cfg.clip.grid),
            "precision": cfg.train.precision,
            "autocast": str(first.autocast_dtype),
            "grad_checkpointing": cfg.model.grad_checkpointing,
            "text_dim": args.text_dim,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
        },
        "matmul_peak_gflop_s": {k: v / 1e9 for k, v in peaks.items()},
        "matmul_peak_size": n,
        "methods": summarise(stats, steps, peaks),
    }
    rows = results["methods"]
    if "t3d-crops" in rows and "vssl" in rows:
        results["t3d_crops_over_vssl_crops_per_s"] = rows["t3d-crops"]["crops_per_s"] / rows["vssl"]["crops_per_s"]
        # Fastest step of each: what the two cost when other processes leave the cores alone (a cross-check).
        results["t3d_crops_over_vssl_fastest"] = min(rows["vssl"]["step_s_all"]) / min(rows["t3d-crops"]["step_s_all"])
    return results


def print_table(r: dict) -> None:
    s = r["setup"]
    print(
        f"\n{r['device']}, {s['encoder']}, crop {'x'.join(map(str, s['crop']))}, B={s['batch']} x K={s['sites']} x 2 "
        f"views, clip grid {'x'.join(map(str, s['clip_grid']))}, autocast {s['autocast']}, {r['mode']}"
    )
    peak_names = list(r["matmul_peak_gflop_s"])
    head = f"{'method':<22}{'step s':>9}{'crops/s':>10}{'vol/s':>8}{'crops-eq/s':>12}{'GFLOP':>9}"
    print(head + "".join(f"{'MFU ' + k:>10}" for k in peak_names) + f"{'mem MiB':>10}{'cores':>7}")
    for name, m in r["methods"].items():
        crops = f"{m['crops_per_s']:>10.2f}{'-':>8}{'-':>12}" if "crops_per_s" in m else None
        crops = crops or f"{'-':>10}{m['volumes_per_s']:>8.2f}{m['crops_equiv_per_s']:>12.2f}"
        mfu = "".join(f"{100 * m['mfu_' + k]:>9.1f}%" for k in peak_names)
        print(f"{name:<22}{m['step_s']:>9.2f}{crops}{m['gflop_per_step']:>9.1f}{mfu}{m['peak_mem_mib']:>10.0f}", end="")
        print(f"{m['cores_used']:>7.2f}")
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in r["matmul_peak_gflop_s"].items())
    print(f"matmul peak ({r['matmul_peak_size']}^2, best of 5, before/after): {peaks}")
    if "t3d_crops_over_vssl_crops_per_s" in r:
        ratio, fastest = r["t3d_crops_over_vssl_crops_per_s"], r["t3d_crops_over_vssl_fastest"]
        print(f"t3d-crops / vssl crops/s = {ratio:.3f} (medians; fastest steps: {fastest:.3f})  (target >= 0.9)")
    mem = r.get("memory")
    if mem:
        crop, vol = mem["crop_step"], mem["volume_step"]
        shape = "x".join(map(str, vol.get("shape", mem["volume"])))
        line = f"(c) fresh first step: t3d-crops on {mem['crops']} crops "
        line += f"{crop['mib']:.0f} MiB" if crop["status"] == "ok" else crop["status"]
        line += f"; whole volume {shape} (1 study, clip objective) "
        if vol["status"] == "ok":
            line += f"{vol['mib']:.0f} MiB"
        elif vol["status"] == "limit":
            line += f"> {vol['lower_bound_mib']:.0f} MiB ({vol['limit']} cap)"
        else:
            line += f"{vol['status']} (no number claimed)"
        if "ratio" in mem:
            line += f" -> ratio {mem['ratio']:.2f}"
        elif "ratio_lower_bound" in mem:
            line += f" -> ratio >= {mem['ratio_lower_bound']:.1f}"
        print(line + (f"  (target >= 10; {mem['voxel_ratio']:.1f}x the voxels)" if "voxel_ratio" in mem else ""))


if __name__ == "__main__":
    main()
