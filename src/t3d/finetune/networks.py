"""Segmentation networks around the pre-trained encoders (docs/method.md §6).

``swinvit`` -> MONAI ``SwinUNETR`` built with the encoder's exact Swin arguments, so ``swinViT.*`` weights drop in.
``resnet``  -> ``EncoderUNet``: our ``Encoder`` (``t3d.models.build_encoder``) under a UNet-style decoder of MONAI
UNETR blocks, one up-block per stride (32 -> 1), with the same block types SwinUNETR's decoder uses.

    net = build_seg_network(model_cfg, in_channels=1, num_classes=4)
    logits = net(x)                  # (N, C, D, H, W) -> (N, num_classes, D, H, W); D, H, W multiples of 32
    encoder_module(net)              # the part initialised from pre-training (frozen by --freeze-encoder)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.nets import SwinUNETR
from torch import Tensor, nn

from t3d.config import ModelConfig, PreprocessConfig, from_dict, to_dict
from t3d.models.encoders import SWIN_DEPTHS, SWIN_HEADS, SWIN_PATCH, SWIN_PRESETS, SWIN_WINDOW, Encoder, build_encoder


class EncoderUNet(nn.Module):
    """UNet decoder over an ``Encoder``'s six feature maps (strides 1, 2, 4, 8, 16, 32).

    Each skip map goes through a residual conv block (``UnetrBasicBlock``) to the decoder width of its level; each
    up-step is a transposed conv, concatenation with the skip, residual conv block (``UnetrUpBlock``); a 1x1x1 conv
    gives the class logits at input resolution. Decoder widths equal the encoder's stage widths (level 0, the raw
    input, uses the stride-2 width), as in SwinUNETR.
    """

    def __init__(self, encoder: Encoder, out_channels: int, norm_name: str = "instance") -> None:
        super().__init__()
        ch = list(encoder.feature_channels)
        if len(ch) != 6:
            raise ValueError(f"EncoderUNet needs six feature maps (strides 1..32), the encoder gives {len(ch)}")
        self.encoder = encoder
        width = [ch[1], *ch[1:5]]  # decoder width per level 0..4

        def block(cin: int, cout: int) -> nn.Module:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)

        self.skips = nn.ModuleList(block(ch[i], width[i]) for i in range(5))
        self.bottleneck = block(ch[5], ch[5])
        ins = [ch[5], *width[4:0:-1]]  # inputs of the up-blocks, coarsest first
        self.ups = nn.ModuleList(
            UnetrUpBlock(3, cin, width[level], 3, 2, norm_name=norm_name, res_block=True)
            for cin, level in zip(ins, range(4, -1, -1))
        )
        self.head = UnetOutBlock(3, width[0], out_channels)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.encoder.forward_features(x)  # [(N, C_i, D/2^i, H/2^i, W/2^i)] for i = 0..5
        h = self.bottleneck(feats[5])
        for up, level in zip(self.ups, range(4, -1, -1)):
            h = up(h, self.skips[level](feats[level]))  # (N, width, D/2^level, ...)
        return self.head(h)


def build_seg_network(
    cfg: ModelConfig, in_channels: int, num_classes: int, img_size: tuple[int, int, int] = (96, 96, 96)
) -> nn.Module:
    """The segmentation network for ``cfg.encoder`` / ``cfg.preset``.

    Args:
        cfg: the encoder config (from the pre-training checkpoint, or the fine-tune config for ``random``).
        in_channels: C, one per HU window.
        num_classes: output channels, background included.
        img_size: patch size in voxels (checked to be multiples of 32; SwinUNETR itself accepts any such size).
    """
    if num_classes < 2:
        raise ValueError(f"segmentation needs at least 2 classes (background + one), got {num_classes}")
    if cfg.encoder == "swinvit":
        # Same Swin arguments as t3d.models.encoders.SwinEncoder: the pre-trained swinViT.* keys and shapes match.
        return SwinUNETR(
            in_channels=in_channels,
            out_channels=num_classes,
            feature_size=SWIN_PRESETS[cfg.preset],
            patch_size=SWIN_PATCH,
            depths=SWIN_DEPTHS,
            num_heads=SWIN_HEADS,
            window_size=SWIN_WINDOW,
            use_checkpoint=cfg.grad_checkpointing,
            use_v2=cfg.swin_v2,
        )
    encoder = build_encoder(cfg, in_channels=in_channels, img_size=tuple(img_size))
    return EncoderUNet(encoder, num_classes)


def encoder_module(net: nn.Module) -> nn.Module:
    """The sub-module that holds pre-trained weights (``SwinUNETR.swinViT`` or ``EncoderUNet.encoder.resnet``)."""
    if isinstance(net, SwinUNETR):
        return net.swinViT
    if isinstance(net, EncoderUNet):
        return getattr(net.encoder, "resnet", net.encoder)
    raise TypeError(f"not a t3d segmentation network: {type(net).__name__}")


@dataclass
class SegSpec:
    """Everything needed to rebuild a segmentation network and prepare its inputs (stored in its checkpoint)."""

    model: ModelConfig
    preprocess: PreprocessConfig
    windows: tuple[tuple[float, float], ...]
    """HU windows (low, high), one input channel each."""
    crop_size: tuple[int, int, int]
    """Training patch = sliding-window size (voxels at the preprocessing spacing)."""
    labels: dict[int, str]
    """Class value -> name, 0 = background."""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def build(self) -> nn.Module:
        return build_seg_network(self.model, len(self.windows), self.num_classes, self.crop_size)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": to_dict(self.model),
            "preprocess": to_dict(self.preprocess),
            "windows": [list(w) for w in self.windows],
            "crop_size": list(self.crop_size),
            "labels": {str(k): v for k, v in self.labels.items()},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegSpec:
        return cls(
            model=from_dict(ModelConfig, values["model"]),
            preprocess=from_dict(PreprocessConfig, values["preprocess"]),
            windows=tuple((float(lo), float(hi)) for lo, hi in values["windows"]),
            crop_size=tuple(int(s) for s in values["crop_size"]),
            labels={int(k): str(v) for k, v in values["labels"].items()},
        )
