"""``t3d embed``: export study embeddings of a manifest from a pre-training checkpoint (METHOD §6).

    t3d embed --checkpoint runs/pretrain --manifest studies.jsonl --out emb/

Writes, row i = study ``ids.json[i]``:

    image.npy     float32 (N, E)  joint-space study embedding, unit norm: normalise(mean over grid crops of z); tiled
                                  methods: the attention pooling of the training tiles (``tiles.*`` of the checkpoint)
    features.npy  float32 (N, F)  encoder features (``Encoder.pool``) averaged over the crops: for probes/clustering
    text.npy      float32 (N, E)  report embeddings (checkpoints with a text head; NaN rows for studies without text)
    ids.json, index.csv (row, id, has_text), meta.json (checkpoint, method, step, widths)

Images are preprocessed with the checkpoint's settings into ``--cache`` (default ``OUT/cache``) first.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="export image (and report) embeddings of a manifest from a pre-training checkpoint",
        description="Embed every study of a manifest (JSONL/CSV, CT-RATE layout too) into .npy files + an id index.",
    )
    p.add_argument("--checkpoint", required=True, help="pre-training checkpoint (.pt file or run folder)")
    p.add_argument("--manifest", required=True, help="manifest of the studies (id, image, report/findings/...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--root", help="folder the manifest's image paths resolve against (default: its folder)")
    p.add_argument("--cache", help="preprocessed cache to write/reuse (default OUT/cache)")
    p.add_argument("--splits", help="JSON split file; with --split, embed only that split")
    p.add_argument("--split", default="test", help="split of --splits to embed (default test)")
    p.add_argument("--max-crops", type=int, default=27, help="grid crops per study at most (default 27)")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of neighbouring grid crops (default 0.25)")
    p.add_argument("--crop-batch", type=int, default=8, help="crops per forward pass (default 8)")
    p.add_argument("--workers", type=int, default=2, help="preprocessing / loading processes (default 2)")
    p.add_argument("--text-model", help="local copy of the checkpoint's text encoder, if its path moved")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    meta = run_embed(
        args.checkpoint,
        args.manifest,
        args.out,
        root=args.root,
        cache=args.cache,
        splits=args.splits,
        split=args.split,
        max_crops=args.max_crops,
        overlap=args.overlap,
        crop_batch=args.crop_batch,
        workers=args.workers,
        text_model=args.text_model,
    )
    print(f"embed: {meta['n_studies']} studies -> {args.out} ({', '.join(meta['files'])})")
    return 0


def run_embed(
    checkpoint: str | Path,
    manifest: str | Path,
    out: str | Path,
    root: str | Path | None = None,
    cache: str | Path | None = None,
    splits: str | Path | None = None,
    split: str = "test",
    max_crops: int = 27,
    overlap: float = 0.25,
    crop_batch: int = 8,
    workers: int = 2,
    text_model: str | None = None,
) -> dict:
    """Embed the studies of ``manifest``; returns what ``meta.json`` holds."""
    from t3d.evaluate.joint import encode_studies, load_joint, pool_tiles, study_dataset, text_embeddings
    from t3d.evaluate.studies import cached_ids, prepare_cache, read_split, report_texts

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jm = load_joint(checkpoint)
    cache = Path(cache) if cache else out / "cache"
    prepare_cache(manifest, cache, jm.cfg.preprocess, root=root, workers=workers)
    ids = cached_ids(cache, read_split(splits, split) if splits else None)
    model = jm.model
    width = model.encoder.embed_channels

    def crop_fn(x: torch.Tensor) -> torch.Tensor:
        h = model.encoder.pool(model.encoder.forward_features(x))  # (K, F)
        return torch.cat([h, model.image_head(h)], dim=-1)  # (K, F + E)

    data = study_dataset(jm.cfg, jm.spec, cache, ids, overlap=overlap, max_crops=max_crops)
    per_study, got = encode_studies(data, crop_fn, jm.device, crop_batch, workers, desc="embed")
    mean = torch.stack([f.mean(dim=0) for f in per_study])  # (N, F + E)
    features, image = mean[:, :width], F.normalize(mean[:, width:], dim=-1)
    if jm.spec.tiles:  # the study embedding training optimised: attention pooling of the tiles
        image = pool_tiles(jm, data, [f[:, :width] for f in per_study])
    np.save(out / "image.npy", image.numpy().astype(np.float32))
    np.save(out / "features.npy", features.numpy().astype(np.float32))
    files = ["image.npy", "features.npy"]
    has_text = np.zeros(len(got), dtype=bool)
    if jm.has_joint_space:
        text_ids, reports = report_texts(cache, jm.cfg.text.sections, got)
        text = np.full((len(got), image.shape[1]), np.nan, dtype=np.float32)
        if reports:
            position = {i: n for n, i in enumerate(got)}
            rows = [position[i] for i in text_ids]
            text[rows] = text_embeddings(jm, reports, cache / "text", text_model=text_model).numpy()
            has_text[rows] = True
        np.save(out / "text.npy", text)
        files.append("text.npy")
    (out / "ids.json").write_text(json.dumps(got, indent=0))
    with (out / "index.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "id", "has_text"])
        writer.writerows([n, i, int(t)] for n, (i, t) in enumerate(zip(got, has_text)))
    meta = {
        "checkpoint": str(checkpoint),
        "method": jm.method,
        "step": jm.step,
        "n_studies": len(got),
        "image_dim": int(image.shape[1]),
        "feature_dim": int(width),
        "text": bool(jm.has_joint_space),
        "input": "whole volume"
        if jm.spec.whole_volume
        else f"grid crops {list(jm.cfg.crops.size)}, <= {data.max_crops}",
        "files": files + ["ids.json", "index.csv"],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
