"""Image <-> report retrieval in the joint space (docs/method.md §6): Recall@1/5/10 with bootstrap intervals.

    hits = recall_hits(u @ t.T, ks=(1, 5, 10))       # (Q, 3): 1 where query i's own item is in its top k
    result = retrieval_metrics(u, t, n_boot=1000)    # both directions, intervals, chance k / N
    result = retrieval_from_scores(scores)           # the same from an (N, N) image x report score matrix

Checkpoints trained with ``align: sentence`` are scored as pre-training scored them: each report sentence against
the study's best-matching tile (``t3d.evaluate.joint.sentence_scores``), not by the study embedding ``u``.

Query i (a study's image, or its report) has exactly one correct item: the same study's report (or image).
Ties in similarity are broken at random in expectation, so a collapsed model that gives every item the same score
scores chance, not 1: the hit of query i at k is ``clip((k - g) / (t + 1), 0, 1)`` with ``g`` items scoring higher
and ``t`` others scoring the same as the correct one. Intervals resample the queries (studies) with the gallery
fixed. Identical reports (e.g. several "no acute findings") make the report side ambiguous; their count is reported.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from t3d.configfile import dataclass_from_args
from t3d.evaluate.pipeline import open_run
from t3d.evaluate.report import fmt_interval, write_metrics
from t3d.evaluate.request import StudyRequest
from t3d.evaluate.studies import report_texts
from t3d.metrics import bootstrap_indices, percentile_interval

log = logging.getLogger(__name__)

KS = (1, 5, 10)


def recall_hits(sim: np.ndarray | torch.Tensor, ks: Sequence[int] = KS) -> np.ndarray:
    """(Q, G) similarities with the correct item of query i at column i -> (Q, len(ks)) expected hits in [0, 1]."""
    sim = torch.as_tensor(sim, dtype=torch.float64)
    if sim.ndim != 2 or sim.shape[0] > sim.shape[1]:
        raise ValueError(f"expected (Q, G) similarities with Q <= G (query i matches item i), got {tuple(sim.shape)}")
    q = sim.shape[0]
    correct = sim[torch.arange(q), torch.arange(q)][:, None]  # (Q, 1)
    greater = (sim > correct).sum(dim=1).double()  # (Q,)
    ties = (sim == correct).sum(dim=1).double() - 1.0  # others with the same score
    k = torch.tensor(list(ks), dtype=torch.float64)[None, :]  # (1, len(ks))
    return ((k - greater[:, None]) / (ties[:, None] + 1.0)).clamp(0.0, 1.0).numpy()


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = KS,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    reports: Sequence[str] | None = None,
) -> dict:
    """Recall@k both ways between matched (N, E) image and report embeddings (row i = study i).

    Returns ``{"image_to_report": {"R@k": Interval dict}, "report_to_image": {...}, "chance": {"R@k": k/N},
    "n_studies": N, "duplicate_reports": count, "bootstrap": {...}}``.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image {tuple(image_emb.shape)} and report {tuple(text_emb.shape)} embeddings differ")
    sim = image_emb.double() @ text_emb.double().T  # (N, N): image i vs report j
    return retrieval_from_scores(sim, ks, n_boot, seed, ci, reports)


def retrieval_from_scores(
    sim: torch.Tensor,
    ks: Sequence[int] = KS,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    reports: Sequence[str] | None = None,
) -> dict:
    """``retrieval_metrics`` of a square (N, N) score matrix, image i (row) vs report j (column): for scores that are
    not a dot product of two embeddings (``align: sentence``: ``t3d.evaluate.joint.sentence_scores``)."""
    sim = torch.as_tensor(sim, dtype=torch.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"expected a square (N, N) image x report score matrix, got {tuple(sim.shape)}")
    n = sim.shape[0]
    idx = bootstrap_indices(n, n_boot, seed)
    out: dict = {"n_studies": n, "chance": {f"R@{k}": min(1.0, k / n) for k in ks}}
    for name, s in (("image_to_report", sim), ("report_to_image", sim.T)):
        hits = recall_hits(s, ks)  # (N, len(ks))
        reps = hits[idx].mean(axis=1) if n_boot else np.zeros((0, len(ks)))  # (n_boot, len(ks))
        out[name] = {
            f"R@{k}": percentile_interval(float(hits[:, j].mean()), reps[:, j], ci).as_dict() for j, k in enumerate(ks)
        }
    if reports is not None:
        out["duplicate_reports"] = int(len(reports) - len(set(reports)))
    out["bootstrap"] = {"n_boot": n_boot, "seed": seed, "ci": ci, "resampling": "queries"}
    return out


def retrieval_markdown(title: str, result: dict, preamble: Sequence[str] = ()) -> str:
    """report.md table: one row per direction, one column per k, chance level in the last row."""
    ks = list(result["chance"])
    ci = int(round(100 * result["bootstrap"]["ci"]))
    lines = [f"# {title}", "", *preamble, ""]
    lines.append(f"{result['n_studies']} held-out studies; {ci} % bootstrap intervals over queries.")
    lines += ["", "| direction | " + " | ".join(ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for name in ("image_to_report", "report_to_image"):
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(fmt_interval(result[name][k]) for k in ks) + " |")
    lines.append("| chance (k / N) | " + " | ".join(f"{result['chance'][k]:.3f}" for k in ks) + " |")
    if result.get("duplicate_reports"):
        lines += ["", f"- {result['duplicate_reports']} reports are exact duplicates of another (ambiguous matches)."]
    return "\n".join(lines) + "\n"


def run_retrieval(
    request: StudyRequest, manifest: str | Path, root: str | Path | None = None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Preprocess the held-out manifest like the checkpoint's data, embed images and reports, score recall.

    Writes ``out/metrics.json`` and ``out/report.md``; returns the metrics.
    """
    run = open_run(request, joint_space=True)
    run.prepare_manifest(manifest, root)
    ids, reports = report_texts(run.cache, run.jm.cfg.text.sections, run.wanted())
    if len(ids) < 2:
        raise ValueError(f"retrieval needs at least 2 studies with a report, {manifest} gave {len(ids)}")
    jm = run.jm
    if jm.sentence_aligned:  # the score pre-training optimised: each sentence's best region
        sim = run.sentence_scores(ids, reports)
        result = retrieval_from_scores(sim, n_boot=n_boot, seed=seed, reports=reports)
    else:
        image_emb, _ = run.image_embeddings(ids)
        text_emb = run.text_embeddings(reports)
        result = retrieval_metrics(image_emb, text_emb, n_boot=n_boot, seed=seed, reports=reports)
    result["scores"] = "sentence" if jm.sentence_aligned else "global"
    result.update(checkpoint=str(request.checkpoint), method=jm.method, step=jm.step, manifest=str(manifest))
    write_metrics(run.out, result)
    preamble = [f"checkpoint `{request.checkpoint}` (method {jm.method}, step {jm.step}); manifest `{manifest}`"]
    (run.out / "report.md").write_text(retrieval_markdown("Image-report retrieval", result, preamble))
    return result


def command(args: argparse.Namespace) -> int:
    """``t3d evaluate retrieval``."""
    request = dataclass_from_args(StudyRequest, args)
    result = run_retrieval(request, args.manifest, root=args.root, n_boot=args.n_boot, seed=args.seed)
    for name in ("image_to_report", "report_to_image"):
        recalls = "  ".join(f"{k}={v['value']:.3f}" for k, v in result[name].items())
        print(f"{name.replace('_', ' ')}: {recalls}")
    print("chance: " + "  ".join(f"{k}={v:.3f}" for k, v in result["chance"].items()), f"(N={result['n_studies']})")
    return 0
