"""``t3d pretrain`` under ``torchrun`` (2 CPU processes, gloo) and ``train_step`` under DDP.

The same command runs in one process and under ``torchrun --nproc_per_node N -m t3d pretrain``; rank 0 alone writes
the run folder, the logged batch is the global one, and logged terms are means over ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from pretrain_helpers import expected_terms, pretrain_args, read_log, subprocess_env, toy_batch, toy_step
from t3d import distributed
from t3d.checkpoint import latest_checkpoint, load_checkpoint

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_write_one_run(tiny_cache, tmp_path):
    run = tmp_path / "run"
    # Batch 2 per rank: the contrastive batch is 4 studies gathered over both ranks.
    args = pretrain_args(tiny_cache.cache, run, "t3d", steps=2, **{"train.batch_size": 2})
    # = `torchrun --standalone --nproc_per_node 2` (a free local port), with this interpreter.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    done = subprocess.run(
        [*launcher, "-m", "t3d", *args], env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("pretrain [t3d] 2 steps") == 1  # only rank 0 prints the summary

    rows = read_log(run)
    assert [r["step"] for r in rows] == [1, 2]  # one log, written by rank 0 alone
    for row in rows:
        assert expected_terms("t3d") <= set(row)
        assert row["global_batch"] == 2 * WORLD and row["crops_per_s"] > 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    state = load_checkpoint(run)
    assert latest_checkpoint(run).name == "final.pt"
    assert state["step"] == 2 and state["config"]["train"]["batch_size"] == 2
    assert not any(key.startswith("module.") for key in state["model"])  # the bare model, not the DDP wrapper


# ----------------------------------------------------------------------------------------------- train_step


def _step_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_distributed(backend="gloo")
    batch = toy_batch(8)
    mine = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
    # Accumulate two micro-batches of 2 on each rank: exercises DDP's no_sync on the first.
    micro = [{k: v[:2] for k, v in mine.items()}, {k: v[2:] for k, v in mine.items()}]
    terms, state = toy_step(micro, wrap=torch.nn.parallel.DistributedDataParallel)
    torch.save({"terms": terms, "state": state}, os.path.join(folder, f"rank{rank}.pt"))
    distributed.cleanup()


def test_train_step_under_ddp_logs_means_over_ranks_and_makes_the_global_update(tmp_path):
    mp.spawn(_step_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    full_terms, full_state = toy_step([toy_batch(8)])
    for r in ranks:
        # The global-batch loss, not rank 0's half of it.
        assert r["terms"]["loss"] == pytest.approx(full_terms["loss"], rel=1e-6)
        assert r["terms"]["grad_norm"] == pytest.approx(full_terms["grad_norm"], rel=1e-5)
        for key, value in full_state.items():
            torch.testing.assert_close(r["state"][key], value, rtol=1e-6, atol=1e-7)
