"""Crops per second: our memory-mapped cache (``CropDataset``) vs MONAI's usual NIfTI pipeline vs a plain copy.

    python benchmarks/crops.py --studies 8 --preset default --crops 400 --json benchmarks/results/crops.json

On the same synthetic studies, in one process, back to back after a warm-up:

- ``ours``: ``CropDataset`` items (K sites x 2 views, HU window + flips + intensity jitter) read from the int16
  ``.npy`` memory maps of the cache written by ``t3d preprocess``;
- ``monai``: LoadImaged (.nii.gz) -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(same target spacing) ->
  ScaleIntensityRanged(same window) -> RandSpatialCropSamplesd(same crop size, num_samples = 2K) per study, i.e.
  what a training step costs when the volume is decoded and resampled on the fly;
- ``monai_cache_dataset`` / ``monai_persistent_dataset``: the same transforms through MONAI's ``CacheDataset``
  (deterministic part cached in RAM) and ``PersistentDataset`` (cached on disk), only the random crops per epoch:
  the strongest pipeline a MONAI user would pick; steady state after the cache is filled (fill time reported);
- ``memcopy``: the same crop boxes sliced out of volumes already in RAM into int16 buffers, no windowing: an upper
  bound for any reader.

A second table justifies the cache format: the same 2K crops per study read from the same array stored as
``.npy`` (memory map), ``.npz`` (compressed, decoded per read) and ``.nii.gz`` (nibabel proxy slicing).

All timings are warm page cache (the files were just written); a cold disk only widens the gap, since the memory
map reads the crop's pages while the others decode the whole file. Torch/BLAS threads default to 1 so the numbers
compare single cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import monai.data
import numpy as np
import torch
from monai import transforms as mt

from t3d.config import CropConfig, PreprocessConfig
from t3d.data.cache import AIR_HU, StudyCache, StudyMeta
from t3d.data.crops import CropDataset, centre_bounds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_revision  # noqa: E402

# Grid (voxels, mm) of the synthetic presets, for the fallback data; the cache keeps the preset's spacing.
FALLBACK_GRIDS = {
    "tiny": ((48, 48, 32), (5.0, 5.0, 6.0)),
    "small": ((112, 112, 72), (2.5, 2.5, 3.0)),
    "default": ((256, 256, 160), (0.8, 0.8, 1.5)),
}
PRESET_CROP = {"tiny": (32, 32, 32), "small": (64, 64, 64), "default": (96, 96, 96)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--studies", type=int, default=8, help="synthetic studies to generate")
    p.add_argument("--preset", default="default", choices=sorted(FALLBACK_GRIDS), help="synthetic volume size")
    p.add_argument("--crops", type=int, default=400, help="crops timed for ours and memcopy (per repeat)")
    p.add_argument("--size", type=int, nargs=3, default=None, help="crop size in voxels (default: by preset)")
    p.add_argument("--sites", type=int, default=2, help="K sites per study; MONAI cuts 2K crops per loaded study")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the fast measurements (median reported)")
    p.add_argument("--monai-studies", type=int, default=None, help="studies through MONAI (default: all)")
    p.add_argument("--format-studies", type=int, default=None, help="studies per format (default: all, max 4)")
    p.add_argument(
        "--data",
        default="auto",
        choices=("auto", "synthetic", "fallback"),
        help="synthetic: t3d.data.synthetic + t3d.data.preprocess; fallback: own NIfTI + cache",
    )
    p.add_argument(
        "--source-spacing",
        type=float,
        nargs=3,
        default=None,
        help="write the synthetic NIfTI at this spacing (mm), so both pipelines resample",
    )
    p.add_argument("--workdir", default=None, help="folder for data and cache (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (MONAI resampling uses them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here as JSON")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- data


def prepare_data(args: argparse.Namespace, work: Path, size: tuple) -> tuple[Path, dict[str, Path], tuple, str]:
    """(cache folder, {study id: source .nii.gz}, target spacing, which data path was used).

    The target spacing is the preset's own, so that the cache holds the preset's grid (a 2.5 mm ``small`` study
    is not blown up to 0.8 mm), and volumes are padded only up to the crop ``size``."""
    shape, spacing = FALLBACK_GRIDS[args.preset]
    if args.data in ("auto", "synthetic"):
        try:
            from t3d.data.preprocess import preprocess_manifest
            from t3d.data.synthetic import PRESETS, generate_dataset
        except ImportError as err:
            if args.data == "synthetic":
                raise
            print(f"[crops benchmark] synthetic data / preprocessing unavailable ({err}); using fallback volumes")
        else:
            spacing = tuple(PRESETS[args.preset].spacing)
            data, cache = work / "synthetic", work / "cache"
            extra = {"spacing": tuple(args.source_spacing)} if args.source_spacing else {}
            generate_dataset(data, args.studies, args.seed, preset=args.preset, **extra)
            # Every study, not only the pretrain split of pretrain.jsonl; the report text is irrelevant here.
            images = sorted((data / "images").glob("*.nii.gz"))
            manifest = data / "all.jsonl"
            lines = [
                json.dumps({"id": p.name[: -len(".nii.gz")], "image": str(p), "report": "benchmark"}) for p in images
            ]
            manifest.write_text("\n".join(lines) + "\n")
            prep = PreprocessConfig(spacing=spacing, min_size=size)
            preprocess_manifest(manifest, cache, prep, root=data)
            rows = StudyCache(cache).index()
            return cache, {r["id"]: data / "images" / f"{r['id']}.nii.gz" for r in rows}, spacing, "synthetic"
    if args.source_spacing:
        raise SystemExit("--source-spacing needs the synthetic data generator (t3d.data.synthetic)")
    return (*write_fallback(work, args.studies, shape, spacing, args.seed), spacing, "fallback")


def write_fallback(work: Path, n: int, shape: tuple, spacing: tuple, seed: int) -> tuple[Path, dict[str, Path]]:
    """NIfTI volumes (a noisy soft-tissue ellipsoid with a bony core in air, already at target spacing, RAS) and the
    cache of the same arrays, written through ``StudyCache``."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    cache, images = StudyCache(work / "cache"), work / "images"
    images.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.8, 0.7, 0.95])[:, None, None, None]) ** 2).sum(0))
    rows, paths = [], {}
    for i in range(n):
        vol = np.where(radius < 1, 40, AIR_HU) + rng.normal(0, 20, shape)
        vol[radius < 0.25] = 700
        vol = vol.astype(np.int16)
        sid = f"fallback_{i:04d}"
        affine = np.diag([*spacing, 1.0])
        paths[sid] = images / f"{sid}.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), paths[sid])
        meta = StudyMeta(sid, sid, shape, spacing, affine.tolist(), str(paths[sid]), "fallback")
        cache.write_study(meta, vol, rng_seed=i)
        rows.append({"id": sid, "key": sid, "report": ""})
    cache.write_index(rows)
    return cache.root, paths


# ----------------------------------------------------------------------------------------------- timings


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Crops/s of each ``fn() -> crops``: one warm-up call each, then ``repeats`` rounds in which every fn runs
    once (so that load from other processes hits all of them alike); the median round counts."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    crops: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            crops[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: crops[name] / statistics.median(times[name]) for name in fns}


def ours_reader(cache: Path, cfg: CropConfig, crops: int):
    """``CropDataset`` items (windowed, augmented) until ``crops`` crops are cut."""
    per_item = cfg.sites * 2
    ds = CropDataset(cache, cfg, seed=0, epoch_length=max(1, -(-crops // per_item)))

    def run() -> int:
        for i in range(len(ds)):
            ds[i]
        return len(ds) * per_item

    return run


def crop_boxes(shapes: list[tuple], size: tuple, count: int, seed: int) -> list[tuple[int, tuple]]:
    """``count`` (study, slices) boxes, uniform over the positions where the crop fits, cycling over studies."""
    rng = np.random.default_rng(seed)
    boxes = []
    for j in range(count):
        study = j % len(shapes)
        lo, hi = centre_bounds(shapes[study], size)
        start = rng.integers(lo, hi + 1) - np.asarray(size) // 2
        boxes.append((study, tuple(slice(max(s, 0), s + n) for s, n in zip(start, size))))
    return boxes


def memcopy_reader(volumes: list[np.ndarray], boxes: list[tuple[int, tuple]]):
    """The crop boxes copied out of in-RAM volumes into contiguous int16 buffers."""

    def run() -> int:
        for study, box in boxes:
            np.ascontiguousarray(volumes[study][box])
        return len(boxes)

    return run


def format_reader(opener, keys: list[str], boxes: list[tuple[int, tuple]], per_study: int):
    """Like a training step: open a study's file once, cut its ``per_study`` raw crops, next study."""

    def run() -> int:
        for start in range(0, len(boxes), per_study):
            volume = opener(keys[boxes[start][0]])
            for _, box in boxes[start : start + per_study]:
                np.ascontiguousarray(volume[box])
        return len(boxes)

    return run


def format_readers(store: StudyCache, work: Path, size: tuple, per_study: int, studies: int) -> dict:
    """Readers of the same cached arrays saved as .npy (memory map), .npz (compressed) and .nii.gz (proxy)."""
    import nibabel as nib

    keys = [row["key"] for row in store.index()[:studies]]
    fmt_dir = work / "formats"
    fmt_dir.mkdir(exist_ok=True)
    for key in keys:
        vol = np.asarray(store.image(key))
        np.savez_compressed(fmt_dir / f"{key}.npz", image=vol)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), fmt_dir / f"{key}.nii.gz")
    boxes = crop_boxes([tuple(store.meta(k).shape) for k in keys], size, per_study * len(keys), seed=2)
    boxes.sort(key=lambda b: b[0])  # group each study's crops: one file opening per study
    openers = {
        "npy_memmap": store.image,
        "npz_compressed": lambda key: np.load(fmt_dir / f"{key}.npz")["image"],
        "nii_gz_proxy": lambda key: nib.load(fmt_dir / f"{key}.nii.gz").dataobj,
    }
    return {name: format_reader(opener, keys, boxes, per_study) for name, opener in openers.items()}


def monai_transforms(spacing: tuple, cfg: CropConfig) -> tuple[list, object]:
    """(deterministic transforms: load, orient, resample, window; the random crop transform), as a MONAI user
    writes them."""
    lo, hi = cfg.windows[0]
    fixed = [
        mt.LoadImaged(keys="image", image_only=True),
        mt.EnsureChannelFirstd(keys="image"),
        mt.Orientationd(keys="image", axcodes="RAS"),
        mt.Spacingd(keys="image", pixdim=spacing, mode="bilinear"),
        mt.ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    crop = mt.RandSpatialCropSamplesd(
        keys="image", roi_size=cfg.size, num_samples=2 * cfg.sites, random_size=False, random_center=True
    )
    return fixed, crop


def bench_monai_cached(paths: list[Path], spacing: tuple, cfg: CropConfig, work: Path, epochs: int = 3) -> dict:
    """MONAI's caching datasets, the strongest pipeline a MONAI user would pick: the deterministic transforms run
    once per study (``CacheDataset``: results in RAM; ``PersistentDataset``: on disk), only the random crops per
    epoch. Returns steady-state crops/s over ``epochs`` passes after the cache is filled, and the fill time."""
    fixed, crop = monai_transforms(spacing, cfg)
    data = [{"image": str(p)} for p in paths]
    out = {}
    for name in ("CacheDataset", "PersistentDataset"):
        transform = mt.Compose([*fixed, crop])
        transform.set_random_state(seed=0)
        t0 = time.perf_counter()
        if name == "CacheDataset":
            ds = monai.data.CacheDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False)
        else:
            ds = monai.data.PersistentDataset(data, transform, cache_dir=work / "monai_persistent")
            for i in range(len(ds)):  # first pass writes the cache
                ds[i]
        fill = time.perf_counter() - t0
        t0, crops = time.perf_counter(), 0
        for _ in range(epochs):
            for i in range(len(ds)):
                crops += len(ds[i])
        out[name] = {"crops_per_s": crops / (time.perf_counter() - t0), "cache_fill_s": fill}
    return out


def bench_monai(paths: list[Path], spacing: tuple, cfg: CropConfig) -> float:
    fixed, crop = monai_transforms(spacing, cfg)
    pipeline = mt.Compose([*fixed, crop])
    pipeline.set_random_state(seed=0)
    pipeline({"image": str(paths[0])})  # warm-up (imports, page cache)
    t0, crops = time.perf_counter(), 0
    for path in paths:
        out = pipeline({"image": str(path)})
        assert tuple(out[0]["image"].shape[1:]) == tuple(cfg.size)
        crops += len(out)
    return crops / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module=r"monai\..*")  # deprecation chatter that would bury the table
    size = tuple(args.size) if args.size else PRESET_CROP[args.preset]
    cfg = CropConfig(size=size, sites=args.sites)
    with tempfile.TemporaryDirectory(prefix="t3d-crops-bench-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cache, sources, spacing, data_kind = prepare_data(args, work, size)
        store = StudyCache(cache)
        rows = store.index()
        shapes = [tuple(store.meta(r["key"]).shape) for r in rows]
        print(
            f"data: {len(rows)} {data_kind} studies ({args.preset}), cached shapes {sorted(set(shapes))} at spacing "
            f"{spacing} mm, crop {size}, K={args.sites}; prepared in {time.perf_counter() - t0:.0f} s"
        )
        volumes = [np.array(store.image(row["key"])) for row in rows]  # in RAM, for memcopy
        fmt = format_readers(store, work, size, 2 * args.sites, args.format_studies or min(4, len(rows)))
        fast = interleaved(
            {
                "ours": ours_reader(cache, cfg, args.crops),
                "memcopy": memcopy_reader(volumes, crop_boxes(shapes, size, args.crops, seed=1)),
                "npy_memmap": fmt.pop("npy_memmap"),
            },
            args.repeats,
        )
        slow = interleaved(fmt, 1)  # decode whole files: one round is long enough
        monai_paths = [sources[r["id"]] for r in rows[: args.monai_studies or len(rows)]]
        monai = bench_monai(monai_paths, spacing, cfg)
        cached = bench_monai_cached(monai_paths, spacing, cfg, work)
    ours, memcopy = fast["ours"], fast["memcopy"]
    formats = {"npy_memmap": fast["npy_memmap"], **slow}
    results = {
        "data": data_kind,
        "preset": args.preset,
        "studies": len(rows),
        "volume_shapes": [list(s) for s in sorted(set(shapes))],
        "spacing_mm": list(spacing),
        "crop_size": list(size),
        "sites": args.sites,
        "threads": args.threads,
        "crops_per_s": {
            "ours": ours,
            "monai": monai,
            "monai_cache_dataset": cached["CacheDataset"]["crops_per_s"],
            "monai_persistent_dataset": cached["PersistentDataset"]["crops_per_s"],
            "memcopy": memcopy,
        },
        "monai_cache_fill_s": {k: v["cache_fill_s"] for k, v in cached.items()},
        "ratios": {
            "ours_over_monai": ours / monai,
            "ours_over_monai_cache_dataset": ours / cached["CacheDataset"]["crops_per_s"],
            "ours_over_monai_persistent_dataset": ours / cached["PersistentDataset"]["crops_per_s"],
            "ours_over_memcopy": ours / memcopy,
        },
        "format_crops_per_s": formats,
        "format_ratios": {
            "npy_over_npz": formats["npy_memmap"] / formats["npz_compressed"],
            "npy_over_nii_gz": formats["npy_memmap"] / formats["nii_gz_proxy"],
        },
        "command": " ".join(["python benchmarks/crops.py", *(argv if argv is not None else sys.argv[1:])]),
        "revision": git_revision(),
    }
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def print_table(r: dict) -> None:
    rates, formats = r["crops_per_s"], r["format_crops_per_s"]
    print(f"\n{'pipeline':<32}{'crops/s':>12}")
    print(f"{'ours (CropDataset, windowed)':<32}{rates['ours']:>12.1f}")
    print(f"{'MONAI (NIfTI load+resample)':<32}{rates['monai']:>12.1f}")
    print(f"{'MONAI CacheDataset (RAM)':<32}{rates['monai_cache_dataset']:>12.1f}")
    print(f"{'MONAI PersistentDataset (disk)':<32}{rates['monai_persistent_dataset']:>12.1f}")
    print(f"{'memcopy (in RAM, raw int16)':<32}{rates['memcopy']:>12.1f}")
    ratios = r["ratios"]
    print(f"ours / MONAI = {ratios['ours_over_monai']:.1f}x   ours / memcopy = {ratios['ours_over_memcopy']:.2f}")
    print(f"\n{'storage format (raw crops)':<32}{'crops/s':>12}")
    for name, rate in formats.items():
        print(f"{name:<32}{rate:>12.1f}")
    fr = r["format_ratios"]
    print(f"npy / npz = {fr['npy_over_npz']:.1f}x   npy / nii.gz = {fr['npy_over_nii_gz']:.1f}x")


if __name__ == "__main__":
    main()
