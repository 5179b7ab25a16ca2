"""Multi-process helpers (torchrun or SLURM ``srun``); every function is a no-op in one process.

    device = init_distributed()                 # reads torchrun / SLURM variables, or does nothing
    z_all = gather_with_grad(z)                 # (B, E) -> (world * B, E), gradients flow back to every rank
    loss_for_log = all_reduce_mean(loss.detach())

Gradient semantics of ``gather_with_grad`` (the open_clip / lightly convention)
------------------------------------------------------------------------------
Each rank r computes ``loss_r`` = mean over its *local rows* (its B samples) against columns gathered from all
ranks. The global loss a single process would compute on the concatenated batch is ``L = mean_r loss_r`` (equal B
per rank). The backward of the gather sums, over ranks, the gradients that every rank's loss sends to each slice,
so the gradient that reaches rank r's local input ``x_r`` is

    sum_r' d loss_r' / d x_r  =  world_size * dL / d x_r.

DistributedDataParallel then *averages* parameter gradients over ranks (divides the sum by world_size), which
cancels the factor: the parameters receive exactly ``dL/dθ``, the gradient of the global-batch loss — the same
update one process with the whole batch would make. So: use ``gather_with_grad`` in the loss, wrap the model in
DDP, and do nothing else. (Without DDP, divide local gradients by world_size before all-reducing them.)

All ranks must hold the same number of samples per step (use ``drop_last=True`` with ``DistributedSampler``):
the all-gather needs equal shapes, and loss functions locate their rows at offset ``rank() * B``.

We use our own small autograd function rather than ``torch.distributed.nn.functional.all_gather``: the latter
exists in torch 2.13 but is deprecated (a FutureWarning at every call) in favour of private functional
collectives; the four lines below do the same on every backend (gloo has no reduce-scatter, so backward
all-reduces the full gradient and keeps this rank's slice — cheap for embedding-sized tensors).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


def is_distributed() -> bool:
    """True when a process group is initialised (torchrun / srun with more than one process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this node (selects the GPU): ``LOCAL_RANK`` (torchrun) or ``SLURM_LOCALID``; 0 in one process."""
    if not is_distributed():
        return 0
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def is_main() -> bool:
    """True on rank 0: the process that logs, writes checkpoints and prints."""
    return rank() == 0


# ----------------------------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class DistEnv:
    """Process-group coordinates found in the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str
    """``torchrun`` or ``slurm``."""


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list: ``"node[03-04,07],gpu1"`` -> ``"node03"``.

    Slurm expands bracket groups as a Cartesian product with each group's first item first, so the first host is
    the first top-level entry with every ``[...]`` replaced by the start of its first item (zero padding kept).
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)
    if not host or "[" in host or "]" in host:
        raise ValueError(
            f"cannot read a hostname from SLURM_NODELIST={nodelist!r}; set MASTER_ADDR to the first node's hostname"
        )
    return host


def dist_env(environ: dict[str, str] | None = None) -> DistEnv | None:
    """Read torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM variables; None for one process.

    torchrun's variables win (``srun torchrun ...`` sets both). Under SLURM the step's task count is used
    (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``): launch one task per GPU with ``srun``; a plain ``python``
    inside an ``sbatch --ntasks 4`` script would otherwise wait for three processes that never start.
    ``MASTER_ADDR`` defaults to the first node of ``SLURM_NODELIST`` and ``MASTER_PORT`` to 29500.
    """
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return None
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            source="torchrun",
        )
    if "SLURM_PROCID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        if world <= 1:
            return None
        addr = env.get("MASTER_ADDR") or first_slurm_host(
            env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        )
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=port,
            source="slurm",
        )
    return None


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group described by the environment and return this process's device.

    One process (no torchrun/SLURM variables): nothing is initialised; returns ``cuda`` if available, else ``cpu``.
    Several: backend ``nccl`` on GPU / ``gloo`` on CPU unless ``backend`` is given; the CUDA device is set to
    ``cuda:<local rank>``. Calling it again after initialisation only returns the device.
    """
    cuda = torch.cuda.is_available()
    env = dist_env()
    if env is None:
        return torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {env.local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                "launch at most one process per GPU (torchrun --nproc_per_node / srun --ntasks-per-node)"
            )
        torch.cuda.set_device(device)
    if is_distributed():
        return device
    # init_process_group("env://") reads these; SLURM does not set them.
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    backend = backend or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    log.info(
        "distributed: rank %d/%d (local %d) via %s, backend %s, master %s:%d",
        env.rank,
        env.world_size,
        env.local_rank,
        env.source,
        backend,
        env.master_addr,
        env.master_port,
    )
    return device


def barrier() -> None:
    """Wait for every rank; no-op in one process."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (end of training); no-op in one process."""
    if is_distributed():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- collectives


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        b = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * b : (r + 1) * b]


def sync_batch_norm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with every BatchNorm layer replaced by ``SyncBatchNorm`` under DDP on an accelerator, so that batch
    statistics are those of the global batch (what one process on the whole batch would compute) rather than of
    each rank's few crops. Unchanged in one process; on CPU (gloo) too, where SyncBatchNorm does not run: a warning
    says the statistics stay per rank. Call before wrapping the model in ``DistributedDataParallel``."""
    batch_norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    has_bn = any(isinstance(m, batch_norms) for m in model.modules())
    if not is_distributed() or not has_bn:
        return model
    if device.type == "cpu":
        log.warning("BatchNorm statistics stay per rank: SyncBatchNorm needs an accelerator (running on CPU)")
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...), rank order, differentiable; identity in one process.

    See the module docstring for the gradient scale (correct under DDP's gradient averaging).
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...) without gradients (e.g. frozen text embeddings); identity in one process."""
    if not is_distributed() or world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks, detached (for logging a loss every rank computed); identity in one process."""
    x = x.detach().clone()
    if not x.is_floating_point():
        x = x.double()
    if is_distributed() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def all_reduce_gradients(parameters) -> None:
    """Average the ``.grad`` of ``parameters`` over ranks in place (what DDP's reducer does); no-op in one process.

    For steps that run several backward passes outside DDP's forward (GradCache). Parameters without a gradient
    take part as zeros, so every rank issues the same collectives.
    """
    if not is_distributed() or world_size() == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
