"""Memory and compute of the tiled study path (GradCache, ``t3d``) on synthetic inputs.

    python benchmarks/pretrain_step_tiles.py --threads 2 --json benchmarks/results/pretrain_step_cpu.json

Every step is the engine's ``train_step`` on a ``PretrainModel`` + ``PretrainObjective`` + AdamW, as in
``pretrain_step.py``; inputs are random tensors already in memory. Each measurement runs in its own child process
(the CPU's RSS high-water mark is per process; a fresh process also has no allocator history), and memory is the
peak a step adds on top of what is live right before it (``MemoryProbe``: inputs, weights and optimiser state
excluded), so tiles held as input do not count, only what the step builds. Children run with glibc's
``MALLOC_MMAP_THRESHOLD_=65536``: blocks above 64 KiB are mapped and unmapped on free, so RSS follows live memory
instead of heap slack (with the default, re-allocating one tile per chunk leaves ~0.5 MiB of slack per tile).

(d) Peak memory of a ``t3d`` step vs tiles per study (``--tiles``, default 4 8 16 32 64) with a fixed
    ``tiles.chunk``: GradCache keeps one chunk's graph plus the tile features, so the curve should be flat
    (target: max / min <= 1.2). One warm-up step, then ``--rounds`` steps: medians, min and max.
(e) Compute: the same steps' wall time against a ``t3d`` crop step of the same B x K x 2 views. The overhead per
    tile is (tiled step - crop step) / tiles, reported relative to the crop step's time per crop (each tile is
    encoded twice, once without a graph; a crop once with a graph and the restoration decoder).
(f) Whole volume at full resolution vs tiles: the first step of a fresh model on one ``--volume`` with the
    ``clip`` objective (encoder + pooled head + align; ``pretrain_step.py``'s child, under its address-space
    cap) vs the first step of a fresh tiled model whose tiles (``--cover-crop`` voxels, overlap 0.25) cover the same
    volume at the same resolution, L_align only (``ALIGN_ONLY``: no L_view, no decoder; the model still encodes
    one pair of crop views, shrunk to 32^3): the same objective on the same voxels, with and without GradCache.
    Target >= 10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pretrain_step_probes import MemoryProbe
from pretrain_step_setup import Step, build_step
from provenance import git_revision
from t3d.config import PretrainConfig, load_config
from t3d.data.grid import grid_centres
from t3d.losses import MethodSpec

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CHILD_TAG = "T3D_TILES_RESULT "
VOLUME_TAG = "T3D_CHILD_RESULT "  # pretrain_step.py's child protocol
TEXT_DIM = 384
ALIGN_ONLY = MethodSpec("t3d", False, False, "global", False, "none", tiles=True)
"""L_align on the tiled study embedding alone: the tiled counterpart of the ``clip`` objective."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiles", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="tiles per study for (d)")
    p.add_argument("--crop", type=int, default=32, help="crop / tile side in voxels for (d) and (e)")
    p.add_argument("--batch", type=int, default=2, help="studies per step for (d) and (e)")
    p.add_argument("--chunk", type=int, default=4, help="tiles.chunk: tiles per graph in pass 2")
    p.add_argument("--rounds", type=int, default=3, help="timed steps after one warm-up (medians reported)")
    p.add_argument("--volume", type=int, nargs=3, default=[384, 384, 192], help="whole volume (voxels) for (f)")
    p.add_argument("--cover-crop", type=int, default=64, help="tile side covering --volume in (f)")
    p.add_argument("--cover-chunk", type=int, default=1, help="tiles.chunk of the tiled step in (f)")
    p.add_argument("--mem-limit-gb", type=float, default=16.0, help="address-space cap of the whole-volume child")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the children")
    p.add_argument("--json", default=None, help="merge the results into this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config(method: str, crop: int, batch: int, chunk: int, tiles: int) -> PretrainConfig:
    values = {
        "method": method,
        "model.encoder": "resnet",
        "model.preset": "tiny",
        "model.norm": "group",
        "crops.size": [crop] * 3,
        "crops.sites": 1,
        "train.batch_size": batch,
        "train.precision": "fp32",
        "tiles.max_tiles": tiles,
        "tiles.chunk": chunk,
    }
    return load_config(PretrainConfig, None, [f"--{k}={json.dumps(v)}" for k, v in values.items()])


def timed_steps(step: Step, steps: int, warmup: int) -> dict:
    """``warmup`` untimed steps, then ``steps`` steps: wall seconds and added peak MiB of each."""
    probe = MemoryProbe(torch.device("cpu"))
    for _ in range(warmup):
        step.run()
    wall, mem = [], []
    for _ in range(steps):
        probe.start()
        t0 = time.perf_counter()
        step.run()
        wall.append(time.perf_counter() - t0)
        mem.append(probe.stop() / 2**20)
    return {"wall_s": wall, "mib": mem, "memory_method": probe.method}


def run_child(args: argparse.Namespace) -> dict:
    """One measurement in this (child) process: ``tiles:N``, ``crops`` or ``cover``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    kind, _, value = args.child.partition(":")
    if kind == "tiles":
        n = int(value)
        step = build_step(config("t3d", args.crop, args.batch, args.chunk, n), cpu, TEXT_DIM, 0)
        return {"tiles": n, **timed_steps(step, args.rounds, 1)}
    if kind == "crops":
        step = build_step(config("t3d", args.crop, args.batch, args.chunk, 1), cpu, TEXT_DIM, 0)
        return timed_steps(step, args.rounds, 1)
    n = len(cover_centres(args))
    cfg = config("t3d", args.cover_crop, 1, args.cover_chunk, n)
    step = build_step(cfg, cpu, TEXT_DIM, 0, spec=ALIGN_ONLY)
    step.batch["views"] = step.batch["views"][..., :32, :32, :32].contiguous()  # unused by L_align: the smallest
    return {"tiles": n, **timed_steps(step, 1, 0)}  # the first step of a fresh model, as on the volume side


def cover_centres(args: argparse.Namespace) -> np.ndarray:
    """Tiles of ``--cover-crop`` voxels with overlap 0.25 covering the whole ``--volume`` (every voxel body)."""
    size = [args.cover_crop] * 3
    return grid_centres(args.volume, np.empty((0, 3)), size, overlap=0.25, max_crops=10**6)


CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc: map every block above 64 KiB, so that RSS tracks live memory (see the module docstring)."""


def child(args: argparse.Namespace, argv: list[str], which: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", which]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {which} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(lines[-1][len(CHILD_TAG) :])


def whole_volume(args: argparse.Namespace) -> dict:
    """``pretrain_step.py``'s (c) volume child: the clip objective's first step on one padded ``--volume``."""
    cmd = [sys.executable, str(BENCH / "pretrain_step.py"), "--child", "volume", "--volume", *map(str, args.volume)]
    cmd += ["--mem-limit-gb", str(args.mem_limit_gb)] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(VOLUME_TAG)]
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "returncode": proc.returncode, "stderr": proc.stderr[-400:]}
    return json.loads(lines[-1][len(VOLUME_TAG) :])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        result = run_child(args)
        print(CHILD_TAG + json.dumps(result), flush=True)
        return result
    parent = argv  # children only measure and print; --json is written here
    by_tiles = {n: child(args, parent, f"tiles:{n}") for n in args.tiles}
    crops = child(args, parent, "crops")
    cover, volume = child(args, parent, "cover"), whole_volume(args)
    crop_s = statistics.median(crops["wall_s"])
    crops_per_step = args.batch * 2
    peaks = {n: statistics.median(r["mib"]) for n, r in by_tiles.items()}
    tiled = {
        "setup": {
            "encoder": "resnet/tiny (group norm)",
            "tile": [args.crop] * 3,
            "batch": args.batch,
            "sites": 1,
            "chunk": args.chunk,
            "rounds": args.rounds,
            "memory_method": crops["memory_method"],
        },
        "peak_mib_by_tiles": {n: spread(r["mib"]) for n, r in by_tiles.items()},
        "step_s_by_tiles": {n: spread(r["wall_s"]) for n, r in by_tiles.items()},
        "crop_step_s": spread(crops["wall_s"]),
        "crop_step_peak_mib": spread(crops["mib"]),
        "flatness_max_over_min": max(peaks.values()) / min(peaks.values()),
        "overhead_per_tile_over_crop": {
            n: (statistics.median(r["wall_s"]) - crop_s) / (n * args.batch) / (crop_s / crops_per_step)
            for n, r in by_tiles.items()
        },
        "cover": {
            "chunk": args.cover_chunk,
            "volume": args.volume,
            "tile": [args.cover_crop] * 3,
            "tiles": cover["tiles"],
            "tiled_first_step_mib": cover["mib"][0],
            "tiled_first_step_s": cover["wall_s"][0],
            "whole_volume_step": volume,
        },
    }
    results = {
        "tiled_peak_mib_by_tiles": {str(n): v for n, v in peaks.items()},
        "tiled": tiled,
    }
    if volume.get("status") == "ok":
        results["whole_volume_vs_tiled_memory_ratio"] = volume["mib"] / cover["mib"][0]
    elif volume.get("status") == "limit":
        results["whole_volume_vs_tiled_memory_ratio_lower_bound"] = volume["lower_bound_mib"] / cover["mib"][0]
    print_summary(results, args)
    command = " ".join(["python benchmarks/pretrain_step_tiles.py", *argv])
    results["tiled"].update(revision=git_revision(), command=command)  # attributable even after pretrain_step.py runs
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else {}
        if "command" in old and not old["command"].startswith("python benchmarks/pretrain_step_tiles.py"):
            old["side_by_side_command"] = old["command"]  # the other keys' run (pretrain_step.py)
            old["side_by_side_revision"] = old.get("revision")
        old.update(results, revision=results["tiled"]["revision"], command=command)
        path.write_text(json.dumps(old, indent=1) + "\n")
    return results


def print_summary(r: dict, args: argparse.Namespace) -> None:
    t = r["tiled"]
    print(f"\n(d) t3d step, {args.crop}^3 tiles, B={args.batch}, chunk {args.chunk}: added peak MiB (median)")
    for n, v in t["peak_mib_by_tiles"].items():
        s = t["step_s_by_tiles"][n]
        print(
            f"  {n:>3} tiles/study: {v['median']:8.0f} MiB [{v['min']:.0f}, {v['max']:.0f}]  step {s['median']:.2f} s"
        )
    print(f"  max/min = {t['flatness_max_over_min']:.2f} (target <= 1.2)")
    print(
        f"(e) crop step {t['crop_step_s']['median']:.2f} s; overhead per tile / time per crop: "
        + ", ".join(f"{n}: {v:.2f}" for n, v in t["overhead_per_tile_over_crop"].items())
    )
    c = t["cover"]
    vol = c["whole_volume_step"]
    vol_txt = f"{vol['mib']:.0f} MiB" if vol.get("status") == "ok" else str(vol.get("status"))
    print(
        f"(f) {'x'.join(map(str, c['volume']))}: whole volume {vol_txt} vs {c['tiles']} tiles of {c['tile'][0]}^3 "
        f"{c['tiled_first_step_mib']:.0f} MiB -> ratio {r.get('whole_volume_vs_tiled_memory_ratio', float('nan')):.1f}"
        " (target >= 10)"
    )


if __name__ == "__main__":
    main()
