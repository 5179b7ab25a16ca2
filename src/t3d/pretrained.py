"""A pre-trained image encoder and the preprocessing it was trained with, from a checkpoint or an exported file.

    pre = load_pretrained("runs/pretrain")              # run folder, .pt checkpoint, or `t3d export` .safetensors
    pre = load_pretrained("runs/finetune")              # or the encoder of a `t3d finetune seg` run (method "seg")
    pre.model.encoder, pre.model.preset                 # "swinvit", "base"
    pre.windows, pre.preprocess.spacing, pre.crop_size  # what downstream preprocessing must match
    pre.state                                           # Encoder-level keys: "swinViT.*" / "resnet.*" / "pool_norm.*"

The exported format (``t3d export``) is a safetensors file whose tensors load into MONAI modules as they are
(``SwinUNETR(...).swinViT`` or ``monai.networks.nets.ResNet``) and whose metadata (all strings, JSON where
structured) holds the same specification, so a downstream user needs neither this package nor the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from t3d import __version__
from t3d.checkpoint import load_checkpoint
from t3d.config import ModelConfig, PreprocessConfig, from_dict, to_dict
from t3d.models.encoders import (
    RESNET_NORMS,
    RESNET_PRESETS,
    SWIN_DEPTHS,
    SWIN_HEADS,
    SWIN_PATCH,
    SWIN_PRESETS,
    SWIN_WINDOW,
)
from t3d.models.keymap import encoder_state

EXPORT_FORMAT = "t3d-encoder/1"
SEG_KIND = "t3d-seg"
"""``kind`` of a ``t3d finetune seg`` checkpoint: its encoder can start another fine-tuning or be probed."""


@dataclass
class PretrainedEncoder:
    """Encoder weights with the specification downstream code must reproduce."""

    state: dict[str, Tensor]
    """Keys of ``t3d.models.Encoder.state_dict()`` (``swinViT.*`` / ``resnet.*``, ``pool_norm.*`` when known)."""
    model: ModelConfig
    preprocess: PreprocessConfig
    windows: tuple[tuple[float, float], ...]
    """HU windows (low, high), one input channel each, in order."""
    crop_size: tuple[int, int, int]
    """Crop size (voxels at target spacing) used in pre-training."""
    method: str = ""
    step: int = 0
    text_model: str = ""
    source: str = ""
    """Path the weights came from."""

    @property
    def in_channels(self) -> int:
        return len(self.windows)


def load_pretrained(path: str | Path) -> PretrainedEncoder:
    """Read a pre-training run folder / ``.pt`` checkpoint, or a ``t3d export`` ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_export(path)
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == SEG_KIND:
        return segmentation_encoder(ckpt, path)
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict) or "model" not in ckpt or not {"model", "preprocess", "crops"} <= set(cfg):
        kind = f" (a '{ckpt['kind']}' fine-tuning checkpoint)" if isinstance(ckpt.get("kind"), str) else ""
        raise ValueError(
            f"{path} is not a t3d pre-training checkpoint{kind}; pass a run folder of `t3d pretrain`, one of its "
            "checkpoints/*.pt, a `t3d finetune seg` run folder, or a file written by `t3d export`"
        )
    return PretrainedEncoder(
        state=encoder_state(ckpt["model"]),
        model=from_dict(ModelConfig, cfg["model"]),
        preprocess=from_dict(PreprocessConfig, cfg["preprocess"]),
        windows=tuple((float(lo), float(hi)) for lo, hi in cfg["crops"]["windows"]),
        crop_size=tuple(int(s) for s in cfg["crops"]["size"]),
        method=str(ckpt.get("method", cfg.get("method", ""))),
        step=int(ckpt.get("step", 0)),
        text_model=str(ckpt.get("text_model", "")),
        source=str(path),
    )


def segmentation_encoder(ckpt: dict, path: str | Path) -> PretrainedEncoder:
    """The encoder of a ``t3d finetune seg`` checkpoint ``ckpt`` read from ``path`` (its ``spec`` holds the model and
    input settings)."""
    spec = ckpt.get("spec")
    if not isinstance(spec, dict) or not {"model", "preprocess", "windows", "crop_size"} <= set(spec):
        raise ValueError(
            f"{path} is a '{SEG_KIND}' checkpoint without its network spec; pass a run folder written by "
            "`t3d finetune seg` of this version"
        )
    state = encoder_state(ckpt.get("model", {}))  # EncoderUNet: encoder.*; SwinUNETR: swinViT.* next to the decoder
    return PretrainedEncoder(
        state={k: v for k, v in state.items() if k.startswith(("swinViT.", "resnet.", "pool_norm."))},
        model=from_dict(ModelConfig, spec["model"]),
        preprocess=from_dict(PreprocessConfig, spec["preprocess"]),
        windows=tuple((float(lo), float(hi)) for lo, hi in spec["windows"]),
        crop_size=tuple(int(s) for s in spec["crop_size"]),
        method="seg",
        step=int(ckpt.get("step", 0)),
        source=str(path),
    )


def monai_target(pre: PretrainedEncoder) -> tuple[str, dict]:
    """The MONAI class (dotted name) whose weights the export holds, and its constructor arguments.

    ``swinvit``: ``SwinUNETR(out_channels=..., **kwargs).swinViT`` (``out_channels`` is the user's).
    ``resnet``: ``ResNet(**kwargs)`` with ``feed_forward=False`` (no classification head: the encoder has none).
    """
    m = pre.model
    if m.encoder == "swinvit":
        kwargs = {
            "in_channels": pre.in_channels,
            "feature_size": SWIN_PRESETS[m.preset],
            "patch_size": SWIN_PATCH,
            "depths": list(SWIN_DEPTHS),
            "num_heads": list(SWIN_HEADS),
            "window_size": SWIN_WINDOW,
            "use_v2": m.swin_v2,
        }
        return "monai.networks.nets.SwinUNETR.swinViT", kwargs
    block, layers, widths = RESNET_PRESETS[m.preset]
    kwargs = {
        "block": block,
        "layers": list(layers),
        "block_inplanes": list(widths),
        "spatial_dims": 3,
        "n_input_channels": pre.in_channels,
        "conv1_t_size": 7,
        "conv1_t_stride": 2,
        "shortcut_type": "B",
        "feed_forward": False,
        "bias_downsample": False,
    }
    if m.norm == "batch":
        return "monai.networks.nets.ResNet", kwargs
    # MONAI's ResNet(norm=...) sets the stem's norm only: build it so, then swap the stages' BatchNorm layers.
    kwargs["norm"] = RESNET_NORMS[m.norm]
    return "monai.networks.nets.ResNet+t3d.models.encoders.swap_batch_norms", kwargs


def export_metadata(pre: PretrainedEncoder) -> dict[str, str]:
    """String metadata of an exported encoder: weights' target, preprocessing spec and provenance."""
    target, kwargs = monai_target(pre)
    spacing = pre.preprocess.spacing
    return {
        "format": EXPORT_FORMAT,
        "method": pre.method,
        "encoder": pre.model.encoder,
        "preset": pre.model.preset,
        "feature_size": str(kwargs.get("feature_size", "")),
        "in_channels": str(pre.in_channels),
        "target": target,
        "monai_kwargs": json.dumps(kwargs),
        "spacing_mm": json.dumps(list(spacing) if spacing is not None else "native"),
        "orientation": pre.preprocess.orientation,
        "hu_windows": json.dumps([list(w) for w in pre.windows]),
        "crop_size": json.dumps(list(pre.crop_size)),
        "text_model": pre.text_model,
        "t3d_version": __version__,
        "step": str(pre.step),
        "model_config": json.dumps(to_dict(pre.model)),
        "preprocess_config": json.dumps(to_dict(pre.preprocess)),
    }


def read_export(path: str | Path) -> PretrainedEncoder:
    """Read a ``t3d export`` file back (weights re-keyed to ``Encoder`` level)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported encoder {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # SafetensorError is no ValueError: a text or truncated file lands here
        raise ValueError(f"{path} is not a safetensors file written by `t3d export` ({err})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} was not written by `t3d export` (metadata format={meta.get('format')!r})")
    model = from_dict(ModelConfig, {"norm": "batch", **json.loads(meta["model_config"])})  # no norm key: BatchNorm
    prefix = "swinViT." if model.encoder == "swinvit" else "resnet."
    return PretrainedEncoder(
        state={prefix + k: v for k, v in load_file(str(path)).items()},
        model=model,
        preprocess=from_dict(PreprocessConfig, json.loads(meta["preprocess_config"])),
        windows=tuple((float(lo), float(hi)) for lo, hi in json.loads(meta["hu_windows"])),
        crop_size=tuple(int(s) for s in json.loads(meta["crop_size"])),
        method=meta.get("method", ""),
        step=int(meta.get("step", "0") or 0),
        text_model=meta.get("text_model", ""),
        source=str(path),
    )
