"""``t3d embed``: export study embeddings of a manifest from a pre-training checkpoint (docs/method.md §6).

    t3d embed --checkpoint runs/pretrain --manifest studies.jsonl --out emb/

Writes, row i = study ``ids.json[i]``:

    image.npy     float32 (N, E)  joint-space study embedding, unit norm: the model's study_embedding of the grid crops;
                                  tiled methods: the attention pooling of the training tiles (checkpoint `tiles.*`)
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

from t3d.configfile import dataclass_from_args
from t3d.evaluate.joint import pool_tiles, study_embeddings
from t3d.evaluate.pipeline import open_run
from t3d.evaluate.request import StudyRequest
from t3d.evaluate.studies import cached_ids, report_texts


def command(args: argparse.Namespace) -> int:
    """``t3d embed``."""
    meta = run_embed(dataclass_from_args(StudyRequest, args), args.manifest, root=args.root)
    print(f"embed: {meta['n_studies']} studies -> {args.out} ({', '.join(meta['files'])})")
    return 0


def run_embed(request: StudyRequest, manifest: str | Path, root: str | Path | None = None) -> dict:
    """Embed the studies of ``manifest``; returns what ``meta.json`` holds."""
    run = open_run(request)
    run.prepare_manifest(manifest, root)
    ids = cached_ids(run.cache, run.wanted())
    jm, out, cache = run.jm, run.out, run.cache
    model = jm.model

    def crop_fn(x: torch.Tensor) -> torch.Tensor:
        return model.encoder.pool(model.encoder.forward_features(x))  # (K, F)

    per_study, got = run.encode(ids, crop_fn, desc="embed")
    features = torch.stack([f.mean(dim=0) for f in per_study])  # (N, F)
    image = study_embeddings(jm, per_study)  # (N, E): the study embedding pre-training aligned with the reports
    if jm.spec.tiles:  # the study embedding training optimised: attention pooling of the tiles
        image = pool_tiles(jm, run.dataset(got), per_study)
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
            text[rows] = run.text_embeddings(reports).numpy()
            has_text[rows] = True
        np.save(out / "text.npy", text)
        files.append("text.npy")
    (out / "ids.json").write_text(json.dumps(got, indent=0))
    with (out / "index.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "id", "has_text"])
        writer.writerows([n, i, int(t)] for n, (i, t) in enumerate(zip(got, has_text)))
    meta = {
        "checkpoint": str(request.checkpoint),
        "method": jm.method,
        "step": jm.step,
        "n_studies": len(got),
        "image_dim": int(image.shape[1]),
        "feature_dim": int(features.shape[1]),
        "text": bool(jm.has_joint_space),
        "input": "whole volume"
        if jm.spec.whole_volume
        else f"grid crops {list(jm.cfg.crops.size)}, <= {run.dataset(got).max_crops}",
        "files": files + ["ids.json", "index.csv"],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
