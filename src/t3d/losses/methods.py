"""The method table of docs/method.md §5 as data: every baseline and ablation is one row, one code path.

    spec = method_spec(cfg.method)
    if spec.restore:                   # decoder conditioning: spec.conditioning_for(cfg.model.conditioning)

``random`` (no pre-training) is not a pre-training method and has no row. ``supervised`` is a *control*, not a
competitor: the same encoder and crop pipeline trained on the ground-truth findings of the pre-training studies
(multi-label BCE of a linear head on each crop's features; a finding with a label class of its own is a target of
the crops that hold its voxels, see ``t3d.pretrain.data.FindingTargets``), an upper reference of what the encoder
can learn from these studies; benchmarks list it apart from the methods.
"""

from __future__ import annotations

from dataclasses import dataclass

from t3d.config import METHODS


@dataclass(frozen=True)
class MethodSpec:
    """Which terms a pre-training method uses."""

    name: str
    view: bool
    """L_view: contrastive between the two overlapping views of each crop site."""
    soft_targets: bool
    """Y from report affinities (True) or Y = I (False) for every contrastive term."""
    align: str
    """L_align: ``none``, ``global`` (study embedding vs report) or ``sentence`` (best crop per sentence)."""
    restore: bool
    """TIR: masked restoration of each crop."""
    conditioning: str | None
    """Restoration decoder conditioning: ``film`` / ``cross_attention`` / ``none``; None = ``model.conditioning``."""
    whole_volume: bool = False
    """Input is the whole volume resized to ``clip.grid`` instead of crops (the ``clip`` baseline)."""
    findings: bool = False
    """Multi-label BCE on each crop's ground-truth findings (``data.findings``): the ``supervised`` control."""
    tiles: bool = False
    """The study embedding of L_align pools a fixed grid of full-resolution tiles covering the body (``tiles``
    config; GradCache step) instead of averaging the random crop sites; L_view and TIR stay on the crop views."""

    @property
    def contrastive(self) -> bool:
        """Any TCL term is on (so Y is needed)."""
        return self.view or self.align != "none"

    @property
    def uses_text(self) -> bool:
        """The run needs report features (soft targets, alignment or a text-conditioned decoder)."""
        return self.soft_targets or self.align != "none" or (self.restore and self.conditioning != "none")

    def conditioning_for(self, model_conditioning: str) -> str:
        """The decoder conditioning to build: this method's fixed choice, or the model config's."""
        return self.conditioning if self.conditioning is not None else model_conditioning


# fmt: off
_TABLE = (
    # name                  view   soft   align       restore conditioning       whole_volume findings tiles
    ("t3d",                 True,  True,  "global",   True,   None,              False,       False,   True),
    ("t3d-crops",           True,  True,  "global",   True,   None,              False,       False,   False),
    ("t3d-no-align",        True,  True,  "none",     True,   None,              False,       False,   False),
    ("t3d-hard",            True,  False, "global",   True,   None,              False,       False,   True),
    ("t3d-sentence",        True,  True,  "sentence", True,   None,              False,       False,   True),
    ("t3d-crops-sentence",  True,  True,  "sentence", True,   None,              False,       False,   False),
    ("t3d-cross-attention", True,  True,  "global",   True,   "cross_attention", False,       False,   True),
    ("t3d-uncond",          True,  True,  "global",   True,   "none",            False,       False,   True),
    ("vssl",                True,  False, "none",     True,   "none",            False,       False,   False),
    ("vssl-contrastive",    True,  False, "none",     False,  "none",            False,       False,   False),
    ("vssl-restore",        False, False, "none",     True,   "none",            False,       False,   False),
    ("clip",                False, False, "global",   False,  "none",            True,        False,   False),
    ("supervised",          False, False, "none",     False,  "none",            False,       True,    False),
)
# fmt: on
_SPECS = {row[0]: MethodSpec(*row) for row in _TABLE}


def method_spec(name: str) -> MethodSpec:
    """The row of docs/method.md §5 for ``name`` (one of ``t3d.config.METHODS``)."""
    if name not in _SPECS:
        raise ValueError(f"unknown pre-training method {name!r}; choose one of {', '.join(METHODS)}")
    return _SPECS[name]
