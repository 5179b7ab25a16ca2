"""The pre-training model: image encoder + projection heads + text-conditioned restoration decoder (docs/method.md §3).

The model returns tensors; the loss is a separate object (``t3d.losses.PretrainObjective``). One forward pass serves
both pretext tasks. With restoration and contrastive terms on, the *second* view of every site is masked and
restored, the first stays clean: L_view then pairs a clean view with a masked one (masking as strong augmentation),
and the study embedding that meets the report in L_align is built from the clean views only. Methods without
contrastive terms mask and restore both views; methods without restoration see clean views.

Two heads read the encoder's pooled crop features: ``image_head`` gives each crop its L_view embedding z, and
``align_head`` (``StudyHead``, methods with ``align: global``) gives the study embedding u from the mean of a study's
pooled features. ``study_embedding`` is that function; evaluation calls the same one.

Clean and masked crops go through the encoder in separate calls: batch-dependent norm layers (the ResNet's
BatchNorm) then never mix the statistics of clean and half-hidden crops, which would make a clean crop's embedding
depend on what was hidden in other crops of the batch.

Tiled methods (``spec.tiles``) keep L_view and TIR on the crop views but take the study embedding of L_align from
the study's fixed grid of full-resolution tiles: ``tile_features`` encodes tiles, ``TilePooling`` pools them. The
tile features come either from a forward with a graph (``forward`` without ``tile_feats``: evaluation and the
reference path of the tests) or, in training, from GradCache (``t3d.pretrain.gradcache``), which hands ``forward``
graph-free features as a leaf and back-propagates their gradient through the encoder chunk by chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from t3d.config import PretrainConfig
from t3d.losses import MethodSpec, corrupt, random_cube_mask
from t3d.models import (
    CellFindingHead,
    LogitScale,
    ProjectionHead,
    RestorationDecoder,
    StudyHead,
    TilePooling,
    build_encoder,
)


class PretrainModel(nn.Module):
    """Everything that carries trainable weights during pre-training.

    ``text_dim``: width Et of the frozen report embedding. Frozen text features are inputs, not submodules: they
    are computed once and cached (``t3d.text``), so training never runs the text encoder. ``num_findings``: L, the
    findings the ``supervised`` control predicts per crop (its linear ``finding_head``; unused by the other methods).
    """

    def __init__(self, cfg: PretrainConfig, spec: MethodSpec, text_dim: int, num_findings: int = 0):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        channels = cfg.crops.channels
        size = cfg.clip.grid if spec.whole_volume else cfg.crops.size
        self.encoder = build_encoder(cfg.model, in_channels=channels, img_size=tuple(size))
        self.encoder.set_grad_checkpointing(cfg.model.grad_checkpointing)
        width = cfg.model.embed_dim
        # The whole-volume baseline has no crop-level term: its only image head is the study head.
        self.image_head = None if spec.whole_volume else ProjectionHead(self.encoder.embed_channels, width)
        # Crop methods align the StudyHead over pooled crops; tiled methods their TilePooling (below).
        global_crops = spec.align == "global" and not spec.tiles
        self.align_head = StudyHead(self.encoder.embed_channels, width) if global_crops else None
        self.text_head = ProjectionHead(text_dim, width) if spec.align != "none" else None
        self.logit_scale = LogitScale(cfg.loss.tau_align) if spec.align != "none" else None
        self.conditioning = spec.conditioning or cfg.model.conditioning
        self.decoder = (
            RestorationDecoder(
                self.encoder.feature_channels,
                channels,
                text_dim,
                conditioning=self.conditioning,
                finest_skip=cfg.model.decoder_finest_skip,
            )
            if spec.restore
            else None
        )
        if self.decoder is not None:
            self.decoder.set_grad_checkpointing(cfg.model.grad_checkpointing)
        if spec.findings and num_findings < 1:
            raise ValueError(f"method {spec.name!r} predicts findings: num_findings must be >= 1, got {num_findings}")
        self.finding_level = cfg.model.finding_level
        self.finding_head: nn.Module | None = None
        if spec.findings:
            self.finding_head = (
                CellFindingHead(self.encoder.feature_channels[self.finding_level], num_findings)
                if self.finding_level
                else nn.Linear(self.encoder.embed_channels, num_findings)
            )
        self.tile_pool = None
        if spec.tiles:
            if cfg.model.encoder == "resnet" and cfg.model.norm == "batch":
                raise ValueError(
                    f"method {spec.name!r} embeds each study from its tiles in chunks (GradCache), which is exact only "
                    "with norm layers that do not depend on the batch; model.norm=batch is not: set model.norm=group "
                    "(or instance) in the config or on the command line (--model.norm group)"
                )
            self.tile_pool = TilePooling(self.encoder.embed_channels, width, cfg.tiles.heads, cfg.tiles.frequencies)

    def tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (N, F) of N tiles (N, C, D, H, W): the unit that GradCache caches."""
        return self.encoder.pool(self.encoder.forward_features(tiles))

    def tile_study_outputs(self, batch: dict, tile_feats: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Study-level outputs of the tiled path from ``batch["tiles"]`` (B, T, C, D, H, W), ``tile_pos`` (B, T, 3),
        ``tile_mask`` (B, T): ``study_emb`` (B, E) and, for ``align: sentence``, ``tile_emb`` (B, T, E) with
        ``tile_mask``. ``tile_feats``: features (N, F) of the N real tiles in batch order (GradCache's leaf);
        None encodes them here with a graph."""
        mask = batch["tile_mask"].bool()
        b, t = mask.shape
        real = mask.flatten().nonzero().squeeze(1)
        if tile_feats is None:
            tile_feats = self.tile_features(batch["tiles"].flatten(0, 1).index_select(0, real))
        feats = tile_feats.new_zeros(b * t, tile_feats.shape[-1]).index_copy(0, real, tile_feats).view(b, t, -1)
        pos = batch["tile_pos"].to(feats.dtype)
        out = {"study_emb": self.tile_pool(feats, pos, mask)}
        if self.spec.align == "sentence":
            out["tile_emb"], out["tile_mask"] = self.tile_pool.tile_embeddings(feats, pos), mask
        return out

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        text: dict[str, torch.Tensor],
        generator=None,
        tile_feats: torch.Tensor | None = None,
    ) -> dict:
        """``batch["views"]``: (B, K, 2, C, D, H, W) crops, or ``batch["volume"]``: (B, C, D, H, W) for ``clip``;
        tiled methods also read ``tiles`` / ``tile_pos`` / ``tile_mask`` (see ``tile_study_outputs``, which also
        explains ``tile_feats``).

        ``text``: per-study frozen features for this batch: ``frozen`` (B, Et) centred + normalised, and when needed
        ``tokens`` (B, L, Et) / ``token_mask`` (B, L), ``sent`` (S, Et) / ``sent_owner`` (S,) local study indices.
        """
        if self.spec.whole_volume:
            return self._forward_whole(batch["volume"], text)
        views = batch["views"]
        if self.finding_head is not None and self.decoder is None and not self.spec.contrastive:
            views = views[:, :, :1]  # the findings control uses one view per site: the second adds nothing to it
        b, k, v = views.shape[:3]
        x = views.flatten(0, 2)  # (B*K*2, C, D, H, W), ordered (study, site, view)
        out: dict[str, torch.Tensor] = {"frozen_text": text["frozen"]}
        restore_idx = self._restored_crops(b, k, v, x.device)
        if restore_idx is None:
            feats = self.encoder.forward_features(x)
        else:
            mask = random_cube_mask(
                (len(restore_idx), 1, *x.shape[2:]), self.cfg.loss.mask_ratio, self.cfg.loss.mask_block, generator
            ).to(x.device)
            feats = self._encode_apart(x, restore_idx, corrupt(x[restore_idx], mask))
        pooled = self.encoder.pool(feats).view(b, k, v, -1)  # (B, K, 2, C)
        out["crop_emb"] = self.image_head(pooled)  # (B, K, 2, E), L2-normalised
        if self.tile_pool is not None:
            out.update(self.tile_study_outputs(batch, tile_feats))
        else:
            clean = pooled[:, :, 0] if restore_idx is not None and self.spec.contrastive else pooled.flatten(1, 2)
            out["study_emb"] = self.study_embedding(clean)  # (B, E)
        if restore_idx is not None:
            per_study = len(restore_idx) // b
            cond, tokens, token_mask = self._conditioning_inputs(text, repeat=per_study)
            picked = [f.index_select(0, restore_idx) for f in feats]
            out["restored"] = self.decoder(picked, cond=cond, tokens=tokens, token_mask=token_mask)
            out["target"], out["mask"] = x[restore_idx], mask
        if self.finding_head is not None:
            # Per-crop targets (pretrain.data.FindingTargets): each site's first view meets what that crop holds.
            out["finding_logits"] = self.finding_logits(feats, pooled.flatten(0, 2)).view(b, k, v, -1)[:, :, 0]
            out["finding_targets"] = text["findings"]  # (B, K, L)
        self._text_outputs(out, text)
        return out

    def finding_logits(self, feats: list[torch.Tensor], pooled: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L) finding logits of N crops from their encoder maps (``pooled``: their pooled features, computed
        here when not given; the head reads them where ``model.finding_level`` is 0)."""
        if self.finding_head is None:
            raise ValueError(f"method {self.spec.name!r} has no finding head (only the supervised control does)")
        if self.finding_level:
            return self.finding_head(feats[self.finding_level])
        return self.finding_head(self.encoder.pool(feats) if pooled is None else pooled)

    def study_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """Study embeddings (B, E), unit norm, from the pooled features (B, K, C) of each study's K crops (``clip``:
        K = 1, the whole volume): the study head where the method aligns studies with reports, else the normalised
        mean of the crops' view embeddings. Training and evaluation both call this."""
        if self.align_head is not None:
            return self.align_head(pooled)
        return nn.functional.normalize(self.image_head(pooled).mean(dim=1), dim=-1)

    def _encode_apart(self, x: torch.Tensor, restore_idx: torch.Tensor, corrupted: torch.Tensor) -> list:
        """Encoder feature maps of every crop of ``x`` (in its order), with the crops at ``restore_idx`` replaced by
        ``corrupted``; clean and masked crops in separate encoder calls (separate BatchNorm statistics)."""
        n = x.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=x.device)
        keep[restore_idx] = False
        clean_idx = keep.nonzero().squeeze(1)
        masked = self.encoder.forward_features(corrupted)
        if clean_idx.numel() == 0:
            return [f.new_empty((n, *f.shape[1:])).index_copy(0, restore_idx, f) for f in masked]
        clean = self.encoder.forward_features(x[clean_idx])
        return [
            c.new_empty((n, *c.shape[1:])).index_copy(0, clean_idx, c).index_copy(0, restore_idx, m)
            for c, m in zip(clean, masked)
        ]

    def _restored_crops(self, b: int, k: int, v: int, device) -> torch.Tensor | None:
        """Flat indices of the crops that are masked and restored: view 1 of every site, or every view when the
        method has no contrastive term; None without restoration. Ordered by study, so each study owns a block."""
        if self.decoder is None:
            return None
        grid = torch.arange(b * k * v, device=device).view(b, k, v)
        return (grid[:, :, 1] if self.spec.contrastive else grid).flatten()

    def _forward_whole(self, volume: torch.Tensor, text: dict[str, torch.Tensor]) -> dict:
        pooled = self.encoder.pool(self.encoder.forward_features(volume))  # (B, C)
        out = {"frozen_text": text["frozen"], "study_emb": self.study_embedding(pooled[:, None])}  # (B, E)
        self._text_outputs(out, text)
        return out

    def _text_outputs(self, out: dict, text: dict[str, torch.Tensor]) -> None:
        if self.text_head is None:
            return
        out["text_emb"] = self.text_head(text["frozen"])  # (B, E)
        out["logit_scale"] = self.logit_scale()
        if self.spec.align == "sentence":
            out["sent_emb"] = self.text_head(text["sent"])  # (S, E)
            out["sent_owner"] = text["sent_owner"]

    def _conditioning_inputs(self, text: dict[str, torch.Tensor], repeat: int):
        """Repeat each study's report features for its K*2 crops; None where the decoder is unconditioned."""
        if self.conditioning == "none":
            return None, None, None
        if self.conditioning == "film":
            return text["frozen"].repeat_interleave(repeat, dim=0), None, None
        tokens = text["tokens"].repeat_interleave(repeat, dim=0)
        return None, tokens, text["token_mask"].repeat_interleave(repeat, dim=0)
