"""CLI arguments, logs and a toy model shared by the pre-training tests (not a test module).

The runs use the session cache of ``tests/conftest.py`` (``tiny_cache``): resnet/tiny encoder, 32^3 crops, one
site, batch 4 — seconds per step on one CPU thread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from t3d.config import TrainConfig
from t3d.losses import method_spec
from t3d.pretrain.engine import StepContext, train_step

REPO = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def pretrain_args(cache: Path, out: Path, method: str = "t3d", steps: int = 2, **overrides) -> list[str]:
    """``t3d pretrain`` arguments of a tiny CPU run; ``overrides`` are dotted keys: ``**{"train.lr": 1e-3}``."""
    values = {
        "data.cache": cache,
        "data.workers": 0,
        "crops.size": "[32,32,32]",
        "crops.sites": 1,
        "clip.grid": "[32,32,32]",
        "model.encoder": "resnet",
        "model.preset": "tiny",
        "model.embed_dim": 16,
        "train.out": out,
        "train.steps": steps,
        "train.batch_size": 4,
        "train.warmup_steps": 1,
        "train.log_every": 1,
        "train.checkpoint_every": 100,
        **overrides,
    }
    args = ["pretrain", "--method", method]
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def read_log(run_dir: Path) -> list[dict]:
    """Rows of a run's ``log.jsonl``."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def expected_terms(method: str) -> set[str]:
    """Loss terms and diagnostics a method logs (docs/method.md §5): view / align / restore exactly when used."""
    spec = method_spec(method)
    terms = {"loss"}
    terms |= {"view"} if spec.view else set()
    terms |= {"align", "tau_align"} if spec.align != "none" else set()
    terms |= {"study_cos"} if spec.align == "global" else set()
    terms |= {"target_self_prob", "tcl"} if spec.contrastive else set()
    terms |= {"restore"} if spec.restore else set()
    return terms


def subprocess_env() -> dict[str, str]:
    """Environment of a ``python -m t3d`` child: one thread (same numerics as the tests), this checkout's code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    for var in DIST_VARS:
        env.pop(var, None)
    return env


# ----------------------------------------------------------------------------------------------- toy step


class ToyModel(torch.nn.Module):
    """A linear model with ``train_step``'s call signature and no batch statistics (exact identities hold)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, batch, text, generator=None):
        return {"pred": self.lin(batch["x"]), "y": batch["y"]}


class MeanSquaredError(torch.nn.Module):
    """A per-sample loss: the mean over two equal halves equals the mean over the whole batch."""

    def forward(self, out):
        loss = ((out["pred"] - out["y"]) ** 2).mean()
        return {"mse": loss, "loss": loss}


def toy_batch(n: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, generator=g), "y": torch.randn(n, 1, generator=g)}


def toy_step(micro_batches: list[dict], wrap=None) -> tuple[dict, dict]:
    """One ``train_step`` (SGD, lr 0.1, no clipping) from a fixed init; returns (logged terms, new state)."""
    torch.manual_seed(0)
    model = ToyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(
        model=wrap(model) if wrap else model,
        objective=MeanSquaredError(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        text_for=lambda batch: {},
        device=torch.device("cpu"),
        cfg=TrainConfig(grad_clip=0.0),
    )
    terms = train_step(ctx, micro_batches, torch.Generator())
    return terms, {k: v.detach().clone() for k, v in model.state_dict().items()}
