"""Distributed helpers: safe in one process, environment parsing, and a real 2-process gloo run of the losses.

The 2-process test checks the gradient convention documented in ``t3d.distributed``: each rank's loss is the mean
over its local rows, the gathered backward sums over ranks, so (i) the mean of the ranks' losses is the global
loss and (ii) a rank's gradient w.r.t. its local inputs is world_size × the single-process gradient of the global
loss for those rows — which DDP's gradient averaging turns into exactly the single-process update. Parameters
used locally on every rank (the logit scale) get the single-process gradient from the mean over ranks.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from t3d import distributed
from t3d.config import LossConfig
from t3d.losses import (
    PretrainObjective,
    align_loss,
    method_spec,
    random_cube_mask,
    sentence_align_loss,
    text_affinity_targets,
    view_loss,
)

WORLD, B, K, E, M = 2, 6, 2, 5, 4
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def test_helpers_are_safe_without_a_process_group(monkeypatch):
    for var in DIST_VARS + ("SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main()
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    assert torch.equal(distributed.all_reduce_mean(x), x.detach())
    distributed.barrier()
    distributed.cleanup()
    assert distributed.init_distributed() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert not distributed.is_distributed()


def test_torchrun_environment_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"}
    env |= {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "gpu[1-2]"}
    assert distributed.dist_env(env) == distributed.DistEnv(3, 8, 1, "10.0.0.5", 1234, "torchrun")
    assert distributed.dist_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert distributed.dist_env({}) is None


def test_slurm_environment_is_parsed():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "node[03-04,07],cpu1"}
    assert distributed.dist_env(env) == distributed.DistEnv(5, 8, 1, "node03", distributed.DEFAULT_MASTER_PORT, "slurm")
    # srun's step task count wins over the allocation's; an explicit MASTER_ADDR/PORT wins over the node list
    env |= {"SLURM_STEP_NUM_TASKS": "4", "MASTER_ADDR": "head", "MASTER_PORT": "4000"}
    got = distributed.dist_env(env)
    assert (got.world_size, got.master_addr, got.master_port) == (4, "head", 4000)
    assert distributed.dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NODELIST": "n1"}) is None


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node01", "node01"),
        ("node[01-04]", "node01"),
        ("node[003,007-009],login2", "node003"),
        ("gpu-a100-[12-13]", "gpu-a100-12"),
        ("rack[2-3]-n[01-02]", "rack2-n01"),
        ("a1,b[1-2]", "a1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_first_slurm_host_explains_garbage():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.first_slurm_host("node[01-")


# ----------------------------------------------------------------------------------------------- 2 processes


def make_inputs():
    g = torch.Generator().manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    owner = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 5])  # studies 0-2 on rank 0 (4 sentences), 3-5 on rank 1 (6)
    target = torch.rand(B * K * 2, 1, 8, 8, 8, generator=g, dtype=torch.float64)
    return {
        "z0": unit(B, K, E),
        "z1": unit(B, K, E),
        "y": text_affinity_targets(unit(B, 8), -0.99, 0.5, 0.2),  # every pair shares mass: a dense soft Y
        "u": unit(B, E),
        "t": unit(B, E),
        "crops": unit(B, M, E),
        "sent": unit(len(owner), E),
        "owner": owner,
        "crop_emb": unit(B, K, 2, E),
        "text_emb": unit(B, E),
        "frozen": unit(B, 8),
        "restored": torch.rand(B * K * 2, 1, 8, 8, 8, generator=g, dtype=torch.float64),
        "target": target,
        "mask": random_cube_mask(target.shape, 0.5, 4, g),
    }


def compute(data, rows, sent_rows, owner_offset):
    """Every loss on the given rows with fresh leaves; returns {name: (loss, {input: grad})}."""
    leaf = {k: data[k][rows].clone().requires_grad_() for k in ("z0", "z1", "u", "t", "crops", "crop_emb", "text_emb")}
    sent = data["sent"][sent_rows].clone().requires_grad_()
    scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    n = len(range(B)[rows]) * K * 2
    voxel_rows = slice(rows.start * K * 2, rows.start * K * 2 + n)
    restored = data["restored"][voxel_rows].clone().requires_grad_()
    out = {
        "crop_emb": leaf["crop_emb"],
        "study_emb": F.normalize(leaf["crop_emb"].mean(dim=(1, 2)), dim=-1),
        "text_emb": leaf["text_emb"],
        "frozen_text": data["frozen"][rows],
        "logit_scale": scale,
        "restored": restored,
        "target": data["target"][voxel_rows],
        "mask": data["mask"][voxel_rows],
    }
    loss_cfg = LossConfig(lambda_align=0.5, lambda_tir=2.0, affinity_threshold=0.0, affinity_alpha=0.5)
    objective = PretrainObjective(loss_cfg, method_spec("t3d"))
    losses = {
        "view": (view_loss(leaf["z0"], leaf["z1"], data["y"], 0.1), ["z0", "z1"]),
        "align": (align_loss(leaf["u"], leaf["t"], data["y"], scale), ["u", "t", "scale"]),
        "sentence": (
            sentence_align_loss(leaf["crops"], sent, data["owner"][sent_rows] - owner_offset, data["y"], scale),
            ["crops", "sent", "scale"],
        ),
        "objective": (objective(out)["loss"], ["crop_emb", "text_emb", "restored", "scale"]),
    }
    leaf |= {"sent": sent, "scale": scale, "restored": restored}
    results = {}
    for name, (loss, inputs) in losses.items():
        grads = torch.autograd.grad(loss, [leaf[i] for i in inputs], retain_graph=True)
        results[name] = (loss.detach(), dict(zip(inputs, grads)))
    return results


def _worker(local, port, folder):
    os.environ.update(RANK=str(local), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(local))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    distributed.init_distributed(backend="gloo")
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (local, WORLD, local)
    data = make_inputs()
    b = B // WORLD
    sent_rows = slice(0, 4) if local == 0 else slice(4, 10)
    results = compute(data, slice(local * b, (local + 1) * b), sent_rows, owner_offset=local * b)
    gathered = distributed.gather_with_grad(torch.full((2, 3), float(local)))
    mean = distributed.all_reduce_mean(torch.tensor(float(local)))
    torch.save({"results": results, "gathered": gathered, "mean": mean}, os.path.join(folder, f"rank{local}.pt"))
    distributed.barrier()
    distributed.cleanup()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert torch.equal(ranks[0]["gathered"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
    assert ranks[1]["mean"].item() == pytest.approx(0.5)

    data = make_inputs()
    single = compute(data, slice(0, B), slice(0, 10), owner_offset=0)
    b = B // WORLD
    local_rows = {"sent": [slice(0, 4), slice(4, 10)], "restored": [slice(0, b * K * 2), slice(b * K * 2, B * K * 2)]}
    for name, (loss, grads) in single.items():
        mean_loss = sum(r["results"][name][0] for r in ranks) / WORLD
        torch.testing.assert_close(mean_loss, loss, msg=f"{name}: mean of rank losses != global loss")
        for key, grad in grads.items():
            got = [r["results"][name][1][key] for r in ranks]
            if key == "scale":  # shared parameter: DDP averages its per-rank gradients
                torch.testing.assert_close(sum(got) / WORLD, grad, msg=f"{name}: d/d{key}")
                continue
            for r in range(WORLD):
                rows = local_rows.get(key, [slice(r * b, (r + 1) * b)] * WORLD)[r]
                torch.testing.assert_close(got[r] / WORLD, grad[rows], msg=f"{name}: d/d{key} on rank {r}")
