"""Text-informed image restoration (TIR, docs/method.md §4): random cube masking, corruption, masked L1.

    mask = random_cube_mask(views.shape, ratio=0.5, block=8, generator=g)    # (N, 1, D, H, W) bool, True = hidden
    x_in = corrupt(views, mask)                                               # what the encoder sees
    restored = decoder(encoder.forward_features(x_in), cond=report)           # (N, C, D, H, W)
    loss = restoration_loss(restored, views, mask, visible_weight=0.1)

Fill value: masked voxels are set to 0 in windowed units, i.e. the lower end of every HU window (air in the
default -1000..1000 window). A constant, not the crop mean or random intensities: the mean would leak the
crop's intensity statistics into the hidden region, and random values look like texture the encoder would have
to learn to ignore; an air-coloured cube is an unmistakable "nothing known here", the same in every channel, and
is what Swin UNETR's SSL cut-out and SimMIM-style zero masking do in spirit. Optional Gaussian noise is added to the
whole crop (Models Genesis-style denoising on the visible voxels, which the small visible-voxel term rewards).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FILL_VALUE = 0.0


def random_cube_mask(
    shape: tuple[int, ...] | torch.Size,
    ratio: float,
    block: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random cubes of edge ``block`` voxels hiding about ``ratio`` of each volume; True = hidden.

    shape: (N, 1, D, H, W) (or (N, C, D, H, W): one mask per sample, returned with channel 1) or (D, H, W).
    Each axis is divided into ceil(size / block) cells; exactly round(ratio · cells) cells are chosen per sample
    (at least one, and at least one left visible), upsampled to voxels and cropped to the volume. When a size is
    not a multiple of ``block`` the border cells are partial, so the voxel fraction is ≈ ``ratio``.
    ``generator`` makes the mask reproducible (drawn on the generator's device); the result is moved to ``device``.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"random_cube_mask: ratio must be in (0, 1), got {ratio}")
    if block < 1:
        raise ValueError(f"random_cube_mask: block must be >= 1 voxel, got {block}")
    shape = tuple(shape)
    if len(shape) == 3:
        n, spatial = None, shape
    elif len(shape) == 5:
        n, spatial = shape[0], shape[2:]
    else:
        raise ValueError(f"random_cube_mask: shape must be (D, H, W) or (N, C, D, H, W), got {shape}")
    grid = [math.ceil(s / block) for s in spatial]
    cells = grid[0] * grid[1] * grid[2]
    k = min(max(round(ratio * cells), 1), max(cells - 1, 1))
    count = 1 if n is None else n
    where = generator.device if generator is not None else "cpu"
    order = torch.rand(count, cells, generator=generator, device=where).argsort(dim=1)  # a permutation per sample
    coarse = torch.zeros(count, cells, dtype=torch.bool, device=where)
    coarse.scatter_(1, order[:, :k], True)
    coarse = coarse.view(count, *grid)
    for axis in (1, 2, 3):
        coarse = coarse.repeat_interleave(block, dim=axis)
    mask = coarse[:, : spatial[0], : spatial[1], : spatial[2]]
    mask = mask[0] if n is None else mask[:, None]
    return mask.to(device) if device is not None else mask


def corrupt(
    x: torch.Tensor,
    mask: torch.Tensor,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    fill: float = FILL_VALUE,
) -> torch.Tensor:
    """Hide masked voxels and optionally add noise; x (N, C, D, H, W), mask (N, 1 | C, D, H, W) bool, True = hidden.

    Masked voxels become ``fill`` (0 = the window's low end / air; see module doc); then, if ``noise_std`` > 0,
    Gaussian noise of that standard deviation (windowed units) is added to every voxel. Returns a new tensor.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"corrupt: mask must be bool (True = hidden), got {mask.dtype}")
    out = x.masked_fill(mask, fill)
    if noise_std > 0:
        where = generator.device if generator is not None else out.device
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=where)
        out = out + noise_std * noise.to(out.device)
    return out


def restoration_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, visible_weight: float = 0.0
) -> torch.Tensor:
    """L1 on hidden voxels (mean over hidden) + ``visible_weight`` · L1 on visible voxels (mean over visible).

    pred, target: (N, C, D, H, W); mask: (N, 1 | C, D, H, W) bool, True = hidden (broadcast over channels).
    Means count every channel of every voxel. Returns a scalar (at least float32).
    """
    if pred.shape != target.shape:
        raise ValueError(f"restoration_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    low = (torch.float16, torch.bfloat16)
    pred, target = (x.float() if x.dtype in low else x for x in (pred, target))
    err = F.l1_loss(pred, target, reduction="none")
    hidden = mask.expand_as(err).to(err.dtype)
    loss = (err * hidden).sum() / hidden.sum().clamp_min(1.0)
    if visible_weight > 0:
        visible = 1.0 - hidden
        loss = loss + visible_weight * (err * visible).sum() / visible.sum().clamp_min(1.0)
    return loss
