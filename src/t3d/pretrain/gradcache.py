"""Exact, memory-bounded gradients of the tiled study embedding: GradCache (Gao et al. 2021, arXiv 2101.06983).

    terms = gradcache_step(core, objective, batch, text, generator, backward=lambda l: l.backward(), chunk=8)

A study embedding pools *all* tiles of a study; a graph through the encoder for B x T full-resolution tiles does
not fit any accelerator. The loss depends on the encoder's tile outputs only through their pooled features
h (N, F), so the step runs in two passes:

1. **Pass 1** encodes every tile in chunks of ``chunk`` without a graph -> h, and records the RNG state before each
   chunk.
2. The crop path (L_view, TIR) runs with its graph as usual; the pooling head and the contrastive loss run on a
   leaf copy of h. One backward gives every parameter outside the tile encoder its gradient, and d loss / d h.
3. **Pass 2** re-encodes each chunk with a graph under the RNG state of pass 1 (so dropout-like draws repeat) and
   back-propagates its slice of d loss / d h; the encoder's gradients accumulate chunk by chunk.

By the chain rule the sum equals the gradient of the full graph, up to floating-point summation order. Peak memory
is one chunk's graph plus h (N x F floats), whatever the number of tiles. Exactness needs a tile's features to
depend on that tile alone: BatchNorm in training mode mixes the tiles of a chunk and differs between pass 1 and
pass 2 chunks, so it is refused (``model.norm: group``/``instance``; Swin uses LayerNorm).

Under DDP the contrastive terms gather embeddings with gradients (``t3d.distributed.gather_with_grad``) as for the
crop path; the backward passes run outside DDP's reducer and the caller averages gradients over ranks once per
optimiser step (``t3d.distributed.all_reduce_gradients``), which is what the reducer would have done.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from t3d.models.encoders import batch_dependent_norms


def check_batch_independent(encoder: nn.Module) -> None:
    """Raise when ``encoder`` has norm layers that depend on the batch in its current mode (BatchNorm, training)."""
    names = batch_dependent_norms(encoder)
    if names:
        raise ValueError(
            f"the tiled study path needs an encoder whose norm layers do not depend on the batch, but {len(names)} "
            f"BatchNorm layers are in training mode (e.g. {names[0]}); set model.norm=group (or instance) for the "
            "resnet encoder, or use model.encoder=swinvit"
        )


def _upcast(x: Tensor) -> Tensor:
    """bf16/fp16 autocast outputs -> float32 (the cached features and their gradients); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@torch.no_grad()
def encode_without_graph(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    index: Tensor,
    chunk: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Tensor, list[tuple[Tensor, Tensor | None]]]:
    """Pass 1: ``fn`` of the rows ``index`` of ``x`` (M, ...) in chunks, no graph -> (features (N, F), at least
    float32, N = len(index); the RNG state before each chunk). Only one chunk of inputs is copied at a time."""
    feats, states = [], []
    for rows in index.split(chunk):
        states.append(_rng_state(x.device))
        with autocast():
            feats.append(_upcast(fn(x.index_select(0, rows))))
    return torch.cat(feats), states


def backward_chunks(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    index: Tensor,
    grad: Tensor,
    states: list[tuple[Tensor, Tensor | None]],
    chunk: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> None:
    """Pass 2: re-run ``fn`` on each chunk of the rows ``index`` of ``x`` with a graph under pass 1's RNG state and
    back-propagate its slice of ``grad`` (d loss / d features, (N, F)). The caller's RNG state is left as it was."""
    devices = [x.device] if x.device.type == "cuda" else []
    for rows, g, (cpu_state, cuda_state) in zip(index.split(chunk), grad.split(chunk), states):
        part = x.index_select(0, rows)
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x.device)
            with autocast():
                out = fn(part)
            _upcast(out).backward(g)


def gradcache_step(
    core: nn.Module,
    objective: nn.Module,
    batch: dict,
    text: dict,
    generator: torch.Generator | None,
    backward: Callable[[Tensor], None],
    chunk: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, Tensor]:
    """One micro-batch of a tiled method: forward, loss and backward with GradCache; returns the loss terms.

    ``core``: the (unwrapped) ``PretrainModel``; ``backward(loss)``: the caller's backward of the total loss (loss
    scaling, accumulation division) -- the tile gradients inherit whatever it applies.
    """
    check_batch_independent(core.encoder)
    tiles = batch["tiles"].flatten(0, 1)  # (B*T, C, D, H, W), a view: tiles are copied one chunk at a time
    real = batch["tile_mask"].flatten().nonzero().squeeze(1)  # the N real tiles, in batch order
    feats, states = encode_without_graph(core.tile_features, tiles, real, chunk, autocast)
    leaf = feats.requires_grad_()
    with autocast():
        out = core(batch, text, generator=generator, tile_feats=leaf)
    terms = objective(out)
    backward(terms["loss"])
    if leaf.grad is not None:
        backward_chunks(core.tile_features, tiles, real, leaf.grad, states, chunk, autocast)
    return terms
