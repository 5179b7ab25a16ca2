"""Attention pooling of a study's tiles into one study embedding (docs/method.md §3, tiled study path).

    pool = TilePooling(encoder.embed_channels, cfg.model.embed_dim, heads=4, frequencies=4)
    u = pool(feats, pos, mask)          # feats (B, T, F) pooled encoder features of each tile, pos (B, T, 3) in
                                        # [-1, 1], mask (B, T) True = real tile  ->  u (B, E) unit norm
    z = pool.tile_embeddings(feats, pos)  # (B, T, E) unit norm: each tile in the joint space (align: sentence)

Each tile's token is its LayerNorm-ed feature plus a learned projection of a sine/cosine encoding of its centre in
normalised body coordinates, so the pooling knows *where* in the body a tile is (apex vs base of the lung). One
learned query attends over the tokens (``nn.MultiheadAttention``, padded tiles masked out); the attended vector
goes through a projection head into the joint space. Nothing here mixes samples of a batch: a study's embedding
depends on its own tiles only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from t3d.models.heads import ProjectionHead


def fourier_positions(pos: Tensor, frequencies: int) -> Tensor:
    """(..., 3) coordinates in [-1, 1] -> (..., 6 * frequencies): sin and cos of 2^k * pi * x per axis."""
    scales = (2.0 ** torch.arange(frequencies, device=pos.device, dtype=pos.dtype)) * math.pi  # (f,)
    angles = (pos[..., :, None] * scales).flatten(-2)  # (..., 3 f)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TilePooling(nn.Module):
    """Position-aware attention pooling of tile features -> normalised study embedding.

    Args:
        in_dim: F, width of each tile's pooled encoder features (``Encoder.embed_channels``).
        out_dim: E, width of the joint image/text space.
        heads: attention heads (must divide ``in_dim``).
        frequencies: sine/cosine frequencies per axis of the position encoding.
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int = 4, frequencies: int = 4) -> None:
        super().__init__()
        if in_dim % heads:
            raise ValueError(
                f"tiles.heads={heads} must divide the encoder's pooled width {in_dim}; choose e.g. tiles.heads=4"
            )
        self.frequencies = frequencies
        self.norm = nn.LayerNorm(in_dim)
        self.position = nn.Sequential(nn.Linear(6 * frequencies, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim))
        self.query = nn.Parameter(torch.randn(1, 1, in_dim) * in_dim**-0.5)
        self.attention = nn.MultiheadAttention(in_dim, heads, batch_first=True)
        self.head = ProjectionHead(in_dim, out_dim)

    def tokens(self, feats: Tensor, pos: Tensor) -> Tensor:
        """(B, T, F) tile features + encoded (B, T, 3) positions -> (B, T, F) tokens."""
        return self.norm(feats) + self.position(fourier_positions(pos.to(feats.dtype), self.frequencies))

    def forward(self, feats: Tensor, pos: Tensor, mask: Tensor | None = None) -> Tensor:
        """Study embeddings (B, E), unit norm. ``mask`` (B, T) bool, True = a real tile (default: all real)."""
        if feats.ndim != 3 or pos.shape != (*feats.shape[:2], 3):
            raise ValueError(f"TilePooling expects feats (B, T, F) and pos (B, T, 3), got {feats.shape}, {pos.shape}")
        tokens = self.tokens(feats, pos)
        query = self.query.expand(feats.shape[0], -1, -1).to(tokens.dtype)
        padding = None if mask is None else ~mask.bool()
        pooled, _ = self.attention(query, tokens, tokens, key_padding_mask=padding, need_weights=False)
        return self.head(pooled[:, 0])

    def tile_embeddings(self, feats: Tensor, pos: Tensor) -> Tensor:
        """Every tile in the joint space (B, T, E), unit norm: its token through the same projection head."""
        return self.head(self.tokens(feats, pos))
