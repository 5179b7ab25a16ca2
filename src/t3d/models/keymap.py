"""Weights cross boundaries through named functions (timm's ``checkpoint_filter_fn`` idea).

    state = load_checkpoint("runs/pretrain")["model"]                # PretrainModel state: "encoder.swinViT.*", ...
    net = SwinUNETR(in_channels=1, out_channels=4, feature_size=12)
    report = load_into(net, encoder_state_for_swinunetr(state), prefix="swinViT.")   # raises on any mismatch
    report.missing, report.unexpected                                 # [] and [] after a strict load

Accepted inputs of every mapping function: a whole checkpoint (``{"model": ...}``), a ``PretrainModel`` state
(``encoder.*`` keys, optionally behind DDP's ``module.``), or an ``Encoder`` state (``swinViT.*`` / ``resnet.*`` /
``pool_norm.*``). Keys of the pre-training heads (projection heads, restoration decoder, logit scale) and the
encoder's pooling norm have no place in a segmentation network and are dropped by the mapping, not reported as
unexpected: "unexpected" means a key the mapping produced that the target module does not have.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What happened when mapped weights were loaded into a module."""

    loaded: int = 0
    """Tensors copied into the target."""
    missing: list[str] = field(default_factory=list)
    """Target keys (under the checked prefix) that the mapped state does not provide: they keep their init."""
    unexpected: list[str] = field(default_factory=list)
    """Mapped keys that the target module does not have: they are ignored."""

    def as_dict(self) -> dict:
        return {"loaded": self.loaded, "missing": list(self.missing), "unexpected": list(self.unexpected)}


def encoder_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The image encoder's own state (keys of ``t3d.models.Encoder.state_dict()``) from any accepted input."""
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        return {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    return dict(state)


def _with_prefix(state: Mapping[str, Tensor], prefix: str, what: str) -> dict[str, Tensor]:
    enc = encoder_state(state)
    out = {k[len(prefix) :]: v for k, v in enc.items() if k.startswith(prefix)}
    if not out:
        shown = ", ".join(list(enc)[:5]) or "no keys"
        raise ValueError(
            f"no {what} weights in this state (expected keys 'encoder.{prefix}*' or '{prefix}*', found {shown} ...); "
            f"is it a checkpoint of a model.encoder={what} pre-training run?"
        )
    dropped = sorted({k.split(".")[0] for k in enc if not k.startswith(prefix)})
    if dropped:
        log.debug("dropped encoder keys outside %s: %s", prefix, dropped)
    return out


def encoder_state_for_swinunetr(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map pre-trained ``swinvit`` weights to ``monai.networks.nets.SwinUNETR`` keys (``swinViT.*``).

    Load the result with ``load_into(swinunetr, mapped, prefix="swinViT.")``; strip ``swinViT.`` to load into
    ``SwinUNETR(...).swinViT`` alone (what ``t3d export`` writes).
    """
    return {f"swinViT.{k}": v for k, v in _with_prefix(state, "swinViT.", "swinvit").items()}


def encoder_state_for_resnet(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map pre-trained ``resnet`` weights to ``monai.networks.nets.ResNet`` keys (``conv1.weight``, ``layer1.*``).

    The MONAI ``ResNet`` must be built as ``t3d.models.encoders.ResNetEncoder`` builds it (``feed_forward=False``,
    ``shortcut_type="B"``, ``bias_downsample=False``, same block/layers/widths); ``t3d export`` records these
    arguments in the metadata.
    """
    return _with_prefix(state, "resnet.", "resnet")


def load_into(module: nn.Module, mapped: Mapping[str, Tensor], prefix: str = "", strict: bool = True) -> LoadReport:
    """Copy ``mapped`` into ``module``; the keys of ``module`` that start with ``prefix`` must all be provided.

    With ``strict`` (the default) any missing key under ``prefix``, any unexpected key or any shape mismatch is a
    ValueError naming the keys; otherwise they are reported (and logged) and the rest is loaded. The returned
    report lists what was missing/unexpected either way.
    """
    target = module.state_dict()
    wanted = [k for k in target if k.startswith(prefix)]
    report = LoadReport(
        missing=[k for k in wanted if k not in mapped],
        unexpected=sorted(k for k in mapped if k not in target),
    )
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} pre-trained tensors do not fit the model ({'; '.join(mismatched[:3])} ...): the "
            "encoder preset or the number of input channels (one per HU window) differs from the pre-training run"
        )
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"pre-trained weights do not match the model: {len(report.missing)} missing "
            f"({', '.join(report.missing[:5])}), {len(report.unexpected)} unexpected "
            f"({', '.join(report.unexpected[:5])}); check model.encoder / model.preset / model.swin_v2"
        )
    usable = {k: v for k, v in mapped.items() if k in target}
    module.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    if report.missing or report.unexpected:
        log.warning(
            "loaded %d tensors; missing %d (%s), unexpected %d (%s)",
            report.loaded,
            len(report.missing),
            ", ".join(report.missing[:5]),
            len(report.unexpected),
            ", ".join(report.unexpected[:5]),
        )
    return report
