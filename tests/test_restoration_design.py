"""What makes restoration need the encoder and the report (docs/method.md §4): a soft-tissue window channel by
default, lesion-scale mask cubes, and a decoder without skips from the corrupted input or the stride-2 stem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t3d.config import DEFAULT_WINDOWS, CropConfig, LossConfig, PretrainConfig
from t3d.data.crops import apply_windows, window_params
from t3d.finetune.config import ClsConfig
from t3d.losses import random_cube_mask
from t3d.models import RestorationDecoder

SIZE = (32, 32, 32)
CHANNELS = [2, 8, 8, 16, 32, 64]  # a 6-level encoder (input, strides 2 .. 32)


def features(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, *(s // 2**i for s in SIZE), generator=g) for i, c in enumerate(CHANNELS)]


def test_default_input_has_a_soft_tissue_window_where_a_liver_lesion_is_visible():
    assert CropConfig().windows == DEFAULT_WINDOWS and CropConfig().channels == 2
    assert PretrainConfig().crops.channels == 2 and ClsConfig().windows == DEFAULT_WINDOWS  # one input everywhere
    liver, lesion = 60.0, 20.0  # a hypodense lesion 40 HU below the liver
    hu = np.array([[[liver, lesion]]], dtype=np.float32)
    out = apply_windows(hu.copy(), window_params(DEFAULT_WINDOWS), np.empty((2, 1, 1, 2), dtype=np.float32))
    steps = np.abs(out[:, 0, 0, 0] - out[:, 0, 0, 1])
    assert steps[0] == pytest.approx(0.02, abs=1e-6)  # the wide window: below a typical restoration error
    assert steps[1] == pytest.approx(0.1, abs=1e-6)  # the soft-tissue window: five times the contrast


def test_mask_cubes_hide_whole_lesions_at_the_default_spacing():
    block = LossConfig().mask_block
    spacing = PretrainConfig().preprocess.spacing
    assert min(block * s for s in spacing) >= 12.0  # mm: most reported lesions fit inside one hidden cube
    mask = random_cube_mask((1, 1, 64, 64, 64), 0.5, block, torch.Generator().manual_seed(0))
    assert mask[0, 0, :block, :block, :block].all() or not mask[0, 0, :block, :block, :block].any()


@pytest.mark.parametrize("finest_skip", [0, 1, 2])
def test_decoder_reads_no_level_finer_than_its_finest_skip(finest_skip):
    torch.manual_seed(0)
    dec = RestorationDecoder(CHANNELS, out_channels=2, cond_dim=8, finest_skip=finest_skip).eval()
    feats, other = features(0), features(1)
    cond = torch.randn(2, 8)
    with torch.no_grad():
        base = dec(feats, cond=cond)
        for level in range(3):
            changed = [other[i] if i == level else f for i, f in enumerate(feats)]
            moved = (dec(changed, cond=cond) - base).abs().max().item()
            assert (moved > 1e-4) == (level >= finest_skip), (level, moved)
    assert tuple(base.shape) == (2, 2, *SIZE)


def test_default_decoder_has_no_skip_from_the_corrupted_input_or_the_stem():
    dec = RestorationDecoder(CHANNELS, out_channels=2, cond_dim=8)
    assert dec.finest_skip == 2 == PretrainConfig().model.decoder_finest_skip
    with pytest.raises(ValueError, match="finest_skip"):
        RestorationDecoder(CHANNELS, out_channels=2, cond_dim=8, finest_skip=6)
