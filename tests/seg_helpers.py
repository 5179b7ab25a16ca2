"""Tiny segmentation data and pre-training checkpoints shared by the downstream tests (not a test module)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from t3d.config import CropConfig, ModelConfig, PreprocessConfig, PretrainConfig, to_dict
from t3d.models.encoders import RESNET_PRESETS, ResNetEncoder

SHAPE = (36, 32, 20)
SPACING = (2.0, 2.0, 3.0)
CROP = (64, 32, 32)
LABELS = {"0": "background", "1": "organ", "2": "lesion"}


def ball(shape, centre, radius_mm, spacing):
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm**2


def synthetic_case(seed: int, shape=SHAPE, spacing=SPACING) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU (air around a soft-tissue body, a bright 'organ', a small dark 'lesion' in it) and its labels."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    centre = np.array(shape) / 2
    body = ball(shape, centre, 0.45 * min(n * s for n, s in zip(shape, spacing)), spacing)
    image[body] = 20
    organ_centre = centre + rng.uniform(-3, 3, size=3)
    organ = ball(shape, organ_centre, 14.0, spacing) & body
    image[organ], label[organ] = 150, 1
    lesion = ball(shape, organ_centre + rng.uniform(-2, 2, size=3), 4.5, spacing) & organ
    image[lesion], label[lesion] = -60, 2
    image = (image + rng.normal(0, 8, size=shape)).astype(np.int16)
    return image, label


def write_nifti(array: np.ndarray, path: Path, spacing=SPACING, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_msd(root: Path, n_train: int = 6, n_test: int = 2) -> Path:
    """An MSD-layout dataset (imagesTr/labelsTr, labelled test entries) of tiny synthetic cases -> dataset.json."""
    training, test = [], []
    for i in range(n_train + n_test):
        image, label = synthetic_case(i)
        name = f"case_{i:03d}.nii.gz"
        write_nifti(image, root / "imagesTr" / name)
        write_nifti(label, root / "labelsTr" / name)
        (training if i < n_train else test).append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    desc = {"name": "tiny", "labels": LABELS, "numTraining": n_train, "training": training, "test": test}
    path = root / "dataset.json"
    path.write_text(json.dumps(desc))
    return path


def pretrain_config(encoder: str = "resnet") -> PretrainConfig:
    return PretrainConfig(
        preprocess=PreprocessConfig(spacing=SPACING, min_size=(32, 32, 32)),
        crops=CropConfig(size=CROP, windows=((-1000.0, 1000.0), (-150.0, 250.0))),
        model=ModelConfig(encoder=encoder, preset="tiny"),
    )


def swin_encoder_state(in_channels: int = 2, feature_size: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """``encoder.swinViT.*`` keys as a PretrainModel would hold them (MONAI's SwinTransformer, built without einops)."""
    return dict(_swin_state(in_channels, feature_size, seed))


@functools.lru_cache(maxsize=8)
def _swin_state(in_channels: int, feature_size: int, seed: int) -> dict[str, torch.Tensor]:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    swin = SwinUNETR(in_channels=in_channels, out_channels=2, feature_size=feature_size).swinViT
    return {f"encoder.swinViT.{k}": v.clone() for k, v in swin.state_dict().items()}


def resnet_encoder_state(in_channels: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    enc = ResNetEncoder(in_channels, *RESNET_PRESETS["tiny"], norm=ModelConfig().norm)  # the config's default norm
    return {f"encoder.{k}": v.clone() for k, v in enc.state_dict().items()}


def pretrain_model_state(encoder: str, seed: int) -> dict[str, torch.Tensor]:
    """The state of a real ``PretrainModel`` (encoder + heads + decoder keys as ``t3d pretrain`` saves them).

    MONAI's Swin transformer needs einops to be built inside our encoder; without it the swinvit state is made of
    MONAI's own ``SwinUNETR.swinViT`` keys under ``encoder.swinViT.`` (what PretrainModel holds).
    """
    if encoder == "swinvit" and importlib.util.find_spec("einops") is None:
        state = swin_encoder_state(seed=seed)
        state["image_head.net.0.weight"] = torch.zeros(4, 4)
        state["logit_scale.value"] = torch.tensor(2.0)
        return state
    from t3d.losses import method_spec
    from t3d.pretrain.model import PretrainModel

    torch.manual_seed(seed)
    return PretrainModel(pretrain_config(encoder), method_spec("t3d"), text_dim=8).state_dict()


def write_pretrain_checkpoint(run_dir: Path, encoder: str = "resnet", seed: int = 0) -> Path:
    """A run folder with checkpoints/final.pt in the layout of ``t3d pretrain`` (model state + config + text)."""
    from t3d.checkpoint import save_checkpoint

    ckpt = {
        "model": pretrain_model_state(encoder, seed),
        "config": to_dict(pretrain_config(encoder)),
        "method": "t3d",
        "step": 7,
        "text_mean": torch.zeros(8),
        "text_model": "minilm",
    }
    save_checkpoint(ckpt, run_dir, "final")
    return run_dir
