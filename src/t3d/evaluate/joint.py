"""A pre-training checkpoint as an evaluator: study features, study embeddings and text embeddings (docs/method.md §6).

    jm = load_joint("runs/pretrain")                               # run folder or .pt file
    data = study_dataset(jm.cfg, jm.spec, "cache", ids)            # grid crops (whole volume for ``clip``)
    u, ids = image_embeddings(jm, data)                            # (N, E) unit norm: model.study_embedding
    t = text_embeddings(jm, ["There is a nodule."], "text_cache")  # (M, E) unit norm
    # align: sentence checkpoints score a study-text pair through the text's sentences and the study's regions:
    regions, ids = region_embeddings(jm, data)                   # per study (K_s, E): its tiles in the joint space
    scores = sentence_scores(regions, *sentence_embeddings(jm, texts, "text_cache"), len(texts))  # (N, M)

A study embedding is built by the function pre-training aligned with the reports (``PretrainModel.study_embedding``
of the study's pooled crop features), here over the deterministic grid of ``t3d.data.grid`` instead of random
sites. Tiled methods (``spec.tiles``) were trained on that very grid: evaluation uses the checkpoint's
``tiles.overlap`` and ``tiles.max_tiles`` (whatever the caller asks for) and the checkpoint's attention pooling, so
``u`` is the function training optimised. Text goes
through the same frozen encoder the checkpoint was trained with, is centred by the checkpoint's ``text_mean`` (the
pre-training corpus mean, not the mean of the new texts: a handful of prompts has a very different mean) and is
projected by the text head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from t3d.checkpoint import load_checkpoint
from t3d.config import PretrainConfig, TextConfig, from_dict
from t3d.data.crops import WholeVolumeDataset
from t3d.data.grid import GridCropDataset
from t3d.losses import MethodSpec, method_spec, sentence_similarity
from t3d.pretrain.model import PretrainModel
from t3d.text import load_text_features

log = logging.getLogger(__name__)


@dataclass
class JointModel:
    """A loaded pre-training checkpoint (model in eval mode on ``device``)."""

    path: str
    cfg: PretrainConfig
    spec: MethodSpec
    model: PretrainModel
    text_mean: torch.Tensor
    """(Et,) mean of the frozen report embeddings of the pre-training corpus."""
    text_model: str
    """Id of the frozen text encoder the checkpoint was trained with."""
    step: int
    device: torch.device
    sent_mean: torch.Tensor | None = None
    """(Et,) mean of the frozen *sentence* embeddings of the pre-training corpus (``align: sentence`` checkpoints)."""

    @property
    def sentence_aligned(self) -> bool:
        """Trained with ``align: sentence``: a report meets a study through its sentences' best tiles, not ``u``."""
        return self.spec.align == "sentence"

    def require_sent_mean(self) -> torch.Tensor:
        """The sentence-corpus mean, or a clear error for a checkpoint trained without sentences."""
        if self.sent_mean is None:
            raise ValueError(f"{self.path} has no sent_mean: it was not trained with align: sentence by this version")
        return self.sent_mean

    @property
    def method(self) -> str:
        return self.spec.name

    @property
    def has_joint_space(self) -> bool:
        return self.model.text_head is not None

    def require_joint_space(self) -> None:
        """Raise for checkpoints trained without image-text alignment (vssl, t3d-no-align, ...)."""
        if not self.has_joint_space:
            raise ValueError(
                f"checkpoint {self.path} (method '{self.method}') has no joint image-text space: it was pre-trained "
                "without image-report alignment, so zero-shot classification and retrieval are undefined; use "
                "`t3d finetune cls --probe` to evaluate its encoder, or a checkpoint of t3d, t3d-hard, clip, ..."
            )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_joint(path: str | Path, device: torch.device | None = None, state: dict | None = None) -> JointModel:
    """Rebuild ``PretrainModel`` from a checkpoint file or run folder (strict key matching), in eval mode;
    ``state``: that checkpoint, already read."""
    device = device or default_device()
    state = load_checkpoint(path) if state is None else state
    missing = [k for k in ("model", "config", "method") if k not in state]
    if missing:
        raise ValueError(
            f"{path} is not a t3d pre-training checkpoint (no {', '.join(missing)}); pass a file written by "
            "`t3d pretrain` (its run folder or checkpoints/*.pt)"
        )
    cfg = from_dict(PretrainConfig, state["config"])
    spec = method_spec(state["method"])
    text_mean = state.get("text_mean")
    if text_mean is None:
        raise ValueError(f"{path} has no text_mean; it was not written by `t3d pretrain` of this version")
    model = PretrainModel(cfg, spec, text_dim=len(text_mean), num_findings=len(state.get("finding_classes", ())))
    model.load_state_dict(state["model"], strict=True)
    model.to(device).eval()
    log.info("loaded %s: method %s, step %s", path, spec.name, state.get("step"))
    return JointModel(
        path=str(path),
        cfg=cfg,
        spec=spec,
        model=model,
        text_mean=text_mean.float(),
        text_model=str(state.get("text_model", "")),
        step=int(state.get("step", 0)),
        device=device,
        sent_mean=None if state.get("sent_mean") is None else state["sent_mean"].float(),
    )


def study_dataset(
    cfg: PretrainConfig,
    spec: MethodSpec,
    cache: str | Path,
    ids: list[str] | None = None,
    overlap: float = 0.25,
    max_crops: int = 27,
) -> Dataset:
    """How the checkpoint's encoder sees a whole study: grid crops at its crop size and windows, or for a
    whole-volume method (``clip``) the whole volume resized to its ``clip.grid``. Tiled methods: the training
    tiles (``tiles.overlap``, ``tiles.max_tiles``); ``overlap`` and ``max_crops`` are then ignored."""
    if spec.whole_volume:
        return WholeVolumeDataset(cache, grid=cfg.clip.grid, windows=cfg.crops.windows, ids=ids)
    if spec.tiles:
        overlap, max_crops = cfg.tiles.overlap, cfg.tiles.max_tiles
    return GridCropDataset(cache, cfg.crops.size, cfg.crops.windows, ids=ids, overlap=overlap, max_crops=max_crops)


def study_crops(item: dict) -> torch.Tensor:
    """The (K, C, D, H, W) inputs of one dataset item: its grid crops, or its whole volume as K = 1."""
    return item["crops"] if "crops" in item else item["volume"][None]


def autocast_for(device: torch.device):
    """bf16 autocast on GPU (as pre-training's ``precision: auto``), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def encode_studies(
    dataset: Dataset,
    crop_fn: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    crop_batch: int = 8,
    workers: int = 0,
    desc: str = "encode studies",
) -> tuple[list[torch.Tensor], list[str]]:
    """Per study, ``crop_fn`` of its crops in chunks of ``crop_batch``: ([(K_s, F) float32 on CPU], ids)."""
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)
    feats, ids = [], []
    for item in tqdm(loader, desc=desc, unit="study"):
        crops = study_crops(item)
        with autocast_for(device):
            out = [crop_fn(chunk.to(device, non_blocking=True)) for chunk in crops.split(crop_batch)]
        feats.append(torch.cat(out).float().cpu())
        ids.append(item["id"])
    return feats, ids


def image_embeddings(
    jm: JointModel, dataset: Dataset, crop_batch: int = 8, workers: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """Study embeddings (N, E), unit norm: the checkpoint's own ``study_embedding`` (the function pre-training
    aligned with the reports) of each study's pooled crop features, or for tiled methods the attention pooling of the
    study's tile features (``pool_tiles``)."""
    model = jm.model
    if jm.spec.tiles:
        per_study, ids = encode_studies(dataset, model.tile_features, jm.device, crop_batch, workers, desc="tiles")
        return pool_tiles(jm, dataset, per_study), ids

    def crop_fn(x: torch.Tensor) -> torch.Tensor:
        return model.encoder.pool(model.encoder.forward_features(x))  # (K, C)

    per_study, ids = encode_studies(dataset, crop_fn, jm.device, crop_batch, workers, desc="image embeddings")
    return study_embeddings(jm, per_study), ids


@torch.no_grad()
def study_embeddings(jm: JointModel, pooled: list[torch.Tensor]) -> torch.Tensor:
    """(N, E) float32 on CPU: ``PretrainModel.study_embedding`` of each study's pooled crop features (K_s, C)."""
    return torch.cat([jm.model.study_embedding(p[None].to(jm.device)).float().cpu() for p in pooled])


@torch.no_grad()
def pool_tiles(jm: JointModel, dataset: GridCropDataset, per_study: list[torch.Tensor]) -> torch.Tensor:
    """Study embeddings (N, E) of a tiled checkpoint from each study's tile features (K_s, F), in dataset order:
    the checkpoint's ``TilePooling`` with the tiles' body positions, as in pre-training."""
    out = []
    for index, feats in enumerate(per_study):
        pos = torch.from_numpy(dataset.positions(index))[None].to(jm.device)
        out.append(jm.model.tile_pool(feats[None].to(jm.device), pos).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def region_embeddings(
    jm: JointModel, dataset: Dataset, crop_batch: int = 8, workers: int = 0
) -> tuple[list[torch.Tensor], list[str]]:
    """Per study, (K_s, E) unit-norm joint-space embeddings of its regions, and the ids, in dataset order: what
    ``align: sentence`` matched each sentence against in pre-training (``regions_from_features``)."""
    require_regions(jm)  # before encoding
    per_study, ids = encode_studies(dataset, jm.model.tile_features, jm.device, crop_batch, workers, desc="regions")
    return regions_from_features(jm, dataset, per_study), ids


@torch.no_grad()
def regions_from_features(jm: JointModel, dataset: Dataset, per_study: list[torch.Tensor]) -> list[torch.Tensor]:
    """Region embeddings (K_s, E), unit norm, from each study's pooled encoder features (K_s, F) in dataset order:
    the tiles of a tiled checkpoint (``TilePooling.tile_embeddings`` with their body positions) or the grid crops
    through the crop head of a crop checkpoint."""
    require_regions(jm)
    model = jm.model
    if jm.spec.tiles:
        out = []
        for index, feats in enumerate(per_study):
            pos = torch.from_numpy(dataset.positions(index))[None].to(jm.device)
            out.append(model.tile_pool.tile_embeddings(feats[None].to(jm.device), pos)[0].float().cpu())
        return out
    return [model.image_head(feats.to(jm.device)).float().cpu() for feats in per_study]


def require_regions(jm: JointModel) -> None:
    """A clear error for a checkpoint whose regions have no joint-space embedding (neither tiles nor a crop head)."""
    if not jm.spec.tiles and jm.model.image_head is None:
        raise ValueError(f"checkpoint {jm.path} (method '{jm.method}') has no per-region embedding")


@torch.no_grad()
def sentence_embeddings(
    jm: JointModel, texts: list[str], cache_dir: str | Path, text_model: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, E) unit-norm joint-space embeddings of the sentences of ``texts`` and (S,) the text each belongs to (every
    text owns >= 1): frozen encoder -> centre by the checkpoint's sentence-corpus mean -> normalise -> text head."""
    jm.require_joint_space()
    mean = jm.require_sent_mean()
    feats = load_text_features(list(texts), text_config(jm, text_model), cache_dir, sentences=True)
    frozen = F.normalize(feats.sent.float() - mean, dim=-1)  # (S, Et)
    return jm.model.text_head(frozen.to(jm.device)).float().cpu(), feats.sent_owner.long().cpu()


def sentence_scores(regions: list[torch.Tensor], sent: torch.Tensor, owner: torch.Tensor, n_texts: int) -> torch.Tensor:
    """(N studies, M texts) scores of ``align: sentence``: mean over a text's sentences of its best region's cosine
    (``t3d.losses.sentence_similarity``, the pre-training score; studies with fewer regions padded and masked)."""
    width = max(len(r) for r in regions)
    z = torch.zeros(len(regions), width, sent.shape[1])
    mask = torch.zeros(len(regions), width, dtype=torch.bool)
    for i, r in enumerate(regions):
        z[i, : len(r)], mask[i, : len(r)] = r, True
    return sentence_similarity(z, sent, owner, n_texts, mask).T  # (N, M)


def text_config(jm: JointModel, model: str | None = None) -> TextConfig:
    """The checkpoint's text settings, optionally pointing at another copy of the same encoder (``model``)."""
    return replace(jm.cfg.text, model=model) if model else jm.cfg.text


@torch.no_grad()
def text_embeddings(
    jm: JointModel, texts: list[str], cache_dir: str | Path, text_model: str | None = None, as_sentences: bool = False
) -> torch.Tensor:
    """(M, E) unit-norm joint-space embeddings of ``texts``: frozen encoder -> centre by the checkpoint's corpus
    mean -> normalise -> text head (the pre-training path of ``TextLookup``). ``as_sentences``: each text is one
    sentence of an ``align: sentence`` checkpoint (a zero-shot prompt), centred by the sentence-corpus mean."""
    jm.require_joint_space()
    mean = jm.require_sent_mean() if as_sentences else jm.text_mean
    feats = load_text_features(list(texts), text_config(jm, text_model), cache_dir)
    if jm.text_model and feats.model_id != jm.text_model:
        raise ValueError(
            f"checkpoint {jm.path} was trained with text encoder '{jm.text_model}' but text.model resolves to "
            f"'{feats.model_id}'; pass --text-model pointing at the same weights"
        )
    frozen = F.normalize(feats.pooled.float() - mean, dim=-1)  # (M, Et)
    return jm.model.text_head(frozen.to(jm.device)).float().cpu()  # (M, E)


def logit_scale(jm: JointModel) -> float:
    """The learnt inverse temperature 1/tau of the alignment logits."""
    jm.require_joint_space()
    return float(jm.model.logit_scale().detach())
