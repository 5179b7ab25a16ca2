"""Text-conditioned restoration decoder for text-informed image restoration, TIR (docs/method.md §3, §4).

    decoder = RestorationDecoder(encoder.feature_channels, out_channels=C, cond_dim=Et, conditioning="film")
    restored = decoder(encoder.forward_features(corrupted), cond=report_emb)   # (N, C, D, H, W)

A UNet decoder in the SwinUNETR pattern (Hatamizadeh et al. 2022) over the encoder's multi-scale maps: every map
goes through a residual 1x1 block (``UnetrBasicBlock``), then from the coarsest map up each ``UnetrUpBlock``
(transposed conv + residual 3^3 block) doubles the resolution and fuses the next skip; the last level is a light
``FullResHead`` that fuses ``feats[0]`` (the corrupted input itself, as SwinUNETR's ``encoder1``) with one narrow
residual block, and a 1x1 conv maps back to the image channels at input resolution.

The report tells the decoder what should be under the mask:
- ``film``: per-channel scale and shift from the report embedding after the bottleneck and after every up block
  (Perez et al. 2018). Zero-initialised, so the decoder starts unconditioned (h * (1 + 0) + 0) and learns to use
  the text.
- ``cross_attention``: voxel tokens of the coarsest ``attention_stages`` levels (stride 32 and 16: 27 and 216
  tokens for a 96^3 crop) attend to the report's token features; residual, output projection zero-initialised.
- ``none``: the unconditioned decoder of the ``vssl`` baselines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrUpBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

CONDITIONINGS = ("film", "cross_attention", "none")


class FiLM(nn.Module):
    """Feature-wise linear modulation: h * (1 + gamma(c)) + beta(c), identity at initialisation.

    Args:
        cond_hidden: width of the (shared) report feature c.
        channels: channels of the modulated map h.
    """

    def __init__(self, cond_hidden: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_hidden, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        gamma, beta = self.linear(c)[:, :, None, None, None].chunk(2, dim=1)  # (N, Hc) -> 2 x (N, C, 1, 1, 1)
        return h * (1.0 + gamma) + beta


class TextCrossAttention(nn.Module):
    """Voxel tokens (queries) attend to report tokens (keys/values); pre-norm, residual, zero-initialised output.

    Args:
        channels: C of the voxel map (query width).
        text_dim: Et of the report token features.
    """

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if channels % h == 0 and (channels // h >= 16 or h == 1))
        self.norm = nn.LayerNorm(channels)
        self.text_norm = nn.LayerNorm(text_dim)
        self.attn = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, h: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        n, c, d, hh, w = h.shape
        queries = self.norm(h.flatten(2).transpose(1, 2))  # (N, C, d, h, w) -> (N, dhw, C)
        ignore = ~token_mask  # nn.MultiheadAttention: True = padding
        empty = ignore.all(dim=1)  # reports without a single valid token would give NaN rows
        ignore = ignore & ~empty[:, None]
        keys = self.text_norm(tokens)
        out, _ = self.attn(queries, keys, keys, key_padding_mask=ignore, need_weights=False)  # (N, dhw, C)
        out = out.masked_fill(empty[:, None, None], 0.0)
        return h + out.transpose(1, 2).reshape(n, c, d, hh, w)


class FullResHead(nn.Module):
    """The decoder's last level: transposed conv to input resolution, concat the (corrupted) input, one 3^3 conv.

    One narrow conv instead of SwinUNETR's two residual blocks at full resolution: this level runs on D*H*W voxels
    per crop, and the decoder is discarded after pre-training, so it only has to be good enough to restore.

    Args:
        in_channels: width of the stride-2 decoder map; image_channels: C of the input skip; out_channels: width.
    """

    def __init__(self, in_channels: int, image_channels: int, out_channels: int, norm_name) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = UnetResBlock(3, out_channels + image_channels, out_channels, 3, 1, norm_name=norm_name)

    def forward(self, h: Tensor, image: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(h), image], dim=1))  # (N, d1, s/2) + (N, C, s) -> (N, d0, s)


def default_decoder_channels(feature_channels: Sequence[int], max_channels: int = 256, full_res: int = 8) -> list[int]:
    """Decoder width per level: each deeper level as wide as its feature map (SwinUNETR), capped at ``max_channels``;
    the full-resolution level ``min(feature_channels[1], full_res)`` wide.

    Both limits keep a decoder that is thrown away after pre-training light: at full resolution every channel costs
    D*H*W activations per crop (SwinUNETR-base's 48 channels would dominate memory and time for a batch of 96^3
    crops), and ResNet-50's 2048-channel stage would otherwise put ~100 M parameters into the decoder."""
    widths = [min(feature_channels[i], max_channels) for i in range(1, len(feature_channels))]
    return [min(feature_channels[1], full_res), *widths]


class RestorationDecoder(nn.Module):
    """UNet decoder from the encoder's maps back to the input resolution, optionally conditioned on the report.

    Args:
        feature_channels: the encoder's ``feature_channels``, finest (the input, stride 1) -> coarsest; each
            map must be exactly twice the size of the next.
        out_channels: C of the restored image (the crop's channels).
        cond_dim: Et, width of the report embedding (``film``) and of its token features (``cross_attention``).
        conditioning: ``film``, ``cross_attention`` or ``none``.
        decoder_channels: width per level (default ``default_decoder_channels``).
        attention_stages: cross-attention at this many of the coarsest levels.
        cond_hidden: width of the shared report MLP feeding the FiLM layers (default ``min(cond_dim, 256)``).
        norm_name: normalisation of the conv blocks (MONAI name and arguments). Default GroupNorm with 4 groups,
            not SwinUNETR's instance norm, which fails (training) or zeroes the map (eval) at a one-voxel
            bottleneck, i.e. for 32^3 crops.
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        out_channels: int,
        cond_dim: int,
        conditioning: str = "film",
        decoder_channels: Sequence[int] | None = None,
        attention_stages: int = 2,
        cond_hidden: int | None = None,
        norm_name: str | tuple = ("group", {"num_groups": 4}),
    ) -> None:
        super().__init__()
        levels = len(feature_channels)
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"RestorationDecoder: conditioning={conditioning!r} is not one of {CONDITIONINGS}")
        if levels < 2:
            raise ValueError(f"RestorationDecoder needs >= 2 feature maps, got feature_channels={feature_channels}")
        if conditioning != "none" and cond_dim < 1:
            raise ValueError(f"RestorationDecoder: conditioning={conditioning!r} needs cond_dim >= 1, got {cond_dim}")
        dec = list(decoder_channels) if decoder_channels is not None else default_decoder_channels(feature_channels)
        if len(dec) != levels:
            raise ValueError(f"decoder_channels has {len(dec)} widths for {levels} feature maps: {dec}")
        groups = norm_name[1].get("num_groups", 1) if isinstance(norm_name, tuple) and norm_name[0] == "group" else 1
        if any(d % groups for d in dec):
            raise ValueError(f"decoder_channels {dec} must be multiples of {groups} (GroupNorm groups)")
        if not 1 <= attention_stages <= levels:
            raise ValueError(f"attention_stages must be in [1, {levels}], got {attention_stages}")
        self.feature_channels, self.decoder_channels = list(feature_channels), dec
        self.conditioning, self.cond_dim = conditioning, cond_dim
        self.grad_checkpointing = False

        def conv_block(cin: int, cout: int, kernel_size: int) -> nn.Module:
            return UnetrBasicBlock(3, cin, cout, kernel_size, stride=1, norm_name=norm_name, res_block=True)

        def up_block(cin: int, cout: int) -> nn.Module:
            return UnetrUpBlock(
                3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True
            )

        # 1x1 blocks on the encoder's maps, which are already spatially mixed: a 3^3 block on ResNet-50's
        # 2048-channel map alone would cost 14 M parameters. The full-resolution level is a light head (see
        # FullResHead): residual blocks there cost more than the whole encoder (measured: 97 % of a step's FLOPs
        # and 95 % of its memory with resnet/tiny on 96^3 crops, benchmarks/pretrain_step.py).
        self.skips = nn.ModuleList(
            nn.Identity() if i == 0 else conv_block(c, d, 1) for i, (c, d) in enumerate(zip(feature_channels, dec))
        )
        self.ups = nn.ModuleList(
            FullResHead(dec[1], feature_channels[0], dec[0], norm_name) if i == 0 else up_block(dec[i + 1], dec[i])
            for i in range(levels - 1)
        )
        self.out = UnetOutBlock(3, dec[0], out_channels)

        self.cond_net: nn.Module | None = None
        self.films = nn.ModuleList()
        self.attns = nn.ModuleDict()
        if conditioning == "film":
            hidden = cond_hidden or min(cond_dim, 256)
            # LayerNorm first: centred, L2-normalised report embeddings have entries ~1/sqrt(Et).
            self.cond_net = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, hidden), nn.GELU())
            self.films = nn.ModuleList(FiLM(hidden, d) for d in dec)
        elif conditioning == "cross_attention":
            for i in range(levels - attention_stages, levels):
                self.attns[str(i)] = TextCrossAttention(dec[i], cond_dim)

    def _check_inputs(
        self, feats: Sequence[Tensor], cond: Tensor | None, tokens: Tensor | None, token_mask: Tensor | None
    ) -> Tensor | None:
        if len(feats) != len(self.feature_channels):
            raise ValueError(f"RestorationDecoder built for {len(self.feature_channels)} maps, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.feature_channels)):
            if f.ndim != 5 or f.shape[1] != c:
                raise ValueError(f"feature map {i}: expected (N, {c}, D, H, W), got {tuple(f.shape)}")
            if i and tuple(feats[i - 1].shape[2:]) != tuple(2 * s for s in f.shape[2:]):
                raise ValueError(
                    f"feature map {i - 1} {tuple(feats[i - 1].shape[2:])} must be twice map {i} "
                    f"{tuple(f.shape[2:])}: crop sides must be multiples of 32 voxels (crops.size)"
                )
        n = feats[0].shape[0]
        if self.conditioning == "film":
            if cond is None:
                raise ValueError("RestorationDecoder(conditioning='film') needs cond=(N, Et) report embeddings")
            if tuple(cond.shape) != (n, self.cond_dim):
                raise ValueError(f"cond must be ({n}, {self.cond_dim}), got {tuple(cond.shape)}")
        if self.conditioning == "cross_attention":
            if tokens is None:
                raise ValueError(
                    "RestorationDecoder(conditioning='cross_attention') needs tokens=(N, L, Et) report token "
                    "features (load_text_features(..., tokens=True))"
                )
            if tokens.ndim != 3 or tokens.shape[0] != n or tokens.shape[2] != self.cond_dim:
                raise ValueError(f"tokens must be ({n}, L, {self.cond_dim}), got {tuple(tokens.shape)}")
            if token_mask is None:
                return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            if tuple(token_mask.shape) != tuple(tokens.shape[:2]):
                raise ValueError(f"token_mask must be {tuple(tokens.shape[:2])}, got {tuple(token_mask.shape)}")
            return token_mask.bool()
        return None

    def forward(
        self,
        feats: Sequence[Tensor],
        cond: Tensor | None = None,
        tokens: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> Tensor:
        """Restore the input from its multi-scale features.

        Args:
            feats: the encoder's maps, finest -> coarsest [(N, C_i, D/2^i, H/2^i, W/2^i)].
            cond: (N, Et) report embedding (``film``; ignored otherwise).
            tokens: (N, L, Et) report token features (``cross_attention``; ignored otherwise).
            token_mask: (N, L) bool, True = valid token (default: all valid).

        Returns:
            (N, out_channels, D, H, W) restored image, no output activation.
        """
        token_mask = self._check_inputs(feats, cond, tokens, token_mask)
        c = self.cond_net(cond) if self.cond_net is not None else None  # (N, Et) -> (N, Hc)
        top = len(feats) - 1
        h = self._condition(top, self.skips[top](feats[top]), c, tokens, token_mask)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i in range(top - 1, -1, -1):
            # (N, d_{i+1}, s) -> (N, d_i, 2s); the fine levels hold most of the decoder's activations
            args = (i, h, feats[i], c, tokens, token_mask)
            h = checkpoint(self._level, *args, use_reentrant=False) if use_ckpt else self._level(*args)
        return self.out(h)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each up level's activations in backward (same outputs and gradients, less memory)."""
        self.grad_checkpointing = enable

    def _level(
        self, i: int, h: Tensor, skip: Tensor, c: Tensor | None, tokens: Tensor | None, token_mask: Tensor | None
    ) -> Tensor:
        h = self.ups[i](h, self.skips[i](skip))
        return self._condition(i, h, c, tokens, token_mask)

    def _condition(
        self, level: int, h: Tensor, c: Tensor | None, tokens: Tensor | None, token_mask: Tensor | None
    ) -> Tensor:
        if c is not None:
            h = self.films[level](h, c)
        if str(level) in self.attns:
            h = self.attns[str(level)](h, tokens, token_mask)
        return h
