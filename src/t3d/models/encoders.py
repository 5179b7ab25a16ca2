"""3D image encoders behind one timm-like contract (docs/method.md §3).

    encoder = build_encoder(cfg.model, in_channels=cfg.crops.channels, img_size=cfg.crops.size)
    feats = encoder.forward_features(x)   # x (N, C, D, H, W) -> [(N, C_i, D/s_i, H/s_i, W/s_i)], s_i = 1, 2, ..., 32
    emb = encoder.pool(feats)             # (N, embed_channels)

``feats[0]`` is the input itself (stride 1): SwinUNETR's ``encoder1`` reads the raw input as its full-resolution
skip, and the restoration decoder needs the same to restore at input resolution. ``feats[1:]`` are the
encoder's stages at strides 2, 4, 8, 16, 32.

Both encoders wrap MONAI modules without re-implementing them: ``swinvit`` is the ``SwinTransformer`` that
``SwinUNETR`` builds, held as ``self.swinViT`` so that ``encoder.swinViT.state_dict()`` loads into
``SwinUNETR(...).swinViT`` with strict key matching; ``resnet`` is ``monai.networks.nets.ResNet`` held as
``self.resnet`` (same keys as a MONAI ``ResNet`` built with ``feed_forward=False``).

Pooling rule: the pooled embedding must carry the sample. Global-average pooling an
instance-normalised map returns the norm's fixed per-channel mean for every sample, and every contrastive loss
then sits at log B. Both encoders average their deepest stage *spatially* over maps that are not normalised over
space (Swin: LayerNorm over channels at each voxel; ResNet: each block ends in a residual sum and ReLU after its
``model.norm`` layer) and only then apply a LayerNorm over the channels of the pooled vector, which fixes its scale
but keeps what differs between samples.
"""

from __future__ import annotations

import torch
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import ResNet
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import optional_import
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from t3d.config import ModelConfig

_, HAS_EINOPS = optional_import("einops")  # MONAI's SwinTransformer permutes axes with einops.rearrange

# swinvit preset -> SwinUNETR feature_size (embed dim of the first stage; stages have F, 2F, 4F, 8F, 16F channels).
SWIN_PRESETS: dict[str, int] = {"tiny": 12, "small": 24, "base": 48}
SWIN_DEPTHS = (2, 2, 2, 2)
SWIN_HEADS = (3, 6, 12, 24)
SWIN_WINDOW = 7
SWIN_PATCH = 2

# resnet preset -> (block, blocks per stage, stage widths). ``tiny`` is ResNet-10 at a quarter of the width.
RESNET_NORMS: dict[str, str | tuple] = {
    "batch": "batch",
    "group": ("group", {"num_groups": 8}),  # 8 groups divide every preset's widths (16 ... 2048)
    "instance": ("instance", {"affine": True}),
}
"""``model.norm`` -> MONAI ``get_norm_layer`` spec for the ResNet's norm layers."""

RESNET_PRESETS: dict[str, tuple[str, list[int], list[int]]] = {
    "tiny": ("basic", [1, 1, 1, 1], [16, 32, 64, 128]),
    "10": ("basic", [1, 1, 1, 1], [64, 128, 256, 512]),
    "18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "50": ("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512]),
}

PRESETS: dict[str, tuple[str, ...]] = {"swinvit": tuple(SWIN_PRESETS), "resnet": tuple(RESNET_PRESETS)}
"""Valid ``model.preset`` names per ``model.encoder`` (t3d.config.model keeps a copy; a test checks they agree)."""

DIVISOR = 32
"""Both encoders have five stride-2 stages: every crop side must be a multiple of 2**5 voxels."""


def check_crop_size(img_size: tuple[int, ...], encoder: str) -> None:
    """Raise a ValueError naming ``crops.size`` (``clip.grid`` for the ``clip`` baseline) when an input side is not a
    positive multiple of 32 voxels."""
    if len(img_size) != 3 or any(int(s) % DIVISOR or s <= 0 for s in img_size):
        nearest = [max(DIVISOR, round(int(s) / DIVISOR) * DIVISOR) for s in img_size]
        raise ValueError(
            f"crops.size={tuple(img_size)} does not fit the {encoder} encoder: each of the three sides must be a "
            f"positive multiple of {DIVISOR} voxels (five stride-2 stages); use e.g. --crops.size={nearest} "
            f"(for the clip baseline the whole-volume grid, clip.grid, obeys the same rule)"
        )


class Encoder(nn.Module):
    """Contract shared by every image encoder.

    Attributes:
        feature_channels: channels of each map returned by ``forward_features``, finest -> coarsest
            (``feature_channels[0]`` = input channels, the input itself at stride 1).
        feature_strides: downsampling factor of each map relative to the input (1, 2, 4, 8, 16, 32).
        embed_channels: width of ``pool``'s output.
    """

    feature_channels: list[int]
    feature_strides: list[int]
    embed_channels: int
    pool_norm: nn.LayerNorm

    def __init__(self, name: str, in_channels: int) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"{name} encoder: in_channels must be >= 1 (one per HU window), got {in_channels}")
        self.name = name
        self.in_channels = in_channels
        self.grad_checkpointing = False

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name} encoder expects (N, {self.in_channels}, D, H, W) crops, got shape {tuple(x.shape)}"
            )
        check_crop_size(tuple(x.shape[2:]), self.name)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def pool(self, feats: list[Tensor]) -> Tensor:
        """Deepest map -> one vector per sample: spatial mean, then LayerNorm over channels (N, embed_channels)."""
        return self.pool_norm(feats[-1].mean(dim=(2, 3, 4)))  # (N, C, d, h, w) -> (N, C)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        feats = self.forward_features(x)
        return feats, self.pool(feats)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError


class SwinEncoder(Encoder):
    """MONAI SwinUNETR's Swin transformer encoder (Hatamizadeh et al. 2022, arXiv 2201.01266).

    Args:
        in_channels: C, input channels (one per HU window).
        feature_size: F, SwinUNETR's ``feature_size`` (multiple of 12: heads (3, 6, 12, 24) must divide F..8F).
        use_v2: SwinUNETR-v2 residual conv block before each stage (load into ``SwinUNETR(use_v2=True)``).
    """

    def __init__(self, in_channels: int, feature_size: int, use_v2: bool = False) -> None:
        super().__init__("swinvit", in_channels)
        if not HAS_EINOPS:
            raise ImportError(
                "model.encoder=swinvit needs the einops package (MONAI's SwinTransformer uses it): "
                "pip install einops, or use model.encoder=resnet"
            )
        if feature_size % 12:
            raise ValueError(f"swinvit feature_size must be a multiple of 12 (SwinUNETR rule), got {feature_size}")
        # Exactly the arguments SwinUNETR(in_channels, out_channels, feature_size=F, use_v2=...) passes.
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(SWIN_WINDOW,) * 3,
            patch_size=(SWIN_PATCH,) * 3,
            depths=SWIN_DEPTHS,
            num_heads=SWIN_HEADS,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
            norm_layer=nn.LayerNorm,
            patch_norm=False,
            use_checkpoint=False,
            spatial_dims=3,
            downsample="merging",
            use_v2=use_v2,
        )
        self.feature_size = feature_size
        self.feature_channels = [in_channels] + [feature_size * 2**i for i in range(5)]
        self.feature_strides = [2**i for i in range(6)]
        self.embed_channels = self.feature_channels[-1]
        self.pool_norm = nn.LayerNorm(self.embed_channels)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        self._check_input(x)
        # normalize=True as in SwinUNETR.forward: each stage output is layer-normalised over channels per voxel,
        # so the decoder and a downstream SwinUNETR see the same features.
        return [x, *self.swinViT(x, normalize=True)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # MONAI reads ``use_checkpoint`` at call time in every SwinTransformerBlock; BasicLayer keeps a copy.
        self.grad_checkpointing = enable
        for module in self.swinViT.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enable


class ResNetEncoder(Encoder):
    """MONAI 3D ResNet (Chen et al., Med3D, arXiv 1904.00625) as a five-stage feature extractor.

    The stem is the MedicalNet/``ResNetFeatures`` one (7^3 conv stride 2, max-pool); features are the stem
    activation (stride 2) and ``layer1``..``layer4`` (strides 4..32). Shortcuts are type "B" (1x1 conv + norm) for
    every preset: MONAI's type "A" shortcut concatenates ``out.data`` and so cuts the gradient of the identity path.

    Args:
        in_channels: C, input channels.
        block: ``basic`` or ``bottleneck``.
        layers: residual blocks per stage.
        widths: stage widths (``block_inplanes``); bottleneck stages output 4x these.
        norm: ``batch``, ``group`` (8 groups) or ``instance`` (affine): every norm layer of the network. MONAI's
            ``ResNet(norm=...)`` applies its ``norm`` to the stem only, so the residual stages' BatchNorm layers are
            swapped for the same kind after construction (``swap_batch_norms``); weights 1, biases 0 as MONAI
            initialises them.
    """

    def __init__(self, in_channels: int, block: str, layers: list[int], widths: list[int], norm: str = "batch") -> None:
        super().__init__("resnet", in_channels)
        self.resnet = ResNet(
            block=block,
            layers=layers,
            block_inplanes=widths,
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
            norm=RESNET_NORMS[norm],
        )
        if norm != "batch":
            swap_batch_norms(self.resnet, RESNET_NORMS[norm])
        self.norm = norm
        expansion = 4 if block == "bottleneck" else 1
        self.resnet_config = {"block": block, "layers": list(layers), "block_inplanes": list(widths)}
        self.feature_channels = [in_channels, widths[0]] + [w * expansion for w in widths]
        self.feature_strides = [2**i for i in range(6)]
        self.embed_channels = self.feature_channels[-1]
        self.pool_norm = nn.LayerNorm(self.embed_channels)

    def _stem(self, x: Tensor) -> Tensor:
        net = self.resnet
        return net.act(net.bn1(net.conv1(x)))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        self._check_input(x)
        net = self.resnet
        stages = [self._stem, lambda h: net.layer1(net.maxpool(h)), net.layer2, net.layer3, net.layer4]
        feats = [x]
        h = x
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in stages:
            # Recomputing a BatchNorm stage in backward updates its running statistics a second time
            # (same trade-off as timm); outputs and gradients are unchanged.
            h = checkpoint(stage, h, use_reentrant=False) if use_ckpt else stage(h)
            feats.append(h)
        return feats

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def swap_batch_norms(module: nn.Module, norm: str | tuple) -> None:
    """Replace every BatchNorm layer below ``module`` (in place) by MONAI's ``norm`` layer of the same width."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, get_norm_layer(name=norm, spatial_dims=3, channels=child.num_features))
        else:
            swap_batch_norms(child, norm)


def batch_dependent_norms(module: nn.Module) -> list[str]:
    """Names of the norm layers below ``module`` whose output depends on the other samples of the batch: BatchNorm
    layers in training mode (in eval mode they apply fixed running statistics)."""
    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.training
    ]


def build_encoder(cfg: ModelConfig, in_channels: int, img_size: tuple[int, int, int]) -> Encoder:
    """The encoder that ``cfg.encoder`` / ``cfg.preset`` name, checked against the crop size up front.

    Args:
        cfg: model config (``encoder``, ``preset``, ``norm``, ``grad_checkpointing``, ``swin_v2``).
        in_channels: C, input channels (``crops.channels``: one per HU window).
        img_size: crop size in voxels (``crops.size``); every side must be a multiple of 32.
    """
    check_crop_size(tuple(img_size), cfg.encoder)
    presets = PRESETS.get(cfg.encoder)
    if presets is None:
        raise ValueError(f"model.encoder={cfg.encoder!r} is not one of {', '.join(PRESETS)}")
    if cfg.preset not in presets:
        raise ValueError(f"model.preset={cfg.preset!r} is not a {cfg.encoder} preset; choose one of {presets}")
    if cfg.encoder == "swinvit":
        encoder: Encoder = SwinEncoder(in_channels, SWIN_PRESETS[cfg.preset], use_v2=cfg.swin_v2)
    else:
        block, layers, widths = RESNET_PRESETS[cfg.preset]
        encoder = ResNetEncoder(in_channels, block, layers, widths, norm=cfg.norm)
    encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    return encoder
