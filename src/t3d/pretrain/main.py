"""``t3d pretrain --config FILE [--resume] [--section.key value ...]``: wiring of data, text, model and loop.

The same command runs in one process and under ``torchrun --nproc_per_node N -m t3d pretrain ...`` (or SLURM's
``srun``): ``t3d.distributed`` reads the environment and everything below is a no-op in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from t3d import distributed as dist
from t3d.checkpoint import (
    CheckpointError,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from t3d.config import PretrainConfig, load_config, save_config, to_dict
from t3d.data.sampler import ResumableSampler
from t3d.losses import PretrainObjective, method_spec
from t3d.plots import plot_loss_curves
from t3d.pretrain.data import FindingTargets, build_dataset, build_text_lookup
from t3d.pretrain.engine import (
    RunLog,
    StepContext,
    Throughput,
    build_optimizer,
    build_scheduler,
    peak_memory_mb,
    train_step,
)
from t3d.pretrain.model import PretrainModel

log = logging.getLogger(__name__)


def command(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    summary = run_pretrain(cfg, resume=args.resume)
    if summary["rank"] == 0:  # not dist.is_main(): the process group is gone by now, every rank would say rank 0
        terms = "  ".join(f"{k}={v:.4f}" for k, v in summary["final"].items() if k in summary["terms"])
        print(f"pretrain [{cfg.method}] {summary['steps']} steps -> {summary['run_dir']}\n  final losses: {terms}")
    return 0


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Pre-train per ``cfg``; returns a summary (run folder, final terms, this process's rank). Resumes from
    ``latest`` if asked."""
    device = dist.init_distributed()
    try:
        return _run(cfg, resume, device)
    finally:
        dist.cleanup()


def _run(cfg: PretrainConfig, resume: bool, device: torch.device) -> dict:
    run_dir = Path(cfg.train.out)
    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path is not None and not resume:
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or set --train.out elsewhere")
    if resume and ckpt_path is None:
        log.warning("--resume: %s has no checkpoint yet; starting from step 0", run_dir)
    spec = method_spec(cfg.method)
    # A resume is checked against the checkpoint before anything is written: a refused resume leaves the run
    # folder (its config.yaml above all, which the error message points to) exactly as it was.
    state = _resume_state(ckpt_path, run_dir, cfg) if resume and ckpt_path is not None else None
    torch.manual_seed(cfg.seed + dist.rank())
    np.random.seed((cfg.seed + dist.rank()) % 2**32)

    dataset = build_dataset(cfg, spec)
    text = build_text_lookup(cfg, spec, dataset, device)
    targets = FindingTargets(cfg, dataset, device) if spec.findings else None
    classes = targets.classes if targets is not None else []
    model = PretrainModel(cfg, spec, text_dim=text.dim, num_findings=len(classes)).to(device)
    objective = PretrainObjective(cfg.loss, spec).to(device)
    if dist.is_distributed():
        model = dist.sync_batch_norm(model, device)
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    core = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(core, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    ctx = StepContext(
        model=model,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"),
        text_for=text.for_batch
        if targets is None
        else lambda b: {**text.for_batch(b), "findings": targets.for_batch(b)},
        device=device,
        cfg=cfg.train,
        autocast_dtype=_autocast_dtype(cfg.train.precision, device),
    )
    sampler = ResumableSampler(len(dataset), cfg.train.batch_size, cfg.seed, dist.rank(), dist.world_size())
    start_step, position = 0, (0, 0)
    if state is not None:
        start_step, position = _restore(state, ckpt_path, core, ctx)
        log.info("resumed %s at step %d (epoch %d, batch %d)", ckpt_path, start_step, *position)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    run_log = RunLog(run_dir, resume_step=start_step, enabled=dist.is_main())
    extra_state = {"text_mean": text.mean.cpu(), "text_model": text.model_id}
    if classes:
        extra_state["finding_classes"] = list(classes)
    if text.sent_mean is not None:
        extra_state["sent_mean"] = text.sent_mean.cpu()
    final = _loop(cfg, ctx, core, dataset, sampler, start_step, position, run_log, extra_state)
    if not final and (run_dir / "log.jsonl").is_file():
        # Resumed a finished run: nothing was trained, report the last logged terms.
        rows = (run_dir / "log.jsonl").read_text().splitlines()
        final = {k: v for k, v in json.loads(rows[-1]).items() if k != "step"} if rows else {}
    run_log.close()
    if dist.is_main() and (run_dir / "log.jsonl").is_file():
        plot_loss_curves(run_dir / "log.jsonl", run_dir / "loss_curves.png", log_b=math.log(_global_batch(cfg)))
    terms = objective.term_names()
    return {"run_dir": str(run_dir), "steps": cfg.train.steps, "final": final, "terms": terms, "rank": dist.rank()}


def _loop(cfg, ctx, core, dataset, sampler, start_step, position, run_log, extra_state) -> dict:
    """Epochs of the resumable sampler, ``accumulate`` micro-batches per optimiser step."""
    tc = cfg.train
    epoch, batch_in_epoch = position
    # The unlogged steps of the current window travel in checkpoints: a resumed run logs the same averages.
    step, final, window = start_step, {}, ctx.extra.pop("log_window", {})
    throughput = Throughput()
    global_batch = _global_batch(cfg)  # studies per micro-batch over all ranks (the contrastive batch)
    crops_per_batch = _crops_per_study(cfg, core.spec) * global_batch
    bar = tqdm(total=tc.steps, initial=step, desc=f"pretrain {cfg.method}", disable=not dist.is_main(), unit="step")
    while step < tc.steps:
        sampler.set_position(epoch, batch_in_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_size=tc.batch_size,
            sampler=sampler,
            num_workers=cfg.data.workers,
            pin_memory=ctx.device.type == "cuda",
            drop_last=True,
            # Workers' base seed from (seed, epoch, rank), not the global RNG: a resumed run draws the same seeds.
            generator=torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + dist.rank()),
        )
        pending = []
        for batch in loader:
            pending.append(batch)
            batch_in_epoch += 1
            if len(pending) < tc.accumulate:
                continue
            # Masks drawn from (seed, step, rank): a resumed run draws exactly what it would have drawn.
            generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1009 + dist.rank())
            terms = train_step(ctx, pending, generator)
            pending, step = [], step + 1
            throughput.add(crops_per_batch * tc.accumulate)
            for key, value in terms.items():
                window.setdefault(key, []).append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.3f}")
            if step % tc.log_every == 0 or step == tc.steps:
                final = {k: float(np.mean(v)) for k, v in window.items()}
                final["skipped_steps"] = ctx.skipped_steps  # a running count: the latest, not a window mean
                row = {"step": step, **final, "global_batch": global_batch, "crops_per_s": throughput.rate()}
                row["peak_mem_mb"] = peak_memory_mb(ctx.device)
                run_log.write(row)
                bar.set_postfix(loss=f"{final['loss']:.3f}", crops_s=f"{row['crops_per_s']:.1f}")
                window = {}
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                position = (epoch, batch_in_epoch) if batch_in_epoch < sampler.batches_per_epoch else (epoch + 1, 0)
                _save(cfg, ctx, core, step, position, {**extra_state, "log_window": window}, final=step == tc.steps)
            if step >= tc.steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    return final


def _save(cfg, ctx, core, step, position, extra_state, final: bool) -> None:
    if dist.is_main():
        state = {
            "model": core.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "scheduler": ctx.scheduler.state_dict(),
            "scaler": ctx.scaler.state_dict(),
            "step": step,
            "epoch": position[0],
            "batch_in_epoch": position[1],
            "skipped_steps": ctx.skipped_steps,
            "rng": rng_state(),
            "config": to_dict(cfg),
            "method": cfg.method,
            **extra_state,
        }
        save_checkpoint(state, cfg.train.out, "final" if final else f"step_{step:07d}", keep=cfg.train.keep_checkpoints)
    dist.barrier()


def _resume_state(path: Path, run_dir: Path, cfg: PretrainConfig) -> dict:
    """The checkpoint to resume from, checked against ``cfg``; ValueError (for people) when it cannot be used."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        earlier = intact_checkpoint(run_dir, path)
        fix = (
            f"the earlier checkpoint {earlier} is intact: resume from it with "
            f"`echo checkpoints/{earlier.name} > {run_dir / 'latest'}` and rerun with --resume"
            if earlier is not None
            else "no intact earlier checkpoint is in the folder: start over with another --train.out"
        )
        raise ValueError(f"cannot resume: {err}; {fix}") from None
    if state.get("method") != cfg.method:
        raise ValueError(
            f"{path} was written by method '{state.get('method')}', this config says '{cfg.method}'; "
            f"resume with the run's own config (--config {run_dir / 'config.yaml'}) or choose another --train.out"
        )
    model_changes = [k for k in _changed_keys(state.get("config", {}), to_dict(cfg)) if k.startswith("model.")]
    if model_changes:
        raise ValueError(
            f"{path} holds a model that differs from this config in {', '.join(model_changes)}; resume with the "
            f"run's own config (--config {run_dir / 'config.yaml'}) or choose another --train.out"
        )
    return state


def _restore(state: dict, path: Path, core, ctx: StepContext) -> tuple[int, tuple[int, int]]:
    changed = _changed_keys(state.get("config", {}), to_dict(core.cfg))
    if changed:
        log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
    try:
        core.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path} does not fit this model ({first}); resume with the run's own config.yaml or choose another "
            "--train.out"
        ) from None
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scheduler.load_state_dict(state["scheduler"])
    ctx.scaler.load_state_dict(state["scaler"])
    ctx.skipped_steps = state["skipped_steps"]
    ctx.extra["log_window"] = state.get("log_window", {})
    set_rng_state(state["rng"])
    return state["step"], (state["epoch"], state["batch_in_epoch"])


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def _crops_per_study(cfg: PretrainConfig, spec) -> int:
    """Encoder inputs per study and step (tiles counted at most, as padded; each tile is encoded twice)."""
    if spec.whole_volume:
        return 1
    return cfg.crops.sites * 2 + (2 * cfg.tiles.max_tiles if spec.tiles else 0)


def _global_batch(cfg: PretrainConfig) -> int:
    return cfg.train.batch_size * dist.world_size()
