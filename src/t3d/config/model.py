"""Configuration of the model and its losses: encoder, heads, tiles, the clip baseline (docs/method.md §3, §4)."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from t3d.config.inputs import check_choice
from t3d.configfile import ConfigError

ENCODER_PRESETS = {"swinvit": ("tiny", "small", "base"), "resnet": ("tiny", "10", "18", "50")}
"""Valid ``model.preset`` per ``model.encoder`` (mirrors t3d.models.encoders.PRESETS; a test checks they agree)."""


@dataclass
class ModelConfig:
    """Image encoder, projection heads and restoration decoder (docs/method.md §3)."""

    encoder: str = "swinvit"
    """``swinvit`` (MONAI SwinUNETR's Swin encoder) or ``resnet`` (MONAI 3D ResNet)."""
    preset: str = "tiny"
    """swinvit: ``tiny`` (feature size 12, CPU/tests), ``small`` (24), ``base`` (48); resnet: ``tiny`` (ResNet-10 at
    quarter width, CPU/tests), ``10``, ``18``, ``50``."""
    norm: str = "group"
    """resnet only: its norm layers, ``group`` (8 groups), ``instance`` or ``batch``. ``group`` and ``instance`` do
    not depend on the other samples of a batch, which the tiled study path needs (its chunked gradients are exact
    only then); ``instance`` needs more than one voxel in the deepest (stride 32) map. swinvit always uses LayerNorm,
    which does not depend on the batch either."""
    swin_v2: bool = False
    """swinvit only: SwinUNETR-v2 residual conv block before each stage (load into ``SwinUNETR(use_v2=True)``)."""
    embed_dim: int = 128
    """E: width of the joint image/text space."""
    grad_checkpointing: bool = False
    """Recompute encoder activations in backward to save memory."""
    conditioning: str = "film"
    """Restoration decoder conditioning on the report: ``film``, ``cross_attention`` or ``none``."""
    decoder_finest_skip: int = 2
    """Finest encoder level the restoration decoder fuses as a skip: 0 = the corrupted input itself (SwinUNETR),
    1 = stride 2, 2 = stride 4 (default). Finer skips let the decoder inpaint hidden cubes from the visible voxels
    around them without the encoder's features or the report."""
    finding_level: int = 0
    """``supervised`` control only: what its finding head reads. 0 (default): a linear head on the pooled crop
    feature, the feature the study-level probe reads, trained through every encoder level. 1-5: a multiple-instance
    head on that encoder level (3 = stride 8): each cell gets a logit per finding (1x1x1 convolution) and a crop's
    logit is the largest over its cells, so the cell holding a small lesion decides; the deeper levels, which the
    pooled feature comes from, get no gradient from it (docs/method.md §4)."""

    def __post_init__(self) -> None:
        check_choice("model.encoder", self.encoder, ("swinvit", "resnet"))
        check_choice(f"model.preset (for model.encoder={self.encoder})", self.preset, ENCODER_PRESETS[self.encoder])
        check_choice("model.conditioning", self.conditioning, ("film", "cross_attention", "none"))
        if not 0 <= self.decoder_finest_skip <= 5:
            raise ConfigError(
                f"model.decoder_finest_skip must be an encoder level in [0, 5], got {self.decoder_finest_skip}"
            )
        check_choice("model.norm", self.norm, ("group", "instance", "batch"))
        if not 0 <= self.finding_level <= 5:
            raise ConfigError(
                f"model.finding_level must be an encoder level in [1, 5], or 0 for the pooled feature; got "
                f"{self.finding_level}"
            )


@dataclass
class LossConfig:
    """Loss weights and temperatures (docs/method.md §4)."""

    affinity_threshold: float = 0.9
    """Cosine of the centred frozen report embeddings at or above which two reports are near-duplicates and share
    target mass; a property of the pair, independent of the batch size. Distinct reports get Y = I."""
    affinity_alpha: float = 0.2
    """Share of each row of Y given to the study's near-duplicates (itself included); 0 = hard targets."""
    tau_text: float = 0.05
    """Temperature of the softmax over a study's near-duplicates, ``softmax((S - 1) / tau_text)``."""
    tau_view: float = 0.1
    """Temperature of L_view logits."""
    tau_align: float = 0.07
    """Initial (learnable) temperature of L_align logits."""
    lambda_tcl: float = 1.0
    lambda_align: float = 1.0
    lambda_tir: float = 1.0
    mask_ratio: float = 0.5
    """Fraction of each crop hidden by random cubes for restoration."""
    mask_block: int = 16
    """Edge of the masking cubes in voxels at target spacing, at lesion scale: a cube should hide a whole lesion of
    the size reports describe (mostly 5-30 mm), so that restoring it needs the report rather than the lesion's
    visible rim. 16 voxels at the default 0.8 mm spacing = 12.8 mm in-plane, 24 mm along z; the CPU quickstart's
    2.5 mm voxels take 8 (20 mm)."""
    visible_weight: float = 0.1
    """Weight of the L1 term on visible voxels (masked voxels have weight 1)."""

    RETIRED: typing.ClassVar[dict[str, str]] = {
        "target_self_prob": "Y does not depend on the batch (a self-probability set per batch size rewards collapse); "
        "remove loss.target_self_prob and set loss.affinity_threshold (near-duplicate cosine) and "
        "loss.affinity_alpha (mass they share) instead",
    }
    """Keys of older configs that are errors now, with what to set instead (read by ``t3d.configfile``)."""

    def __post_init__(self) -> None:
        if self.tau_text <= 0:
            raise ConfigError(
                f"loss.tau_text must be > 0, got {self.tau_text}; it is the temperature among a report's "
                "near-duplicates and is not calibrated per batch: set loss.tau_text (e.g. 0.05), "
                "loss.affinity_threshold and loss.affinity_alpha"
            )
        if not -1 < self.affinity_threshold <= 1:
            raise ConfigError(f"loss.affinity_threshold is a cosine in (-1, 1], got {self.affinity_threshold}")
        if not 0 <= self.affinity_alpha < 1:
            raise ConfigError(f"loss.affinity_alpha must be in [0, 1), got {self.affinity_alpha}")
        # Temperatures divide logits: zero or negative ones can only give NaN/inf losses.
        for name in ("tau_view", "tau_align"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"loss.{name} must be > 0 (it divides the logits), got {getattr(self, name)}")
        if self.mask_block < 1:
            raise ConfigError(f"loss.mask_block must be >= 1 voxel, got {self.mask_block}")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"loss.mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass
class TileConfig:
    """The tiled study embedding (methods whose study path is ``tiles``, e.g. ``t3d``; docs/method.md §3).

    Every study is covered by a fixed, overlapping grid of full-resolution tiles of ``crops.size`` (no resizing);
    the study embedding is an attention pooling of the tiles' encoder features, and its gradient reaches the
    encoder through GradCache (pass 1 without a graph, pass 2 in chunks of ``chunk`` tiles).
    """

    overlap: float = 0.25
    """Overlap of neighbouring tiles, as a fraction of the tile size (``t3d.data.grid.grid_centres``)."""
    max_tiles: int = 27
    """Tiles per study at most; when the body needs more, those holding the most body voxels are kept."""
    chunk: int = 8
    """Tiles per encoder pass with a graph (GradCache pass 2): peak memory is one chunk plus the tile features."""
    heads: int = 4
    """Attention heads of the pooling (must divide the encoder's pooled width)."""
    frequencies: int = 4
    """Sine/cosine frequencies per axis of the tile-centre position encoding (2^0 .. 2^(f-1) times pi)."""

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"tiles.overlap must be in [0, 1) (fraction of the tile size), got {self.overlap}")
        if self.max_tiles < 1 or self.chunk < 1 or self.heads < 1 or self.frequencies < 1:
            raise ConfigError(
                "tiles.max_tiles, tiles.chunk, tiles.heads and tiles.frequencies must be >= 1, got "
                f"{self.max_tiles}, {self.chunk}, {self.heads}, {self.frequencies}"
            )


@dataclass
class ClipConfig:
    """The ``clip`` baseline: the whole volume downsampled to a fixed grid (CT-CLIP style)."""

    grid: tuple[int, int, int] = (128, 128, 64)
    """Voxels the whole volume is resized to (multiples of 32 for the encoders)."""
