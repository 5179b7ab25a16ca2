"""The study classifier: a (pre-trained) 3D encoder, crop features pooled over a study, a linear head
(docs/method.md §6).

    setup = encoder_setup(cfg)                       # architecture + weights from cfg.init (or random)
    model = StudyClassifier(setup.encoder, num_classes=18, pooling="mean")
    logits = model(crops)                            # (B, K, C, D, H, W) -> (B, L)

A study is K crops at full resolution (random foreground sites while training, a deterministic grid at
evaluation); each crop goes through the encoder and its ``pool`` (the embedding that carries the sample), the K
features are averaged (and, with ``meanmax``, max-pooled too) into one study feature, and one linear layer gives a
logit per finding. For a whole-volume encoder (``clip`` checkpoints) K = 1: the whole volume at its small grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from t3d.checkpoint import load_checkpoint
from t3d.config import METHODS, CropConfig, ModelConfig, PreprocessConfig
from t3d.finetune.config import ClsConfig
from t3d.losses import method_spec
from t3d.models import Encoder, build_encoder
from t3d.models.keymap import load_into
from t3d.pretrained import load_pretrained

log = logging.getLogger(__name__)


class FeatureNorm(nn.Module):
    """Fixed standardisation ``(x - mean) / std`` (buffers; identity until ``fit``). A linear probe on frozen
    features needs it (MAE puts a BatchNorm without affine before its probe head); fine-tuning leaves it at identity."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @torch.no_grad()
    def fit(self, feats: Tensor) -> None:
        """Set the statistics from (N, F) training features."""
        self.mean.copy_(feats.mean(dim=0))
        self.std.copy_(feats.std(dim=0, unbiased=False).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class StudyClassifier(nn.Module):
    """Encoder -> per-crop pooled features -> study feature (mean, or mean ++ max over crops) -> linear logits."""

    def __init__(self, encoder: Encoder, num_classes: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "meanmax"):
            raise ValueError(f"pooling must be 'mean' or 'meanmax', got {pooling!r}")
        self.encoder, self.pooling = encoder, pooling
        self.width = encoder.embed_channels * (2 if pooling == "meanmax" else 1)
        self.norm = FeatureNorm(self.width)
        self.head = nn.Linear(self.width, num_classes)

    def crop_features(self, x: Tensor) -> Tensor:
        """(N, C, D, H, W) crops -> (N, F) pooled encoder features."""
        return self.encoder.pool(self.encoder.forward_features(x))

    def pool_study(self, feats: Tensor) -> Tensor:
        """(..., K, F) crop features of a study -> (..., F) or (..., 2F) with ``meanmax``."""
        if self.pooling == "mean":
            return feats.mean(dim=-2)
        return torch.cat([feats.mean(dim=-2), feats.amax(dim=-2)], dim=-1)

    def classify(self, study_feats: Tensor) -> Tensor:
        """(B, F') study features -> (B, L) logits."""
        return self.head(self.norm(study_feats))

    def forward(self, crops: Tensor) -> Tensor:
        b, k = crops.shape[:2]
        feats = self.crop_features(crops.flatten(0, 1)).view(b, k, -1)  # (B*K, C, D, H, W) -> (B, K, F)
        return self.classify(self.pool_study(feats))


@dataclass
class EncoderSetup:
    """What the classifier's input must look like and the encoder that reads it."""

    encoder: Encoder
    model: ModelConfig
    windows: tuple[tuple[float, float], ...]
    """HU windows (low, high), one input channel each, as in pre-training."""
    preprocess: PreprocessConfig
    whole_volume: bool
    """The encoder reads the whole volume resized to ``grid`` (``clip``) instead of crops of size ``grid``."""
    grid: tuple[int, int, int]
    method: str
    """Pre-training method of the weights, or ``random``."""
    load_report: dict

    def crops(self, sites: int) -> CropConfig:
        """Training crop sampling: ``sites`` foreground-biased crops of the encoder's size and windows."""
        return CropConfig(size=self.grid, sites=sites, windows=self.windows)


def encoder_setup(cfg: ClsConfig) -> EncoderSetup:
    """The encoder of ``cfg.init``: a checkpoint / run folder / ``t3d export`` file gives architecture, windows,
    preprocessing, crop size and weights (``t3d.pretrained``); ``random`` uses ``cfg.model`` etc., or
    those of ``cfg.arch_from`` without its weights."""
    source = cfg.init if cfg.init != "random" else cfg.arch_from
    if not source:
        grid = tuple(cfg.crop_size or (96, 96, 96))
        encoder = build_encoder(cfg.model, in_channels=len(cfg.windows), img_size=grid)
        return EncoderSetup(encoder, cfg.model, tuple(cfg.windows), cfg.preprocess, False, grid, "random", {})
    pre = load_pretrained(source)
    whole = pre.method in METHODS and method_spec(pre.method).whole_volume
    grid = whole_volume_grid(source) if whole else tuple(cfg.crop_size or pre.crop_size)
    model = replace(pre.model, grad_checkpointing=cfg.model.grad_checkpointing)
    encoder = build_encoder(model, in_channels=pre.in_channels, img_size=grid)
    report: dict = {"source": str(source)}
    if cfg.init != "random":
        # Strict on the backbone; the pooling norm is in checkpoints but not in `t3d export` files (then it keeps
        # its identity init).
        prefix = "swinViT." if model.encoder == "swinvit" else "resnet."
        report.update(load_into(encoder, pre.state, prefix=prefix, strict=True).as_dict())
        log.info("encoder initialised from %s (method %s, %d tensors)", source, pre.method, report["loaded"])
    method = pre.method if cfg.init != "random" else "random"
    return EncoderSetup(encoder, model, pre.windows, pre.preprocess, whole, grid, method, report)


def whole_volume_grid(source: str) -> tuple[int, int, int]:
    """``clip.grid`` of a whole-volume pre-training run (its encoder saw the whole CT at that size)."""
    if str(source).endswith(".safetensors"):
        raise ValueError(
            f"{source}: an exported encoder of a whole-volume method (clip) does not record its input grid; "
            "fine-tune from the pre-training checkpoint instead"
        )
    return tuple(int(g) for g in load_checkpoint(source)["config"]["clip"]["grid"])
