"""Typed configuration: dataclasses are the single source of truth, YAML sets values, dotted flags override.

    cfg = load_config(PretrainConfig, "configs/quickstart.yaml", ["--train.lr", "1e-4", "--crops.size=[64,64,64]"])
    save_config(cfg, run_dir / "config.yaml")

Unknown keys are errors that list the valid names; values are coerced to the annotated type (tuples from YAML
lists, floats from ints, ``None`` from ``null``/``native``) and each dataclass checks itself in ``__post_init__``.
The sections live by phase: ``inputs`` (preprocessing, crops, data, text), ``model`` (encoder, losses, tiles, clip)
and here the training loop and ``PretrainConfig``, which holds them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from t3d.config.inputs import (
    DEFAULT_WINDOWS,
    FLIP_AXES,
    RAS_AXES,
    CropConfig,
    DataConfig,
    PreprocessConfig,
    TextConfig,
    check_choice,
)
from t3d.config.model import ENCODER_PRESETS, ClipConfig, LossConfig, ModelConfig, TileConfig
from t3d.configfile import ConfigError, from_dict, load_config, parse_overrides, save_config, to_dict

__all__ = [
    "DEFAULT_WINDOWS",
    "ENCODER_PRESETS",
    "FLIP_AXES",
    "METHODS",
    "QUICKSTART_CONFIG",
    "RAS_AXES",
    "ClipConfig",
    "ConfigError",
    "CropConfig",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "PreprocessConfig",
    "PretrainConfig",
    "TextConfig",
    "TileConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]

QUICKSTART_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "quickstart.yaml"
"""The CPU quick-start pre-training config of a source checkout (``t3d demo``'s default)."""

RETIRED_METHODS = {
    "t3d-tiles": "the tiled study path is t3d's own now: use method t3d (the random-crop study path is t3d-crops)",
    "t3d-sentence-tiles": "the tiled study path is t3d's own now: use method t3d-sentence "
    "(the random-crop sentence variant is t3d-crops-sentence)",
}
"""Method names of older configs, with what to use instead."""

METHODS = (
    "t3d",
    "t3d-crops",
    "t3d-no-align",
    "t3d-hard",
    "t3d-sentence",
    "t3d-crops-sentence",
    "t3d-cross-attention",
    "t3d-uncond",
    "vssl",
    "vssl-contrastive",
    "vssl-restore",
    "clip",
    "supervised",
)


@dataclass
class TrainConfig:
    """Optimisation and run bookkeeping."""

    out: str = "runs/pretrain"
    """Run folder: config, checkpoints, TensorBoard events, JSONL log, loss curve."""
    steps: int = 1000
    batch_size: int = 8
    """B per process (studies); the contrastive batch is B x world size."""
    accumulate: int = 1
    """Gradient accumulation steps per optimiser step."""
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``bf16``, ``fp16`` (with a gradient scaler) or ``fp32``."""
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    """Older step checkpoints beyond this many are deleted (the final one is always kept)."""

    def __post_init__(self) -> None:
        check_choice("train.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        if self.steps < 1 or self.batch_size < 1 or self.accumulate < 1:
            raise ConfigError("train.steps, train.batch_size and train.accumulate must be >= 1")
        for name in ("log_every", "checkpoint_every"):  # step % value: 0 is a division by zero
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.keep_checkpoints < 0 or not self.grad_clip >= 0:
            raise ConfigError(
                "train.lr must be > 0, train.warmup_steps, train.keep_checkpoints and train.grad_clip >= 0; got "
                f"{self.lr}, {self.warmup_steps}, {self.keep_checkpoints}, {self.grad_clip}"
            )


@dataclass
class PretrainConfig:
    """Everything ``t3d pretrain`` needs; saved into every run folder and checkpoint."""

    method: str = "t3d"
    """One of docs/method.md §5: t3d, vssl, vssl-contrastive, vssl-restore, clip, the t3d ablations, and the
    ``supervised`` control (ground-truth findings as targets; needs ``data.findings``)."""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    tiles: TileConfig = field(default_factory=TileConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.method in RETIRED_METHODS:
            raise ConfigError(f"method {self.method!r} was renamed: {RETIRED_METHODS[self.method]}")
        check_choice("method", self.method, METHODS)
        if self.method == "supervised" and not self.data.findings:
            raise ConfigError(
                "method=supervised trains on ground-truth findings: set data.findings to a findings CSV "
                "(CT-RATE multi_abnormality_labels layout) or the ground_truth.jsonl of `t3d synth`"
            )
