"""Worker processes for preprocessing that never outlive the process that started them.

A ``ProcessPoolExecutor`` alone leaves its workers running when the parent is killed with SIGKILL: they keep
taking studies and writing into the cache for minutes, and the fork server and resource tracker stay with them.
Each worker here starts a watcher thread that blocks on a pidfd of the parent (polls its pid where pidfds are
missing) and ends the worker the moment the parent is gone; the fork server exits on its own when its parent's
pipe closes, and the resource tracker once every worker has. Workers also ignore SIGINT: Ctrl-C reaches the
whole process group, and the parent alone decides what to do (stop, write its outputs, shut the pool down).
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

START_METHOD = "forkserver"
"""How worker processes start. Not ``fork``: forking a process that already ran torch/OpenMP threads can deadlock
the children. The fork server imports the preloaded modules once and workers fork from it, instead of each
importing MONAI (several seconds) as with ``spawn``."""
PARENT_POLL_S = 0.5
"""How often a worker checks its parent where ``os.pidfd_open`` is unavailable (not Linux >= 5.3)."""


def run_in_pool(func: Callable[..., Any], jobs: Iterable[tuple], workers: int, preload: list[str]) -> Iterator[Any]:
    """``func(*job)`` for every job in ``workers`` processes, yielded as they finish (any order).

    ``preload``: modules the fork server imports once. Leaving the generator early (an exception, Ctrl-C)
    cancels the jobs not started and waits for the running ones.
    """
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload(preload)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(func, *job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def init_worker(parent: int) -> None:
    """Worker set-up: one torch thread, SIGINT left to the parent, exit when ``parent`` exits."""
    torch.set_num_threads(1)  # K workers x 1 thread: resampling parallelises over studies, not voxels
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()


def exit_with_parent(parent: int) -> None:
    """Block until process ``parent`` has exited, then end this process at once (no cleanup: nothing to save)."""
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])  # readable once the process has terminated
    else:
        while _alive(parent):
            time.sleep(PARENT_POLL_S)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
