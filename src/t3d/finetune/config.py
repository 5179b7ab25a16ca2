"""Downstream configs (docs/method.md §6), built with the machinery of ``t3d.config``: YAML sets values, dotted
flags override.

    cfg = load_config(SegConfig, "configs/seg.yaml", ["--lr", "3e-4", "--crop_size=[64,64,64]"])

``FinetuneConfig`` holds what every downstream task shares (data, initialisation, label fraction, splits,
optimisation); ``SegConfig`` adds segmentation, ``ClsConfig`` classification. When ``init`` names a pre-training
checkpoint, the encoder (``model``), the preprocessing (``preprocess``) and the HU ``windows`` are taken from it so that
fine-tuning sees exactly what pre-training saw; the values here are then ignored (a warning says so when they
differ). They apply to ``init: random``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from t3d.config import DEFAULT_WINDOWS, RAS_AXES, ConfigError, ModelConfig, PreprocessConfig

# ----------------------------------------------------------------------------------------------- shared


@dataclass
class FinetuneConfig:
    """What every downstream task shares."""

    data: str = ""
    """Dataset description: MSD ``dataset.json`` (segmentation) or labels CSV (classification)."""
    init: str = "random"
    """Pre-training run folder / checkpoint ``.pt`` / ``t3d export`` ``.safetensors``, a ``t3d finetune seg`` run (its
    encoder), or ``random`` (baseline)."""
    out: str = "runs/finetune"
    """Run folder: config, subset/splits, best checkpoint, metrics.json, report.md, figures."""
    cache: str = ""
    """Preprocessed cache of the downstream studies; empty = ``<out>/cache``. Share one across runs to preprocess
    once (it must hold studies preprocessed with the same spacing: one cache per pre-training spacing)."""
    seed: int = 0
    """Seeds the splits, the label-fraction subset, patch sampling and initialisation."""
    fraction: float = 1.0
    """Fraction of the labelled training studies used (1 / 10 / 100 % experiments). Subsets are nested: with the
    same seed the 1 % subset is inside the 10 % subset."""
    val_fraction: float = 0.2
    """Fraction of the labelled training pool held out for validation / model selection (before ``fraction``)."""
    test_fraction: float = 0.2
    """When the dataset has no labelled test set: fraction of the training pool held out as the test set."""
    freeze_encoder: bool = False
    """Keep the pre-trained encoder fixed (linear-probe style); only the decoder / head learns."""
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 2
    """Patches (segmentation; each read straight from the cache's memory map) or volumes (classification) per step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW), reached after ``warmup_steps`` and decayed to 0 by a cosine."""
    encoder_lr_scale: float = 1.0
    """Learning rate of the pre-trained encoder relative to ``lr`` (e.g. 0.1 to move it gently)."""
    weight_decay: float = 1e-5
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear learning-rate warmup steps."""
    grad_clip: float = 1.0
    """Max gradient norm (0 = no clipping)."""
    val_every: int = 200
    """Validate (and keep the best checkpoint) every this many steps and at the end."""
    workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    preprocess_workers: int = 1
    """Processes preprocessing the downstream studies into the cache."""
    amp: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder for ``init: random``; taken from the checkpoint otherwise."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Preprocessing for ``init: random``; taken from the checkpoint otherwise."""
    windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS
    """HU windows (low, high), one input channel each, for ``init: random``; taken from the checkpoint otherwise."""

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1] (share of labelled training studies), got {self.fraction}")
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ConfigError("steps, batch_size and val_every must be >= 1")
        if self.lr <= 0 or self.encoder_lr_scale < 0:
            raise ConfigError(f"lr must be > 0 and encoder_lr_scale >= 0, got {self.lr}, {self.encoder_lr_scale}")
        if not self.windows or any(hi <= lo for lo, hi in self.windows):
            raise ConfigError(f"windows must be (low, high) HU pairs with low < high, got {self.windows}")


# ----------------------------------------------------------------------------------------------- segmentation


def check_seg_crop(size: tuple[int, ...], name: str) -> None:
    """Segmentation patches: multiples of 32 (five stride-2 stages), at least one side >= 64: the decoder's instance
    norm at stride 32 needs more than one voxel (a one-voxel map normalises to zeros, and PyTorch refuses it)."""
    if len(size) != 3 or any(int(s) < 32 or int(s) % 32 for s in size) or max(size) < 64:
        raise ConfigError(
            f"{name}={list(size)}: segmentation patches need three multiples of 32 voxels, at least one of them "
            ">= 64; e.g. '--crop_size=[96,96,96]'"
        )


@dataclass
class SegConfig(FinetuneConfig):
    """``t3d finetune seg``: SwinUNETR / encoder-UNet on an MSD-layout dataset."""

    arch_from: str = ""
    """With ``init: random``: take encoder, preprocessing, windows and crop size from this checkpoint (not its
    weights), so that the random baseline matches a pre-trained run exactly."""
    crop_size: tuple[int, int, int] | None = None
    """Training patch and sliding-window size in voxels (multiples of 32, one side >= 64); ``null`` = the checkpoint's
    ``crops.size`` (96^3 for ``random``)."""
    pos_fraction: float = 0.67
    """Share of patches centred on a labelled voxel; the class is drawn uniformly among the classes present so
    small lesions are sampled as often as large organs. The rest are centred on random body voxels."""
    lesion_weight: float = 1.0
    """Weight of each lesion class (``lesion_labels``) against 1 for every other class when drawing the class a
    positive patch is centred on. At 1 (uniform) a lesion class present in a fifth of the studies centres ~1-2 % of
    the patches, and in all the others the soft Dice term pushes its probability down; > 1 samples lesions more."""
    lesion_loss_weight: float = 1.0
    """Class weight of each lesion class (``lesion_labels``) in the Dice and cross-entropy terms (``weight`` of
    ``monai.losses.DiceCELoss``), 1 for every other class; 1 = unweighted."""
    flip_prob: float = 0.5
    """Flip probability per allowed axis (``flip_axes``) of training patches (image and label together)."""
    flip_axes: tuple[str, ...] = ("AP",)
    """Axes a training patch may be flipped along (``LR``, ``AP``, ``SI`` of the RAS cache). No ``LR`` by default:
    a left-right flip keeps the label of a left organ (left lung, left kidney) on what now looks like the right one,
    which no patch-level network can resolve; add it only for label maps without sided classes. ``AP`` only, as in
    pre-training (``crops.flip_axes``): test volumes are never flipped. Empty = no flips."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term of ``monai.losses.DiceCELoss``."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy term of ``monai.losses.DiceCELoss``."""
    sw_batch_size: int = 2
    """Windows per forward pass in sliding-window inference."""
    overlap: float = 0.5
    """Overlap of neighbouring sliding windows (fraction of the window); Gaussian blending."""
    val_hd95: bool = False
    """Also compute HD95 on the validation set (slow on large volumes; always computed on the test set)."""
    lesion_labels: tuple[int, ...] | None = None
    """Classes scored by the small-lesion Dice; ``null`` = labels whose name contains lesion/tumo(u)r/nodule/
    cancer/mass/cyst/metasta/stone/calcul."""
    small_lesion_mm: float = 10.0
    """Lesions with an equivalent-sphere diameter below this (mm) count as small."""
    lesion_margin_mm: float = 5.0
    """Each small lesion is scored inside its bounding box grown by this margin (mm)."""
    max_val_cases: int = 0
    """Validate on at most this many studies (0 = all)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_size is not None:
            check_seg_crop(self.crop_size, "crop_size")
        if not 0 <= self.pos_fraction <= 1 or not 0 <= self.flip_prob <= 1:
            raise ConfigError("pos_fraction and flip_prob must be probabilities in [0, 1]")
        if not self.lesion_loss_weight > 0:
            raise ConfigError(f"lesion_loss_weight must be > 0 (1 = unweighted), got {self.lesion_loss_weight}")
        if not self.lesion_weight > 0:
            raise ConfigError(
                f"lesion_weight must be > 0 (1 = lesion classes as often as the others), got {self.lesion_weight}"
            )
        unknown = [a for a in self.flip_axes if a not in RAS_AXES]
        if unknown:
            raise ConfigError(f"flip_axes entries must be among {', '.join(RAS_AXES)}; got {unknown}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ConfigError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ConfigError("dice_weight and ce_weight must be >= 0 and not both 0")


# ----------------------------------------------------------------------------------------------- classification


@dataclass
class ClsConfig(FinetuneConfig):
    """``t3d finetune cls``: multi-label finding classification (linear probe or full fine-tune).

    ``data`` is the findings CSV; ``freeze_encoder`` (``--probe``) trains only the linear head on study features
    computed once; ``lr`` is the head's learning rate and ``lr * encoder_lr_scale`` the encoder's.
    """

    out: str = "runs/cls"
    steps: int = 300
    """Optimiser steps (fine-tune: batches of studies; probe: full-batch steps on the cached features)."""
    batch_size: int = 4
    """Studies per fine-tuning step (each seen through ``sites`` crops)."""
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    warmup_steps: int = 10
    val_every: int = 25
    images: str = ""
    """Folder the CSV's ``VolumeName`` / ``image`` entries resolve against (CT-RATE nesting understood); empty =
    the CSV's folder, or its ``images/`` subfolder when there is one (the synthetic dataset's layout)."""
    splits: str = ""
    """JSON split file (``{"finetune": [ids], "test": [ids]}``); empty = a seeded split of all labelled studies."""
    train_split: str = "finetune"
    """Split of ``splits`` whose studies are trained on (validation is carved out of it)."""
    test_split: str = "test"
    """Split of ``splits`` that the test metrics are computed on."""
    arch_from: str = ""
    """With ``init: random``: copy encoder, preprocessing, windows and crop size from this checkpoint without its
    weights, so that the random baseline matches the pre-trained run exactly."""
    crop_size: tuple[int, int, int] | None = None
    """Crop size in voxels (multiples of 32); ``null`` = the checkpoint's ``crops.size`` (96^3 for ``random``)."""
    sites: int = 4
    """K: random foreground crops per study per fine-tuning step; their features are pooled into one."""
    pooling: str = "mean"
    """Crop features -> study feature: ``mean``, or ``meanmax`` (mean ++ max: a finding in one crop of many
    survives the max)."""
    pos_weight: bool = False
    """Weight positives by negatives/positives per class in the BCE (rare findings)."""
    probe_l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """Linear probe: L2 strengths of the logistic regression tried; the best on validation is kept (the middle one
    without a validation split). ``steps`` is then the number of L-BFGS iterations per strength."""
    select: str = "best"
    """``best``: keep the weights with the best validation macro AUROC; ``last``: the final ones."""
    eval_overlap: float = 0.25
    """Overlap between neighbouring evaluation crops of the grid that covers each study (fraction of the size)."""
    max_crops: int = 27
    """Evaluation crops per study at most (those covering the most body are kept)."""
    crop_batch: int = 8
    """Crops per encoder forward pass when evaluating / computing probe features."""
    n_boot: int = 1000
    """Bootstrap replicates (resampled test studies) of the confidence intervals; 0 = none."""
    ci: float = 0.95
    """Confidence level of the intervals."""
    stratified: bool = False
    """Resample within strata (each study's rarest positive finding) instead of plainly."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_size is not None:
            check_seg_crop(self.crop_size, "crop_size")
        for name, choices in (("pooling", ("mean", "meanmax")), ("select", ("best", "last"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.sites < 1 or self.max_crops < 1 or self.crop_batch < 1 or self.n_boot < 0:
            raise ConfigError("sites, max_crops and crop_batch must be >= 1 and n_boot >= 0")
        if not self.probe_l2 or any(v < 0 for v in self.probe_l2):
            raise ConfigError(f"probe_l2 must be a non-empty list of L2 strengths >= 0, got {self.probe_l2}")
        if not 0 <= self.eval_overlap < 1 or not 0 < self.ci < 1:
            raise ConfigError(f"eval_overlap must be in [0, 1) and ci in (0, 1), got {self.eval_overlap}, {self.ci}")
