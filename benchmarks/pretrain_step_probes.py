"""What ``benchmarks/pretrain_step.py`` measures about a step: model FLOPs, the memory it adds, and the matmul
peak that MFU divides by (methods: see that script's docstring)."""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain_step_setup import Step


def count_flops(step: Step) -> float:
    """Model FLOPs of one step (forward + backward), counted while running it (see the module docstring)."""
    model = step.ctx.model
    checkpointed = model.cfg.model.grad_checkpointing
    studies = 1 if checkpointed else step.studies
    batch = {k: v[:studies] for k, v in step.batch.items()}
    modules = [m for m in (model.encoder, model.decoder) if m is not None]
    for module in modules:
        module.set_grad_checkpointing(False)
    with FlopCounterMode(display=False) as counter:
        step.run(batch)
    for module in modules:
        module.set_grad_checkpointing(checkpointed)
    return counter.get_total_flops() * step.studies / studies


class MemoryProbe:
    """Peak bytes a step adds on top of what is live right before it (CUDA allocator, or CPU RSS high water)."""

    def __init__(self, device: torch.device):
        self.device, self.before, self.peak = device, 0, 0
        self.libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM after clear_refs"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)  # hand cached free heap back: re-using it must show up as new RSS
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
        except OSError:
            self.method = "ru_maxrss (monotonic: only a new process high counts)"
        self.before = proc_status("VmRSS")

    def stop(self) -> int:
        """Peak bytes since ``start`` minus the bytes live at ``start``; ``self.peak``: the absolute peak."""
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = proc_status("VmHWM" if self.method.startswith("VmHWM") else "ru_maxrss")
        return self.peak - self.before


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory line (VmRSS, VmHWM, VmSize) in bytes; ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    kib = next((int(x.split()[1]) for x in lines if x.startswith(field + ":")), None)
    return 1024 * (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) ``torch.mm`` in ``dtype``."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
