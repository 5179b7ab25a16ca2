"""``t3d predict seg --checkpoint RUN_OR_PT --input FILE_OR_MANIFEST --out DIR``: label maps for new scans.

Inputs: one image (NIfTI, NRRD, MHA/MHD or a DICOM series folder), a JSONL/CSV list with an ``image`` column (and
optionally ``id``), or an MSD ``dataset.json`` (its ``test`` images, else its training images). Each study is
preprocessed exactly as the network's training data (``t3d.data.preprocess``: orientation, spacing, HU checks) into
``DIR/cache``, segmented with Gaussian-blended sliding windows, and the label map is carried back onto the
**source** grid: every source voxel takes the label of the nearest cached voxel at the same world position
(``inverse(cache affine) @ source affine``, nearest neighbour). That one affine map undoes the reorientation, the
resampling and the padding at once, so ``DIR/<id>.nii.gz`` (uint8) has the source's shape and affine and overlays
the scan in any viewer. ``DIR/predictions.jsonl`` lists id, source image, prediction file and voxel counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from t3d.checkpoint import load_checkpoint
from t3d.data.cache import StudyCache, StudyMeta, safe_key
from t3d.data.cases import SegCase, case_id, prepare_cache
from t3d.finetune.networks import SegSpec
from t3d.finetune.segdata import load_volume
from t3d.finetune.segeval import InferenceSetting, predict_volume
from t3d.pretrained import SEG_KIND

log = logging.getLogger(__name__)


def seg_command(args: argparse.Namespace) -> int:
    rows = predict_seg(args.checkpoint, args.input, args.out, args.sw_batch_size, args.overlap, args.workers)
    print(f"predict seg: {len(rows)} label maps -> {args.out}")
    return 0 if rows else 1


def load_seg_model(checkpoint: str | Path) -> tuple[torch.nn.Module, SegSpec]:
    """The network of a ``t3d finetune seg`` checkpoint (eval mode, CPU) and its spec."""
    state = load_checkpoint(checkpoint)
    if state.get("kind") != SEG_KIND:
        raise ValueError(
            f"{checkpoint} is not a `t3d finetune seg` checkpoint (kind={state.get('kind')!r}); pass the fine-tuning "
            "run folder or its checkpoints/best.pt"
        )
    spec = SegSpec.from_dict(state["spec"])
    net = spec.build()
    net.load_state_dict(state["model"])
    return net.eval(), spec


def input_cases(path: str | Path) -> list[SegCase]:
    """Studies named by ``--input`` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    name = path.name.lower()
    if name.endswith(".json"):
        desc = json.loads(path.read_text())
        entries = desc.get("test") or desc.get("training") or []
        images = [e["image"] if isinstance(e, dict) else e for e in entries]
        cases = [SegCase(case_id(p), path.parent / p) for p in images]
    elif name.endswith((".jsonl", ".csv")):
        base = path.parent
        if name.endswith(".jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(path.open(newline="")))
        if not rows or any("image" not in r for r in rows):
            raise ValueError(f"{path}: every row needs an 'image' column (and optionally 'id')")
        cases = [SegCase(str(r.get("id") or case_id(r["image"])), base / r["image"]) for r in rows]
    else:
        cases = [SegCase(case_id(path), path)]
    if not cases:
        raise ValueError(f"{path} names no images")
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{path}: study ids must be unique (they name the output files), repeated: {', '.join(dupes)}")
    return cases


def to_source_grid(pred: np.ndarray, meta: StudyMeta) -> np.ndarray:
    """Label map on the cache grid (X, Y, Z) -> label map on the source grid ``meta.original_shape`` (nearest).

    ``inverse(cache affine) @ source affine`` maps a source voxel index to the cache voxel index at the same world
    (RAS mm) position; it combines the reorientation, resampling and padding of preprocessing.
    """
    if not meta.original_affine or not meta.original_shape:
        raise ValueError(f"study '{meta.id}': the cache lacks the source geometry; re-run preprocessing")
    to_cache = np.linalg.inv(np.asarray(meta.affine, dtype=np.float64)) @ np.asarray(meta.original_affine)
    return ndimage.affine_transform(
        np.ascontiguousarray(pred, dtype=np.uint8),
        to_cache[:3, :3],
        offset=to_cache[:3, 3],
        output_shape=tuple(int(s) for s in meta.original_shape),
        order=0,
        mode="constant",
        cval=0,
    )


def write_label_nifti(labels: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """uint8 NIfTI with ``affine`` as both sform and qform (scanner space), so every viewer places it the same."""
    img = nib.Nifti1Image(labels.astype(np.uint8), np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header.set_data_dtype(np.uint8)
    nib.save(img, str(path))
    return path


def predict_seg(
    checkpoint: str | Path,
    inputs: str | Path,
    out: str | Path,
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    workers: int = 1,
) -> list[dict]:
    """Segment every study of ``inputs``; write ``out/<id>.nii.gz`` on the source grids; return the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net, spec = load_seg_model(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    keys = prepare_cache(input_cases(inputs), out / "cache", spec.preprocess, workers)
    cache = StudyCache(out / "cache")
    setting = InferenceSetting(spec.windows, spec.crop_size, sw_batch_size, overlap, device)
    rows = []
    for study_id, key in tqdm(keys.items(), desc="predict seg", unit="study"):
        meta = cache.meta(key)
        pred = predict_volume(net, load_volume(cache, key, spec.windows), setting).numpy()
        labels = to_source_grid(pred, meta)
        path = write_label_nifti(labels, np.asarray(meta.original_affine), out / f"{safe_key(study_id)}.nii.gz")
        counts = np.bincount(labels.ravel(), minlength=spec.num_classes)
        rows.append(
            {
                "id": study_id,
                "image": meta.source,
                "prediction": str(path),
                "voxels": {spec.labels.get(c, str(c)): int(n) for c, n in enumerate(counts) if c > 0},
            }
        )
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return rows
