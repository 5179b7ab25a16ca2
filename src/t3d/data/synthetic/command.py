"""``t3d synth``: write a synthetic CT + report benchmark (volumes, labels, reports, ground truth) to a folder.

    t3d synth --out data/synth --num-studies 200 --seed 0 --preset small --workers 4

Folder layout (study ids ``synth_0000``, ``synth_0001``, ...)::

    DIR/images/<id>.nii.gz   int16 HU, RAS+ affine diag(+spacing) (+x = patient right), centred on the world origin
    DIR/labels/<id>.nii.gz   uint8 label map on the same grid (names in dataset.json "labels")
    DIR/meta/<id>.json       per-study record (report + ground truth); written last, it marks the study done
    DIR/pretrain.jsonl       {"id", "image", "label", "findings", "impression"} of the *pretrain* split only
    DIR/reports.jsonl        the same for every study, plus "split" (retrieval / zero-shot evaluation)
    DIR/dataset.json         MSD layout: training = finetune split, test = test split (both with labels)
    DIR/findings.csv         CT-RATE multi_abnormality_labels layout: VolumeName, one 0/1 column per finding
    DIR/splits.json          {"pretrain", "finetune", "test"}: 60/20/20, disjoint, a permutation drawn from the seed
    DIR/ground_truth.jsonl   per study: findings with type, organ, side, size_mm, centre_voxel, label, location
    DIR/synth.json           the settings the folder was made with

Pre-training reads only the pretrain split's reports, so labels of fine-tune and test studies (which are derived
from the same ground truth as the reports) never leak into pre-training.

Re-running is safe and cheap. Every file is written under a temporary name and renamed into place. A folder that
holds a previous output with the *same* settings is resumed: studies whose ``meta/<id>.json`` exists are kept,
the rest generated, and the summary files rewritten. A non-empty folder with other content or other settings is
refused unless ``--overwrite``, which deletes this generator's files there (``images/synth_*``,
``labels/synth_*``, ``meta/synth_*``, the summary files) and nothing else, then generates afresh.

Same seed -> byte-identical files whatever ``--workers`` (each study draws from its own seed; gzip carries no
timestamp or file name).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from t3d.data.synthetic.findings import CSV_COLUMNS, FINDINGS, FOCAL, LABEL_NAMES
from t3d.data.synthetic.study import PRESETS, make_grid, sample_study, study_id

GENERATOR_VERSION = 1
SPLIT_FRACTIONS = {"finetune": 0.2, "test": 0.2}
SUMMARY_FILES = (
    "pretrain.jsonl",
    "reports.jsonl",
    "dataset.json",
    "findings.csv",
    "splits.json",
    "ground_truth.jsonl",
    "synth.json",
)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def nifti_gz_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A ``.nii.gz`` file's bytes, reproducible: gzip without timestamp or file name in its header."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _write_study(job: tuple[str, int, int, str, tuple | None]) -> dict:
    """Generate one study and write its image, label and (last) meta record; returns the record."""
    out, seed, index, preset, spacing = job
    out = Path(out)
    study = sample_study(seed, index, preset, spacing)
    image, label = f"images/{study.id}.nii.gz", f"labels/{study.id}.nii.gz"
    atomic_write(out / image, nifti_gz_bytes(study.image, study.affine))
    atomic_write(out / label, nifti_gz_bytes(study.label, study.affine))
    record = {
        "id": study.id,
        "image": image,
        "label": label,
        "findings": study.report.findings,
        "impression": study.report.impression,
        "ground_truth": study.ground_truth(),
    }
    atomic_write(out / "meta" / f"{study.id}.json", json.dumps(record))
    return record


def make_splits(ids: list[str], seed: int) -> dict[str, list[str]]:
    """Disjoint pretrain / finetune / test splits (60/20/20), a permutation drawn from ``seed``."""
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5917])).permutation(len(ids))
    n = len(ids)
    sizes = {k: int(round(f * n)) for k, f in SPLIT_FRACTIONS.items()}
    if n >= 3:  # every split non-empty as soon as it can be
        sizes = {k: max(1, v) for k, v in sizes.items()}
    test = [ids[i] for i in order[: sizes["test"]]]
    finetune = [ids[i] for i in order[sizes["test"] : sizes["test"] + sizes["finetune"]]]
    pretrain = [ids[i] for i in order[sizes["test"] + sizes["finetune"] :]]
    return {"pretrain": sorted(pretrain), "finetune": sorted(finetune), "test": sorted(test)}


def _settings(num_studies: int, seed: int, preset: str, spacing) -> dict:
    grid = make_grid(preset, spacing)
    return {
        "generator": "t3d synth",
        "version": GENERATOR_VERSION,
        "num_studies": int(num_studies),
        "seed": int(seed),
        "preset": preset,
        "shape": list(grid.shape),
        "spacing": [float(s) for s in grid.spacing],
    }


def _prepare(out: Path, settings: dict, overwrite: bool) -> None:
    """Create, resume or (with ``overwrite``) clear the output folder; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the synthetic dataset")
    if out.exists() and any(out.iterdir()):
        previous = None
        if (out / "synth.json").is_file():
            previous = json.loads((out / "synth.json").read_text())
        if previous != settings and not overwrite:
            what = (
                "holds files that are not a `t3d synth` output"
                if previous is None
                else "holds a `t3d synth` output with other settings ("
                + ", ".join(f"{k}={previous.get(k)!r} not {v!r}" for k, v in settings.items() if previous.get(k) != v)
                + ")"
            )
            raise ValueError(f"{out} {what}; pass --overwrite to replace its synthetic files, or pick another --out")
        if previous != settings:
            for sub, pattern in (("images", "synth_*.nii.gz"), ("labels", "synth_*.nii.gz"), ("meta", "synth_*.json")):
                for path in (out / sub).glob(pattern):
                    path.unlink()
            for name in SUMMARY_FILES:
                (out / name).unlink(missing_ok=True)
    for sub in ("images", "labels", "meta"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write(out / "synth.json", json.dumps(settings, indent=2) + "\n")


def _run(jobs: list[tuple], workers: int, progress: bool) -> None:
    bar = tqdm(total=len(jobs), desc="synth", unit="study", disable=not progress or not jobs)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _write_study(job)
            bar.update()
    else:
        # spawn, not fork: the parent may hold threads (torch, BLAS) that a forked child would inherit locked.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            for _ in pool.map(_write_study, jobs):
                bar.update()
    bar.close()


def _write_summaries(out: Path, records: list[dict], splits: dict[str, list[str]]) -> None:
    split_of = {i: name for name, ids in splits.items() for i in ids}
    text = {
        r["id"]: {"id": r["id"], "image": r["image"], "findings": r["findings"], "impression": r["impression"]}
        for r in records
    }
    label = {r["id"]: r["label"] for r in records}
    # The pretrain split's label maps travel with its reports: preprocessing caches them, and the ``supervised``
    # control reads per-crop lesion targets from them (the other methods never read labels).
    lines = [json.dumps({**text[i], "label": label[i]}) for i in splits["pretrain"]]
    atomic_write(out / "pretrain.jsonl", "".join(line + "\n" for line in lines))
    rows = [{**text[r["id"]], "label": label[r["id"]], "split": split_of[r["id"]]} for r in records]
    atomic_write(out / "reports.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write(out / "ground_truth.jsonl", "".join(json.dumps(r["ground_truth"]) + "\n" for r in records))
    atomic_write(out / "splits.json", json.dumps(splits, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["VolumeName", *CSV_COLUMNS.values()])
    for r in records:
        present = {f["type"] for f in r["ground_truth"]["findings"]}
        writer.writerow([f"{r['id']}.nii.gz", *(int(k in present) for k in CSV_COLUMNS)])
    atomic_write(out / "findings.csv", buf.getvalue())
    pairs = {r["id"]: {"image": r["image"], "label": r["label"]} for r in records}
    dataset = {
        "name": "t3d-synthetic",
        "description": "Synthetic chest-abdomen CT with organ and lesion labels and generated reports (t3d synth)",
        "reference": "t3d synthetic benchmark generator",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in sorted(LABEL_NAMES.items())},
        "numTraining": len(splits["finetune"]),
        "numTest": len(splits["test"]),
        "training": [pairs[i] for i in splits["finetune"]],
        "test": [pairs[i] for i in splits["test"]],
    }
    atomic_write(out / "dataset.json", json.dumps(dataset, indent=1) + "\n")


def _summary(records: list[dict], splits: dict, settings: dict, generated: int, seconds: float, out: Path) -> dict:
    findings = [f for r in records for f in r["ground_truth"]["findings"]]
    spacing_xy = max(settings["spacing"][:2])
    focal = [f for f in findings if f["type"] in FOCAL]
    small = sum(f["size_mm"] / spacing_xy < 4 for f in focal)
    studies = {k: sum(any(f["type"] == k for f in r["ground_truth"]["findings"]) for r in records) for k in FINDINGS}
    return {
        "out_dir": str(out),
        "preset": settings["preset"],
        "shape": settings["shape"],
        "spacing": settings["spacing"],
        "num_studies": len(records),
        "generated": generated,
        "reused": len(records) - generated,
        "normal": sum(r["ground_truth"]["normal"] for r in records),
        "findings": studies,
        "lesions": {k: sum(f["type"] == k for f in findings) for k in FINDINGS},
        "focal_lesions": len(focal),
        "small_lesions": int(small),
        "small_lesion_share": float(small / len(focal)) if focal else 0.0,
        "splits": {k: len(v) for k, v in splits.items()},
        "seconds": round(seconds, 2),
    }


def generate_dataset(
    out_dir,
    num_studies: int,
    seed: int,
    preset: str = "small",
    workers: int = 1,
    spacing: tuple[float, float, float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``num_studies`` synthetic studies and the benchmark files to ``out_dir`` (layout: module docstring).

    ``spacing`` (mm, x y z) overrides the preset's and keeps its field of view (so the voxel count changes).
    Returns a summary: counts of studies per finding, normals, lesion counts, the share of focal lesions under
    4 voxels across (what a 4x-downsampled volume loses), split sizes, grid, timing.
    """
    if num_studies < 1:
        raise ValueError(f"--num-studies must be at least 1, got {num_studies}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    start, out = time.perf_counter(), Path(out_dir)
    settings = _settings(num_studies, seed, preset, spacing)
    _prepare(out, settings, overwrite)
    ids = [study_id(i) for i in range(num_studies)]
    spacing = tuple(settings["spacing"]) if spacing is not None else None
    jobs = [
        (str(out), int(seed), i, preset, spacing)
        for i in range(num_studies)
        if not (out / "meta" / f"{ids[i]}.json").is_file()
    ]
    _run(jobs, workers, progress)
    records = [json.loads((out / "meta" / f"{i}.json").read_text()) for i in ids]
    splits = make_splits(ids, seed)
    _write_summaries(out, records, splits)
    return _summary(records, splits, settings, len(jobs), time.perf_counter() - start, out)


def format_summary(summary: dict) -> str:
    """The short table ``t3d synth`` prints."""
    n = summary["num_studies"]
    grid = "x".join(map(str, summary["shape"])) + " voxels at " + "x".join(f"{s:g}" for s in summary["spacing"])
    lines = [
        f"{n} studies ({summary['preset']}, {grid} mm) in {summary['out_dir']}: {summary['generated']} generated, "
        f"{summary['reused']} kept, {summary['seconds']:.1f} s",
        f"{'finding':<20}{'studies':>8}{'share':>8}{'lesions':>9}",
    ]
    for key, column in CSV_COLUMNS.items():
        lesions = summary["lesions"][key] if key in FOCAL else ""
        lines.append(f"{column:<20}{summary['findings'][key]:>8}{summary['findings'][key] / n:>8.0%}{lesions:>9}")
    lines.append(f"{'normal':<20}{summary['normal']:>8}{summary['normal'] / n:>8.0%}")
    lines.append(
        f"focal lesions under 4 voxels across: {summary['small_lesions']} of {summary['focal_lesions']} "
        f"({summary['small_lesion_share']:.0%})"
    )
    lines.append("splits: " + " / ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    return "\n".join(lines)


def _main(args) -> int:
    summary = generate_dataset(
        args.out,
        args.num_studies,
        args.seed,
        args.preset,
        args.workers,
        tuple(args.spacing) if args.spacing else None,
        args.overwrite,
    )
    print(format_summary(summary))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        description="Write synthetic chest-abdomen CT volumes with organ/lesion labels, reports generated from the "
        "ground truth, MSD dataset.json, CT-RATE-style findings.csv and pretrain/finetune/test splits.",
    )
    p.add_argument("--out", required=True, help="output folder (created; resumed if it holds the same settings)")
    p.add_argument("--num-studies", type=int, required=True, help="number of studies")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (same seed -> identical files)")
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="small",
        help="tiny: 48x48x32 @ 5 mm (tests); small: 112x112x72 @ 2.5x2.5x3 mm; default: 256x256x160 @ 0.8x0.8x1.5 mm",
    )
    p.add_argument("--workers", type=int, default=1, help="processes generating studies in parallel")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="voxel spacing in mm (overrides the preset's, keeping its field of view)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous synthetic output in --out")
    p.set_defaults(func=_main)
