"""``t3d export --checkpoint RUN_OR_PT --out encoder.safetensors``: the pre-trained encoder for use without t3d.

The file loads into MONAI with strict key matching, the preprocessing spec rides along in the metadata::

    from safetensors import safe_open
    from safetensors.torch import load_file
    meta = safe_open("encoder.safetensors", "pt").metadata()            # all values are strings (JSON if structured)
    net = SwinUNETR(out_channels=14, **json.loads(meta["monai_kwargs"]))
    net.swinViT.load_state_dict(load_file("encoder.safetensors"), strict=True)
    # resnet: ResNet(**json.loads(meta["monai_kwargs"])).load_state_dict(..., strict=True)   (feed_forward=False)
    # resnet with model.norm group/instance (target ``...ResNet+t3d.models.encoders.swap_batch_norms``): build
    # ResNet(**kwargs) with kwargs["norm"] as a tuple, then swap_batch_norms(net, kwargs["norm"]) before loading.

Metadata keys: format, method, encoder, preset, feature_size, in_channels, target, monai_kwargs, spacing_mm,
orientation, hu_windows, crop_size, text_model, t3d_version, step, model_config, preprocess_config.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from pathlib import Path

from monai.networks.nets import ResNet, SwinUNETR
from safetensors.torch import save_file
from torch import Tensor, nn

from t3d.models.encoders import swap_batch_norms
from t3d.models.keymap import encoder_state_for_resnet, encoder_state_for_swinunetr, load_into
from t3d.pretrained import PretrainedEncoder, export_metadata, load_pretrained, monai_target

log = logging.getLogger(__name__)


def command(args: argparse.Namespace) -> int:
    out = export_encoder(args.checkpoint, args.out)
    print(f"exported encoder -> {out}")
    return 0


def monai_module(pre: PretrainedEncoder) -> nn.Module:
    """The MONAI module the exported weights are for (``SwinUNETR(...).swinViT`` or ``ResNet``), freshly built."""
    _, kwargs = monai_target(pre)
    if pre.model.encoder == "swinvit":
        return SwinUNETR(out_channels=2, **kwargs).swinViT
    net = ResNet(**kwargs)
    if "norm" in kwargs:  # MONAI applies ``norm`` to the stem only; the stages get the same kind here
        swap_batch_norms(net, kwargs["norm"])
    return net


def exported_tensors(pre: PretrainedEncoder) -> dict[str, Tensor]:
    """Tensors keyed as the MONAI target module's ``state_dict`` (no ``encoder.`` / ``swinViT.`` prefix)."""
    if pre.model.encoder == "swinvit":
        mapped = {k[len("swinViT.") :]: v for k, v in encoder_state_for_swinunetr(pre.state).items()}
    else:
        mapped = encoder_state_for_resnet(pre.state)
    # safetensors refuses shared or non-contiguous storage.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in mapped.items()}


def export_encoder(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the encoder of ``checkpoint`` to ``out`` (safetensors), after checking it loads strictly into MONAI."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(
            f"--out {out}: the export is a safetensors file; name it e.g. {out.with_suffix('.safetensors')}"
        )
    pre = load_pretrained(checkpoint)
    tensors = exported_tensors(pre)
    # Refuse to write a file that would not load: the strict check a user would do, done here first.
    report = load_into(monai_module(pre), tensors, strict=True)
    meta = export_metadata(pre)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    params = sum(t.numel() for t in tensors.values())
    log.info(
        "exported %d tensors (%.2fM values) of %s/%s to %s",
        report.loaded,
        params / 1e6,
        meta["encoder"],
        meta["preset"],
        out,
    )
    return out
