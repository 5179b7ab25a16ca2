"""Image -> report retrieval through contrastive heads on frozen features: the linear-probe reading of retrieval.

    result = retrieval_probe(x_train, t_train, x_test, t_test, RetrievalProbeConfig())
    result["r@5"]  # {"value", "low", "high"} on the test pairs; result["chance"] = 5 / N

Two bias-free linear heads, one from frozen image features (standardised by the training pairs) and one from frozen
report embeddings (centred by the training reports' mean and L2-normalised, as pre-training feeds them), are trained
with symmetric InfoNCE (hard targets, fixed temperature) on the training pairs and scored on held-out pairs. Any
encoder can be read this way, the controls included, so the retrieval gate of a text-aligned run (docs/method.md §7)
gets the same sensitivity check as every downstream metric: a positive control (an encoder that knows the findings)
must clear chance before a text-aligned run's failure to do so means anything. Finding vectors in place of image
features give the ceiling that the reports' wording allows at this number of pairs.

The weight decay is chosen on a validation part of the training pairs (never on the test pairs); the heads are then
refitted on every training pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from t3d.evaluate.retrieval import retrieval_metrics


@dataclass
class RetrievalProbeConfig:
    """Heads and their fit: small on purpose (linear, few hundred pairs), so the features, not the heads, decide."""

    dim: int = 128
    """Joint-space width E of the heads."""
    tau: float = 0.07
    """Fixed InfoNCE temperature (the pre-training alignment temperature's initial value)."""
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1.0e-3
    weight_decays: list[float] = field(default_factory=lambda: [0.05, 0.5, 5.0])
    """AdamW weight decays tried; the one with the best validation R@5 is refitted on every training pair."""
    val_fraction: float = 0.2
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if self.dim < 1 or self.steps < 1 or self.batch_size < 2 or self.tau <= 0 or self.lr <= 0:
            raise ValueError(
                "retrieval_probe: dim and steps must be >= 1, batch_size >= 2, tau and lr > 0 "
                f"(got dim={self.dim}, steps={self.steps}, batch_size={self.batch_size}, tau={self.tau}, lr={self.lr})"
            )
        if not self.weight_decays or any(w < 0 for w in self.weight_decays):
            raise ValueError(f"retrieval_probe.weight_decays must be non-empty and >= 0, got {self.weight_decays}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"retrieval_probe.val_fraction must be in (0, 1), got {self.val_fraction}")


class _Inputs:
    """Training-pair statistics applied to any pairs: standardised image features, centred unit report vectors."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.mu, self.sd = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
        self.t_mean = t.mean(dim=0)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x - self.mu) / self.sd, F.normalize(t - self.t_mean, dim=-1)


def fit_heads(
    x: torch.Tensor, t: torch.Tensor, cfg: RetrievalProbeConfig, weight_decay: float, seed: int
) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """Bias-free linear heads (image, report) fitted with symmetric InfoNCE on the pairs (x[i], t[i])."""
    if len(x) != len(t) or len(x) < 2:
        raise ValueError(f"retrieval_probe: need >= 2 aligned pairs, got {len(x)} image and {len(t)} report rows")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    head_x = torch.nn.Linear(x.shape[1], cfg.dim, bias=False)
    head_t = torch.nn.Linear(t.shape[1], cfg.dim, bias=False)
    opt = torch.optim.AdamW([*head_x.parameters(), *head_t.parameters()], lr=cfg.lr, weight_decay=weight_decay)
    batch = min(cfg.batch_size, len(x))
    target = torch.arange(batch)
    for _ in range(cfg.steps):
        rows = torch.randperm(len(x), generator=g)[:batch]
        u, v = F.normalize(head_x(x[rows]), dim=-1), F.normalize(head_t(t[rows]), dim=-1)
        logits = u @ v.T / cfg.tau
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head_x.eval(), head_t.eval()


@torch.no_grad()
def embed(heads: tuple[torch.nn.Linear, torch.nn.Linear], x: torch.Tensor, t: torch.Tensor):
    """Unit-norm joint-space rows of images and reports."""
    return F.normalize(heads[0](x), dim=-1), F.normalize(heads[1](t), dim=-1)


def retrieval_probe(
    x_train: torch.Tensor,
    t_train: torch.Tensor,
    x_test: torch.Tensor,
    t_test: torch.Tensor,
    cfg: RetrievalProbeConfig,
    seed: int = 0,
) -> dict:
    """Fit heads on the training pairs (weight decay chosen on a validation part) and score test image -> report
    retrieval: ``r@1`` / ``r@5`` / ``r@10`` with bootstrap intervals over test queries, ``chance`` (5 / N), the training
    R@5 (memorisation), the validation R@5 per weight decay and the one chosen, and ``embeddings``: the test
    (images, reports) joint-space rows (tensors: pop them before writing JSON). Row i of x and t is one study."""
    x_train, t_train = x_train.float(), t_train.float()
    x_test, t_test = x_test.float(), t_test.float()
    n = len(x_train)
    n_val = max(2, round(cfg.val_fraction * n))
    if n - n_val < 2:
        raise ValueError(f"retrieval_probe: {n} training pairs leave fewer than 2 to fit after validation")
    order = np.random.default_rng(seed).permutation(n)
    fit, val = torch.as_tensor(order[n_val:]), torch.as_tensor(order[:n_val])
    prep = _Inputs(x_train[fit], t_train[fit])
    val_r5 = {}
    for wd in cfg.weight_decays:
        heads = fit_heads(*prep(x_train[fit], t_train[fit]), cfg, wd, seed)
        u, v = embed(heads, *prep(x_train[val], t_train[val]))
        val_r5[wd] = retrieval_metrics(u, v, n_boot=0)["image_to_report"]["R@5"]["value"]
    chosen = max(cfg.weight_decays, key=lambda w: (val_r5[w], w))  # ties: the stronger regulariser
    prep = _Inputs(x_train, t_train)
    heads = fit_heads(*prep(x_train, t_train), cfg, chosen, seed)
    u, v = embed(heads, *prep(x_test, t_test))
    test = retrieval_metrics(u, v, n_boot=cfg.n_boot, seed=seed)
    u_tr, v_tr = embed(heads, *prep(x_train, t_train))
    return {
        **{k.lower(): test["image_to_report"][k] for k in ("R@1", "R@5", "R@10")},
        "chance": test["chance"]["R@5"],
        "n_train": n,
        "n_test": len(x_test),
        "train_r5": retrieval_metrics(u_tr, v_tr, n_boot=0)["image_to_report"]["R@5"]["value"],
        "val_r5": {str(w): r for w, r in val_r5.items()},
        "weight_decay": chosen,
        "embeddings": (u, v),
    }
