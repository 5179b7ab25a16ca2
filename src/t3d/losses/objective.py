"""The pre-training objective: ``L = λ_tcl · (L_view + λ_align · L_align) + λ_tir · TIR`` (docs/method.md §4).

    objective = PretrainObjective(cfg.loss, method_spec(cfg.method))
    terms = objective(out)            # {"view": ..., "align": ..., "restore": ..., "tcl": ..., "loss": ...}
    terms["loss"].backward()

The model returns a dict of tensors (this rank's B studies, K sites, 2 views each):

- ``crop_emb`` (B, K, 2, E) normalised crop embeddings — for ``view`` and ``align: sentence``;
- ``study_emb`` (B, E) normalised study embeddings (``PretrainModel.study_embedding``: the study head over the pooled
  features of a study's clean crops, the whole volume for ``clip``), ``text_emb`` (B, E) normalised projected report
  embeddings — for ``align: global``;
- ``frozen_text`` (B, Et) normalised, corpus-centred frozen report embeddings s — for soft targets;
- ``sent_emb`` (S, E) normalised projected sentence embeddings, ``sent_owner`` (S,) local study index — for
  ``align: sentence``; tiled methods: ``tile_emb`` (B, T, E) tiles in the joint space, ``tile_mask`` (B, T) bool
  (False = padding), and ``study_emb`` is the attention pooling of the tiles;
- ``logit_scale`` optional scalar tensor, the learnable 1/τ of L_align (``log_scale.exp()``); it belongs in the
  model so DDP averages its gradient like any other parameter. Absent: fixed 1 / ``loss.tau_align``;
- ``restored`` / ``target`` (N, C, D, H, W), ``mask`` (N, 1, D, H, W) bool, True = hidden — for TIR;
- ``finding_logits`` / ``finding_targets`` (B, K, L) per crop site (any matching shape is accepted) — for the
  ``supervised`` control's multi-label BCE, the mean over crops and findings.

Returned keys: only the terms the method uses (``view``, ``align``, ``tcl``, ``restore``), ``loss``, and the
diagnostics ``target_self_prob`` (mean diagonal of Y) and ``target_entropy`` (mean row entropy H(Y), the floor of
every soft cross-entropy against Y; any contrastive method), ``tau_align`` (align methods) and
``study_cos`` (mean pairwise cosine of the batch's study embeddings, global align: near 1 = collapsed joint space).
A run uses one method, so its log schema is stable (``term_names()`` lists it); absent terms are not logged as
misleading zeros. Terms keep their graph (``.item()`` them for logging; ``t3d.distributed.all_reduce_mean`` for the
mean over ranks).

The losses run with autocast switched off and bf16/fp16 inputs upcast to float32: a bf16 matmul has ~3 significant
digits, i.e. errors of ~0.3 in a logit of scale 100, which is noise the soft targets cannot afford.
"""

from __future__ import annotations

import torch
from torch import nn

from t3d.config import LossConfig
from t3d.distributed import all_gather_no_grad, world_size
from t3d.losses.affinity import hard_targets, target_entropy, target_self_prob, text_affinity_targets
from t3d.losses.contrastive import align_loss, sentence_align_loss, view_loss
from t3d.losses.methods import MethodSpec
from t3d.losses.restoration import restoration_loss


def _need(out: dict[str, torch.Tensor], key: str, spec: MethodSpec, why: str) -> torch.Tensor:
    if key not in out:
        raise KeyError(f"method {spec.name!r} needs model output {key!r} ({why}); the model returned {sorted(out)}")
    return out[key]


class PretrainObjective(nn.Module):
    """Weighted sum of the terms a method uses; no parameters of its own (the learnable τ lives in the model)."""

    def __init__(self, loss_cfg: LossConfig, spec: MethodSpec):
        super().__init__()
        self.cfg = loss_cfg
        self.spec = spec

    def targets(self, out: dict[str, torch.Tensor], b_local: int, device: torch.device) -> torch.Tensor:
        """Y over the global batch (world·B, world·B): report affinities, or the identity for hard targets."""
        if not self.spec.soft_targets:
            return hard_targets(b_local * world_size(), device=device)
        s = _need(out, "frozen_text", self.spec, "soft targets Y come from frozen report embeddings")
        cfg = self.cfg
        return text_affinity_targets(all_gather_no_grad(s), cfg.affinity_threshold, cfg.affinity_alpha, cfg.tau_text)

    def logit_scale(self, out: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The model's learnable 1/τ of L_align (``out["logit_scale"]``), else the fixed 1 / ``loss.tau_align``."""
        if "logit_scale" in out:
            return out["logit_scale"]
        return torch.tensor(1.0 / self.cfg.tau_align, device=device)

    def _align(self, out: dict[str, torch.Tensor], y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.spec.align == "global":
            u = _need(out, "study_emb", self.spec, "global alignment of the study embedding with its report")
            t = _need(out, "text_emb", self.spec, "global alignment of the study embedding with its report")
            return align_loss(u, t, y, scale)
        sent = _need(out, "sent_emb", self.spec, "sentence alignment needs projected sentence embeddings")
        owner = _need(out, "sent_owner", self.spec, "sentence alignment needs each sentence's study index")
        if self.spec.tiles:  # each sentence against its best tile
            z = _need(out, "tile_emb", self.spec, "tiled sentence alignment matches sentences to tiles")
            return sentence_align_loss(z, sent, owner, y, scale, crop_mask=out["tile_mask"])
        z = _need(out, "crop_emb", self.spec, "sentence alignment matches sentences to crops")
        return sentence_align_loss(z.flatten(1, 2), sent, owner, y, scale)

    def term_names(self) -> list[str]:
        """The keys ``forward`` returns for this method, in order (a stable log schema)."""
        spec = self.spec
        names = ["target_self_prob", "target_entropy"] if spec.contrastive else []
        names += ["view"] if spec.view else []
        names += ["align", "tau_align"] if spec.align != "none" else []
        names += ["study_cos"] if spec.align == "global" else []
        names += ["tcl"] if spec.contrastive else []
        names += ["restore"] if spec.restore else []
        names += ["findings"] if spec.findings else []
        return names + ["loss"]

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every active term, the diagnostics and the weighted ``loss`` (see the module docstring)."""
        device_type = next(v for v in out.values() if torch.is_tensor(v)).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._terms(out)

    def _terms(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec, cfg = self.spec, self.cfg
        terms: dict[str, torch.Tensor] = {}
        loss: torch.Tensor | None = None
        if spec.contrastive:
            anchor = _need(out, "crop_emb", spec, "L_view") if spec.view else _need(out, "study_emb", spec, "L_align")
            y = self.targets(out, anchor.shape[0], anchor.device)
            terms["target_self_prob"] = target_self_prob(y)
            terms["target_entropy"] = target_entropy(y)
            tcl: torch.Tensor | None = None
            if spec.view:
                z = _need(out, "crop_emb", spec, "L_view contrasts the two views of each site")  # (B, K, 2, E)
                terms["view"] = tcl = view_loss(z[:, :, 0], z[:, :, 1], y, cfg.tau_view)
            if spec.align != "none":
                scale = self.logit_scale(out, anchor.device)
                terms["align"] = self._align(out, y, scale)
                terms["tau_align"] = (1.0 / scale).detach()
                if spec.align == "global":
                    terms["study_cos"] = mean_pairwise_cosine(out["study_emb"].detach())
                weighted = cfg.lambda_align * terms["align"]
                tcl = weighted if tcl is None else tcl + weighted
            terms["tcl"] = tcl
            loss = cfg.lambda_tcl * tcl
        if spec.restore:
            pred = _need(out, "restored", spec, "TIR restores masked crops")
            target = _need(out, "target", spec, "TIR compares with the clean crops")
            mask = _need(out, "mask", spec, "TIR's loss is on the hidden voxels")
            terms["restore"] = restoration_loss(pred, target, mask, cfg.visible_weight)
            weighted = cfg.lambda_tir * terms["restore"]
            loss = weighted if loss is None else loss + weighted
        if spec.findings:
            logits = _need(out, "finding_logits", spec, "the supervised control predicts the study's findings")
            y = _need(out, "finding_targets", spec, "the supervised control needs ground-truth findings")
            dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 upcast, float64 kept
            terms["findings"] = nn.functional.binary_cross_entropy_with_logits(logits.to(dtype), y.to(dtype))
            loss = terms["findings"] if loss is None else loss + terms["findings"]
        terms["loss"] = loss
        return terms


def mean_pairwise_cosine(u: torch.Tensor) -> torch.Tensor:
    """Mean cosine between the different rows of ``u`` (B, E): a collapse monitor for the joint space. Near 1, every
    study embeds to the same point and L_align sits at log B whatever the reports say."""
    if u.shape[0] < 2:
        return u.new_tensor(float("nan"))
    z = torch.nn.functional.normalize(u.float(), dim=-1)
    sim = z @ z.T
    b = z.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))
