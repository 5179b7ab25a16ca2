"""From a ``StudyRequest`` to study embeddings: the one pipeline behind ``t3d embed``, ``t3d evaluate zeroshot`` and
``t3d evaluate retrieval`` (docs/method.md §6).

    run = open_run(request, joint_space=True)        # output folder, the checkpoint as an evaluator, the cache
    run.prepare_manifest(manifest, root)             # preprocess with the checkpoint's settings (idempotent)
    ids = cached_ids(run.cache, run.wanted())        # the request's split, in cache order
    u, ids = run.image_embeddings(ids)               # (N, E) unit norm, over each study's deterministic grid
    t = run.text_embeddings(reports)                 # (M, E) unit norm, through the checkpoint's text path
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from t3d.evaluate.joint import (
    JointModel,
    encode_studies,
    image_embeddings,
    load_joint,
    region_embeddings,
    sentence_embeddings,
    sentence_scores,
    study_dataset,
    text_embeddings,
)
from t3d.evaluate.request import StudyRequest
from t3d.evaluate.studies import prepare_cache, read_split


@dataclass
class StudyRun:
    """An opened request: where results go, the checkpoint as an evaluator, and the preprocessed cache."""

    request: StudyRequest
    jm: JointModel
    out: Path
    cache: Path

    def wanted(self) -> list[str] | None:
        """Ids of the request's split (None: every study)."""
        return read_split(self.request.splits, self.request.split) if self.request.splits else None

    def prepare_manifest(self, manifest: str | Path, root: str | Path | None = None) -> None:
        """Preprocess a manifest's studies into the cache with the checkpoint's settings."""
        prepare_cache(manifest, self.cache, self.jm.cfg.preprocess, root=root, workers=self.request.workers)

    def encode(self, ids: list[str], crop_fn: Callable[[torch.Tensor], torch.Tensor], desc: str):
        """``crop_fn`` over each study's grid crops: (per-study (K, D) outputs, ids in the same order)."""
        data = self.dataset(ids)
        return encode_studies(data, crop_fn, self.jm.device, self.request.crop_batch, self.request.workers, desc=desc)

    def image_embeddings(self, ids: list[str]) -> tuple[torch.Tensor, list[str]]:
        """(N, E) unit-norm study embeddings of ``ids`` and the ids in their order (the same as given)."""
        emb, got = image_embeddings(self.jm, self.dataset(ids), self.request.crop_batch, self.request.workers)
        if got != list(ids):
            raise RuntimeError("study embeddings came back in another order than the studies were given")
        return emb, got

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(M, E) unit-norm joint-space embeddings of ``texts`` (features cached under the cache's ``text/``)."""
        return text_embeddings(self.jm, texts, self.cache / "text", text_model=self.request.text_model or None)

    def region_embeddings(self, ids: list[str]) -> list[torch.Tensor]:
        """Per study of ``ids`` (in that order), its (K, E) unit-norm region embeddings (``align: sentence``)."""
        regions, got = region_embeddings(self.jm, self.dataset(ids), self.request.crop_batch, self.request.workers)
        if got != list(ids):
            raise RuntimeError("region embeddings came back in another order than the studies were given")
        return regions

    def sentence_scores(self, ids: list[str], texts: list[str]) -> torch.Tensor:
        """(N, M) ``align: sentence`` scores of studies ``ids`` vs ``texts``: each sentence's best region."""
        text_model = self.request.text_model or None
        sent, owner = sentence_embeddings(self.jm, texts, self.cache / "text", text_model=text_model)
        return sentence_scores(self.region_embeddings(ids), sent, owner, len(texts))

    def dataset(self, ids: list[str]):
        r = self.request
        return study_dataset(self.jm.cfg, self.jm.spec, self.cache, ids, overlap=r.overlap, max_crops=r.max_crops)


def open_run(request: StudyRequest, joint_space: bool = False) -> StudyRun:
    """Create the output folder and load the checkpoint; ``joint_space``: refuse checkpoints without a text head."""
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    jm = load_joint(request.checkpoint)
    if joint_space:
        jm.require_joint_space()
    return StudyRun(request, jm, out, Path(request.cache) if request.cache else out / "cache")
