"""Losses of docs/method.md §4: text-affinity targets, soft-target contrastive terms, masked restoration, the
objective."""

from t3d.losses.affinity import calibrate_tau_text, hard_targets, target_self_prob, text_affinity_targets
from t3d.losses.contrastive import (
    align_loss,
    local_target_rows,
    sentence_align_loss,
    sentence_similarity,
    soft_cross_entropy,
    view_loss,
)
from t3d.losses.methods import MethodSpec, method_spec
from t3d.losses.objective import PretrainObjective
from t3d.losses.restoration import corrupt, random_cube_mask, restoration_loss

__all__ = [
    "MethodSpec",
    "PretrainObjective",
    "align_loss",
    "calibrate_tau_text",
    "corrupt",
    "hard_targets",
    "local_target_rows",
    "method_spec",
    "random_cube_mask",
    "restoration_loss",
    "sentence_align_loss",
    "sentence_similarity",
    "soft_cross_entropy",
    "target_self_prob",
    "text_affinity_targets",
    "view_loss",
]
