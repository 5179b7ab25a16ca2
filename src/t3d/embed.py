"""``t3d embed``: export study embeddings of a manifest from a pre-training checkpoint (docs/method.md §6).

    t3d embed --checkpoint runs/pretrain --manifest studies.jsonl --out emb/

Writes, row i = study ``ids.json[i]``:

    image.npy     float32 (N, E)  joint-space study embedding, unit norm: the model's study_embedding of the grid crops;
                                  tiled methods: the attention pooling of the training tiles (checkpoint `tiles.*`)
    features.npy  float32 (N, F)  encoder features (``Encoder.pool``) averaged over the crops: for probes/clustering
    text.npy      float32 (N, E)  report embeddings (checkpoints with a text head; NaN rows for studies without text)
    ids.json, index.csv (row, id, has_text), meta.json (checkpoint, method, step, widths, scores)

``align: sentence`` checkpoints (``meta.json`` ``"scores": "sentence"``) never trained a study or report embedding
against each other; they matched each report sentence with the study's best region. For them ``t3d embed`` writes
what that score reads, and unit-norm summaries in the usual files:

    regions.npy        float32 (R, E)  every study's region embeddings (tiles, or grid crops for crop methods)
    region_rows.npy    int32 (R,)      the row of ids.json each region belongs to
    sentences.npy      float32 (S, E)  every report's sentence embeddings (sentence-corpus centring, text head)
    sentence_rows.npy  int32 (S,)      the row each sentence belongs to
    image.npy / text.npy               the normalised mean of a study's regions / of a report's sentences

The pre-training score of study i and report j is the mean over j's sentences of the best cosine with i's regions
(``t3d.evaluate.joint.sentence_scores``); ``image @ text.T`` is only an approximation of it.

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

from t3d.configfile import dataclass_from_args
from t3d.evaluate.joint import pool_tiles, regions_from_features, sentence_embeddings, study_embeddings
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
    files = ["image.npy", "features.npy"]
    sentence = jm.has_joint_space and jm.sentence_aligned
    if sentence:  # what the sentence score reads: every region, and their mean direction as a summary
        regions = regions_from_features(jm, run.dataset(got), per_study)
        image = F.normalize(torch.stack([r.mean(dim=0) for r in regions]), dim=-1)
        np.save(out / "regions.npy", torch.cat(regions).numpy().astype(np.float32))
        np.save(out / "region_rows.npy", np.repeat(np.arange(len(got)), [len(r) for r in regions]).astype(np.int32))
        files += ["regions.npy", "region_rows.npy"]
    elif jm.spec.tiles:  # the study embedding training optimised: attention pooling of the tiles
        image = pool_tiles(jm, run.dataset(got), per_study)
    else:  # (N, E): the study embedding pre-training aligned with the reports
        image = study_embeddings(jm, per_study)
    np.save(out / "image.npy", image.numpy().astype(np.float32))
    np.save(out / "features.npy", features.numpy().astype(np.float32))
    has_text = np.zeros(len(got), dtype=bool)
    if jm.has_joint_space:
        text_ids, reports = report_texts(cache, jm.cfg.text.sections, got)
        text = np.full((len(got), image.shape[1]), np.nan, dtype=np.float32)
        position = {i: n for n, i in enumerate(got)}
        rows = np.array([position[i] for i in text_ids], dtype=np.int64)
        if sentence:
            sent, owner = torch.zeros(0, image.shape[1]), torch.zeros(0, dtype=torch.long)
            if reports:
                sent, owner = sentence_embeddings(jm, reports, cache / "text", run.request.text_model or None)
                summary = torch.zeros(len(reports), sent.shape[1]).index_add_(0, owner, sent)
                text[rows] = F.normalize(summary, dim=-1).numpy()
            np.save(out / "sentences.npy", sent.numpy().astype(np.float32))
            np.save(out / "sentence_rows.npy", rows[owner.numpy()].astype(np.int32))
            files += ["sentences.npy", "sentence_rows.npy"]
        elif reports:
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
        "scores": ("sentence" if sentence else "global") if jm.has_joint_space else None,
        "input": "whole volume"
        if jm.spec.whole_volume
        else f"grid crops {list(jm.cfg.crops.size)}, <= {run.dataset(got).max_crops}",
        "files": files + ["ids.json", "index.csv"],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
