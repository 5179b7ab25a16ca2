"""Which studies of which checkpoint to embed, and how: the request shared by ``t3d embed``, ``t3d evaluate
zeroshot`` and ``t3d evaluate retrieval`` (their common flags are derived from it).

    request = StudyRequest(checkpoint="runs/pretrain", out="runs/eval/retrieval", splits="splits.json")
    add_dataclass_arguments(parser, StudyRequest, required=("checkpoint", "out"))   # --checkpoint, --max-crops, ...

This module imports nothing heavy, so command-line help is built without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from t3d.configfile import ConfigError


@dataclass
class StudyRequest:
    """A checkpoint, the output folder, the studies to use and how each study is tiled and encoded."""

    checkpoint: str = ""
    """Pre-training checkpoint (.pt file or run folder)."""
    out: str = ""
    """Output folder."""
    cache: str = ""
    """Preprocessed cache to write or reuse (empty: OUT/cache)."""
    splits: str = ""
    """JSON split file; only the studies of --split are used (empty: every study)."""
    split: str = "test"
    """Split of --splits to use."""
    max_crops: int = 27
    """Grid crops per study at most."""
    overlap: float = 0.25
    """Overlap of neighbouring grid crops, as a fraction of the crop size."""
    crop_batch: int = 8
    """Crops per forward pass."""
    workers: int = 2
    """Preprocessing and loading processes."""
    text_model: str = ""
    """Local copy of the checkpoint's text encoder, if the path stored in the checkpoint moved."""

    def __post_init__(self) -> None:
        if not self.checkpoint or not self.out:
            raise ConfigError("a study request needs a checkpoint (.pt file or run folder) and an output folder")
        if self.max_crops < 1 or self.crop_batch < 1 or self.workers < 0:
            raise ConfigError(
                f"max_crops and crop_batch must be >= 1 and workers >= 0, got {self.max_crops}, {self.crop_batch}, "
                f"{self.workers}"
            )
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap must be in [0, 1) (fraction of the crop size), got {self.overlap}")
