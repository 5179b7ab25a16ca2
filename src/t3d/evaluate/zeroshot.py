"""Zero-shot finding classification in the joint image-text space (docs/method.md §6), CheXzero-style prompt pairs.

For each finding, positive prompts ("There is {finding}.") and negative prompts ("There is no {finding}.") are
embedded by the checkpoint's text path and averaged per side (prompt ensemble: mean of unit vectors, renormalised,
as CLIP does); a study's score is the softmax over (positive, negative) of its similarities, i.e.
``sigmoid(s * (u·t_pos - u·t_neg))`` with the learnt logit scale ``s``.

Prompts YAML (all keys optional)::

    templates:                 # used for every finding without its own prompts; "{}" is the finding phrase
      positive: ["There is {}.", "{} is present."]
      negative: ["There is no {}.", "No {} is seen."]
    names:                     # CSV column -> phrase put into the templates (default: the column, lower case)
      Lung nodule: a lung nodule
    findings:                  # explicit prompts for one finding
      Emphysema: {positive: ["Emphysematous changes."], negative: ["No emphysema."]}
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from t3d.config import ConfigError
from t3d.configfile import dataclass_from_args
from t3d.data.labels import prepare_label_cache, read_labels
from t3d.data.manifest import id_mismatch
from t3d.evaluate.joint import logit_scale, text_embeddings
from t3d.evaluate.pipeline import open_run
from t3d.evaluate.report import classification_markdown, plot_roc, write_metrics
from t3d.evaluate.request import StudyRequest
from t3d.metrics import classification_metrics

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = {
    "positive": ["There is {}.", "{} is present.", "Findings consistent with {}."],
    "negative": ["There is no {}.", "No {} is present.", "No evidence of {}."],
}
SIDES = ("positive", "negative")


def finding_phrase(column: str) -> str:
    """``Lung_nodule`` / ``Lung nodule`` -> ``lung nodule``; all-capital words (acronyms) keep their case."""
    words = re.sub(r"[_\s]+", " ", column).strip().split(" ")
    return " ".join(w if w.isupper() and len(w) > 1 else w.lower() for w in words)


def build_prompts(classes: Sequence[str], spec: dict | None = None) -> dict[str, dict[str, list[str]]]:
    """``{finding: {"positive": [...], "negative": [...]}}`` from templates, names and per-finding prompts."""
    spec = spec or {}
    unknown = set(spec) - {"templates", "names", "findings"}
    if unknown:
        raise ConfigError(f"prompts: unknown key(s) {sorted(unknown)}; valid: templates, names, findings")
    templates = {**DEFAULT_TEMPLATES, **(spec.get("templates") or {})}
    for side in SIDES:
        if not templates[side] or any("{}" not in t for t in templates[side]):
            raise ConfigError(f"prompts: templates.{side} must be a non-empty list of strings that contain '{{}}'")
    names, explicit = spec.get("names") or {}, spec.get("findings") or {}
    stray = [k for k in list(names) + list(explicit) if k not in classes]
    if stray:
        log.warning("prompts name findings that are not CSV columns (ignored): %s", ", ".join(stray))
    out = {}
    for c in classes:
        own = explicit.get(c) or {}
        phrase = names.get(c) or finding_phrase(c)
        out[c] = {}
        for side in SIDES:
            texts = own.get(side) or [t.format(phrase) for t in templates[side]]
            out[c][side] = [t[0].upper() + t[1:] for t in texts]
    return out


def load_prompt_spec(path: str | Path | None) -> dict:
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"prompts file {path} must hold a mapping (templates / names / findings)")
    return spec


def ensemble(emb: torch.Tensor) -> torch.Tensor:
    """(T, E) unit prompt embeddings -> (E,) unit mean (CLIP's prompt ensembling)."""
    return F.normalize(emb.mean(dim=0), dim=-1)


def zeroshot_probabilities(image_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> np.ndarray:
    """(N, E) study embeddings, (L, E) positive and negative prompt embeddings -> (N, L) P(finding present).

    Softmax over the pair (positive, negative) of ``scale * cosine``, which equals ``sigmoid(scale * (u·p - u·n))``.
    """
    return pair_probabilities(image_emb @ pos.T, image_emb @ neg.T, scale)


def pair_probabilities(pos_scores: torch.Tensor, neg_scores: torch.Tensor, scale: float) -> np.ndarray:
    """(N, L) scores of the positive and of the negative prompts -> (N, L) softmax P(positive) at ``scale``."""
    logits = scale * torch.stack([pos_scores, neg_scores], dim=-1)  # (N, L, 2)
    return torch.softmax(logits.double(), dim=-1)[..., 0].numpy()


def best_region_scores(regions: list[torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
    """(N, L): per study, each prompt's cosine with the study's best-matching region (``align: sentence``)."""
    return torch.stack([(r @ prompts.T).amax(dim=0) for r in regions])


def prompt_embeddings(jm, prompts: dict, cache_dir: str | Path, text_model: str | None = None):
    """(L, E) positive and (L, E) negative ensembled prompt embeddings, in ``prompts`` order (as sentences for an
    ``align: sentence`` checkpoint)."""
    texts = sorted({t for sides in prompts.values() for side in SIDES for t in sides[side]})
    emb = text_embeddings(jm, texts, cache_dir, text_model=text_model, as_sentences=jm.sentence_aligned)  # (T, E)
    row = {t: n for n, t in enumerate(texts)}
    pick = {side: torch.stack([ensemble(emb[[row[t] for t in p[side]]]) for p in prompts.values()]) for side in SIDES}
    return pick["positive"], pick["negative"]


def run_zeroshot(
    request: StudyRequest,
    labels_csv: str | Path,
    images: str | Path | None = None,
    prompts: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    stratified: bool = False,
) -> dict:
    """Score every labelled study (of the request's split when it names a split file) zero-shot; write the run
    folder."""
    run = open_run(request, joint_space=True)
    jm, out, checkpoint, splits, split = run.jm, run.out, request.checkpoint, request.splits, request.split
    table = read_labels(labels_csv, images)
    prompt_set = build_prompts(table.classes, load_prompt_spec(prompts))
    table = prepare_label_cache(table, run.cache, jm.cfg.preprocess, workers=request.workers)
    wanted = run.wanted()
    ids = [i for i in wanted if i in set(table.ids)] if wanted is not None else list(table.ids)
    if not ids:
        raise ValueError(
            f"no labelled, cached study is in split '{split}' of {splits}: "
            + id_mismatch(list(table.ids), wanted or [], "labelled, cached studies", f"split '{split}' of {splits}")
        )
    pos, neg = prompt_embeddings(jm, prompt_set, run.cache / "text", request.text_model or None)
    scale = logit_scale(jm)
    if jm.sentence_aligned:  # a prompt is one sentence: scored by the study's best region, as in pre-training
        regions, got = run.region_embeddings(ids), list(ids)
        probs = pair_probabilities(best_region_scores(regions, pos), best_region_scores(regions, neg), scale)
    else:
        image_emb, got = run.image_embeddings(ids)
        probs = zeroshot_probabilities(image_emb, pos, neg, scale)
    y = table.labels_of(got)
    result = {
        "task": "zeroshot",
        "checkpoint": str(checkpoint),
        "method": jm.method,
        "step": jm.step,
        "logit_scale": scale,
        "scores": "sentence" if jm.sentence_aligned else "global",
        "classes": table.classes,
        "split": split if splits else "all",
        "test": classification_metrics(y, probs, 0.5, table.classes, n_boot, seed, ci, stratified),
    }
    write_metrics(out, result)
    (out / "prompts.json").write_text(json.dumps(prompt_set, indent=1))
    preamble = [
        f"checkpoint `{checkpoint}` (method {jm.method}, step {jm.step}); {len(got)} studies of split "
        f"'{result['split']}'; logit scale {scale:.1f}",
        "Score = softmax over the (positive, negative) prompt pair; F1/accuracy call a finding present at 0.5.",
    ]
    markdown = classification_markdown("Zero-shot finding classification", result["test"], preamble)
    (out / "report.md").write_text(markdown)
    plot_roc(y, probs, table.classes, out / "roc.png", f"zero-shot ROC ({jm.method})")
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", *[f"p:{c}" for c in table.classes], *[f"y:{c}" for c in table.classes]])
        for i, p, t in zip(got, probs, y):
            writer.writerow([i, *[f"{v:.6f}" for v in p], *[int(v) for v in t]])
    return result


def command(args: argparse.Namespace) -> int:
    """``t3d evaluate zeroshot``."""
    result = run_zeroshot(
        dataclass_from_args(StudyRequest, args), args.data, images=args.images, prompts=args.prompts,
        n_boot=args.n_boot, seed=args.seed, stratified=args.stratified,
    )  # fmt: skip
    macro = result["test"]["macro"]["auroc"]
    print(
        f"evaluate zeroshot [{result['method']}] macro AUROC {macro['value']:.3f} [{macro['low']:.3f}, "
        f"{macro['high']:.3f}] over {result['test']['n_studies']} studies -> {args.out}"
    )
    return 0
