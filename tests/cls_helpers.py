"""Tiny synthetic data and pre-training checkpoints shared by the classification / evaluation tests (not a test
module)."""

from __future__ import annotations

from pathlib import Path

import torch

from t3d.checkpoint import save_checkpoint
from t3d.config import ClipConfig, CropConfig, ModelConfig, PreprocessConfig, PretrainConfig, TrainConfig, to_dict
from t3d.losses import method_spec
from t3d.pretrain.model import PretrainModel
from t3d.text import MINILM_ID

SPACING = (5.0, 5.0, 6.0)  # the synthetic "tiny" preset's own spacing: preprocessing does not resample
CROP = (32, 32, 32)
TEXT_DIM = 384  # all-MiniLM-L6-v2


def synth_dataset(out: Path, num_studies: int = 20, seed: int = 0) -> Path:
    """``t3d synth`` tiny preset into ``out``; returns the folder (findings.csv, splits.json, pretrain.jsonl)."""
    from t3d.data.synthetic import generate_dataset

    generate_dataset(out, num_studies, seed, preset="tiny")
    return out


def tiny_pretrain_config(method: str = "t3d", out: str = "runs/pretrain") -> PretrainConfig:
    return PretrainConfig(
        method=method,
        preprocess=PreprocessConfig(spacing=SPACING, min_size=CROP),
        crops=CropConfig(size=CROP, sites=1, windows=((-1000.0, 1000.0), (-150.0, 250.0))),
        model=ModelConfig(encoder="resnet", preset="tiny", embed_dim=16),
        clip=ClipConfig(grid=CROP),
        train=TrainConfig(out=out, steps=1),
    )


def write_checkpoint(run_dir: Path, method: str = "t3d", seed: int = 0) -> Path:
    """A pre-training checkpoint as ``t3d pretrain`` writes it (random weights), in ``run_dir``."""
    cfg = tiny_pretrain_config(method, str(run_dir))
    torch.manual_seed(seed)
    model = PretrainModel(cfg, method_spec(method), text_dim=TEXT_DIM)
    state = {
        "model": model.state_dict(),
        "config": to_dict(cfg),
        "method": method,
        "text_mean": 0.01 * torch.randn(TEXT_DIM),
        "text_model": MINILM_ID,
        "step": 1,
    }
    if method_spec(method).align == "sentence":
        state["sent_mean"] = 0.01 * torch.randn(TEXT_DIM)
    save_checkpoint(state, run_dir, "final")
    return run_dir
