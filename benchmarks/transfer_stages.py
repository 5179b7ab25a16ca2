"""What each stage of the transfer benchmark runs: the package's own commands, called in-process.

Every function returns the compact, JSON-ready result the report needs (per-case scores, per-study probabilities,
curves); ``transfer.py`` stores it as the stage's ``result.json`` and skips the stage when that file exists.

    run_pretrain_stage(pcfg)                    # t3d.pretrain.main.run_pretrain(cfg, resume=True)
    run_seg_stage(seg_cfg)                      # t3d.finetune.seg.run_seg
    run_cls_stage(cls_cfg)                      # t3d.finetune.cls.run_cls (probe or fine-tune)
    run_zeroshot_stage(...), run_retrieval_stage(...)   # t3d.evaluate
    text_diagnostic(run_dir, cache, ids, ...)   # restoration error with the true vs a shuffled report
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from t3d import distributed as dist
from t3d.config import PretrainConfig
from t3d.data.crops import CropDataset
from t3d.evaluate.joint import load_joint
from t3d.evaluate.request import StudyRequest
from t3d.evaluate.retrieval import run_retrieval
from t3d.evaluate.studies import report_texts
from t3d.evaluate.zeroshot import run_zeroshot
from t3d.finetune.cls import run_cls
from t3d.finetune.seg import run_seg
from t3d.losses import restoration_loss
from t3d.pretrain.main import run_pretrain
from t3d.text import load_text_features


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- pre-training


def run_pretrain_stage(cfg: PretrainConfig) -> dict:
    """Pre-train (resuming from the run folder's latest checkpoint, if any); return final terms and the curves."""
    summary = run_pretrain(cfg, resume=True)
    run_dir = Path(summary["run_dir"])
    rows = read_jsonl(run_dir / "log.jsonl") if (run_dir / "log.jsonl").is_file() else []
    keep = ("step", "loss", "view", "align", "restore", "tau_align", "target_self_prob", "target_entropy")
    batch = cfg.train.batch_size * dist.world_size()
    final = {k: float(v) for k, v in summary["final"].items() if isinstance(v, int | float)}
    if not final and rows:  # the run had finished before (e.g. pre-trained with torchrun): its last logged window
        final = {k: float(v) for k, v in rows[-1].items() if k != "step" and isinstance(v, int | float)}
    return {
        "run_dir": str(run_dir),
        "steps": cfg.train.steps,
        "batch": batch,
        "log_b": math.log(batch),
        "final": final,
        "curve": [{k: r[k] for k in keep if k in r} for r in rows],
    }


# ----------------------------------------------------------------------------------------------- downstream


def fresh_folder(out: Path) -> None:
    """Remove what a killed, non-resumable run left in ``out`` (the stage had not written its result)."""
    if out.exists():
        shutil.rmtree(out)


def run_seg_stage(cfg) -> dict:
    """Segmentation fine-tune + test (``run_seg``); per-case Dice and small-lesion scores of the test studies."""
    fresh_folder(Path(cfg.out))
    metrics = run_seg(cfg)
    test = metrics["test"]
    keep = ("id", "dice", "small_lesion_dice", "small_lesions")
    cases = [{k: c[k] for k in keep} for c in test["cases"]]
    return {
        "labels": metrics["labels"],
        "lesion_labels": test.get("lesion_labels"),
        "cases": cases,
        "dice_mean": test.get("dice_mean"),
        "dice_per_class": test.get("dice_per_class"),
        "small_lesion_dice": test.get("small_lesion_dice"),
        "small_lesions": test.get("small_lesions"),
        "n_train": metrics["n_train"],
        "n_val": metrics["n_val"],
        "n_test": metrics["n_test"],
        "init_name": metrics["init_name"],
    }


def test_scores(path: Path, classes: list[str], split: str | None = "test") -> tuple[list[str], list, list]:
    """(ids, y (N, L), p (N, L)) of a ``predictions.csv`` (split column) or ``scores.csv`` (no split column)."""
    ids, y, p = [], [], []
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            if split is not None and row.get("split", split) != split:
                continue
            ids.append(row["id"])
            y.append([int(row[f"y:{c}"]) for c in classes])
            p.append([float(row[f"p:{c}"]) for c in classes])
    return ids, y, p


def run_cls_stage(cfg) -> dict:
    """Classification (linear probe or fine-tune, ``run_cls``); per-study test probabilities."""
    result = run_cls(cfg)
    ids, y, p = test_scores(Path(cfg.out) / "predictions.csv", result["classes"])
    return {
        "mode": result["mode"],
        "classes": result["classes"],
        "ids": ids,
        "y": y,
        "p": p,
        "macro_auroc": result["test"]["macro"]["auroc"],
        "probe_l2": result.get("probe_l2"),
        "splits": result["splits"],
    }


def run_zeroshot_stage(request: StudyRequest, labels: str, images: str | None, n_boot: int, seed: int) -> dict:
    """Zero-shot finding classification (``run_zeroshot``); per-study scores of the evaluated split."""
    result = run_zeroshot(request, labels, images=images, n_boot=n_boot, seed=seed)
    out = Path(request.out)
    ids, y, p = test_scores(out / "scores.csv", result["classes"], split=None)
    return {"classes": result["classes"], "ids": ids, "y": y, "p": p, "macro_auroc": result["test"]["macro"]["auroc"]}


def run_retrieval_stage(request: StudyRequest, manifest: str, root: str | None, n_boot: int, seed: int) -> dict:
    """Image <-> report retrieval on held-out studies (``run_retrieval``)."""
    result = run_retrieval(request, manifest, root=root, n_boot=n_boot, seed=seed)
    keys = ("image_to_report", "report_to_image", "chance", "n_studies", "duplicate_reports")
    return {k: result[k] for k in keys if k in result}


# ----------------------------------------------------------------------------------------------- text diagnostic


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation without fixed points: study ``order[i]`` gets the report of ``order[i + 1]``."""
    if n < 2:
        raise ValueError("a shuffled-report control needs at least 2 studies")
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def report_conditions(jm, reports: list[str], cache: Path) -> dict[str, torch.Tensor]:
    """The decoder's conditioning inputs for ``reports``, as pre-training builds them: centred, normalised frozen
    embeddings ``frozen`` (N, Et), plus ``tokens`` / ``token_mask`` for a cross-attention decoder."""
    tokens = jm.model.conditioning == "cross_attention"
    feats = load_text_features(reports, jm.cfg.text, cache / "text", tokens=tokens, progress=False)
    text = {"frozen": F.normalize(feats.pooled.float() - jm.text_mean, dim=-1)}  # (N, Et)
    if tokens:
        text.update(tokens=feats.tokens.float(), token_mask=feats.token_mask)
    return text


def one_report(jm, text: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Report ``row`` of ``report_conditions`` as a one-study batch; an ``align: sentence`` model's forward also
    reads sentences (its alignment outputs, which the restoration branch does not use): the report as one sentence."""
    cond = {k: v[row : row + 1] for k, v in text.items()}
    if jm.sentence_aligned:
        cond.update(sent=cond["frozen"], sent_owner=torch.zeros(1, dtype=torch.long))
    return cond


def restoration_batch(jm, item: dict) -> dict[str, torch.Tensor]:
    """A one-study batch of ``item``'s crop views; tiled models also get those crops as the study's tiles (the
    restoration branch never reads them, but the forward builds the study embedding from them)."""
    views = item["views"][None]
    batch = {"views": views, "index": torch.tensor([item["index"]])}
    if jm.spec.tiles:
        k = views.shape[1]
        batch.update(tiles=views[:, :, 0], tile_pos=torch.zeros(1, k, 3), tile_mask=torch.ones(1, k))
    return batch


@torch.no_grad()
def text_diagnostic(run_dir: Path, cache: Path, ids: list[str] | None, repeats: int = 1, seed: int = 0) -> dict:
    """Does the decoder use the report? Masked-voxel L1 of restoring held-out crops with each study's own report vs
    with another study's report (a derangement), the same crops and masks in both conditions.

    Returns per-study mean L1 (``true``, ``shuffled``) over ``repeats`` draws of crop sites and masks.
    """
    jm = load_joint(run_dir, device=torch.device("cpu"))
    model = jm.model
    if model.decoder is None:
        raise ValueError(f"{run_dir}: method {jm.method} has no restoration decoder; the diagnostic needs one")
    ids, reports = report_texts(cache, jm.cfg.text.sections, ids)
    text = report_conditions(jm, reports, Path(cache))
    perm = torch.from_numpy(derangement(len(ids), seed))
    row = {i: n for n, i in enumerate(ids)}
    data = CropDataset(cache, replace(jm.cfg.crops, augment=False), ids=ids, seed=seed)
    errors = {"true": np.zeros((repeats, len(ids))), "shuffled": np.zeros((repeats, len(ids)))}
    for r in range(repeats):
        data.set_epoch(r)
        for item in data:
            n = row[item["id"]]
            batch = restoration_batch(jm, item)
            for name, source in (("true", n), ("shuffled", int(perm[n]))):
                cond = one_report(jm, text, source)
                generator = torch.Generator().manual_seed(seed * 1_000_003 + r * 1009 + n)  # same mask both times
                out = model(batch, cond, generator=generator)
                errors[name][r, n] = float(restoration_loss(out["restored"], out["target"], out["mask"], 0.0))
    return {
        "ids": ids,
        "true": errors["true"].mean(axis=0).tolist(),
        "shuffled": errors["shuffled"].mean(axis=0).tolist(),
        "conditioning": model.conditioning,
        "repeats": repeats,
        "derangement_seed": seed,
    }
