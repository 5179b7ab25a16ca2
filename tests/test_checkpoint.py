"""Checkpoints: atomic writes, the ``latest`` pointer, pruning, RNG state, ``weights_only`` loading."""

import os
import random

import numpy as np
import pytest
import torch

from t3d import checkpoint
from t3d.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {"method": "t3d"}}


def test_save_points_latest_at_the_new_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    path = save_checkpoint(state(1), tmp_path, "step_0000001")
    assert path == tmp_path / "checkpoints" / "step_0000001.pt"
    assert latest_checkpoint(tmp_path) == path
    save_checkpoint(state(2), tmp_path, "final")
    assert load_checkpoint(tmp_path)["step"] == 2  # a run folder loads its latest checkpoint
    assert load_checkpoint(path)["step"] == 1


def test_a_crash_while_saving_leaves_the_previous_checkpoint_in_place(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path, "step_0000001")
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # a torn write: half a file, then the process dies
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(state(2), tmp_path, "step_0000002")
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000001.pt"]  # no stray temp or half file
    assert latest_checkpoint(tmp_path) == folder / "step_0000001.pt"
    assert load_checkpoint(tmp_path)["step"] == 1


def test_keep_prunes_old_step_checkpoints_by_step_number(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(state(step), tmp_path, f"step_{step:07d}")
    # Equal or reversed modification times (coarse file-system clocks, copied folders) must not matter.
    os.utime(folder / "step_0000002.pt", ns=(10**9, 10**9))
    save_checkpoint(state(3), tmp_path, "step_0000003", keep=2)
    assert sorted(p.name for p in folder.glob("*.pt")) == ["step_0000002.pt", "step_0000003.pt"]
    save_checkpoint(state(4), tmp_path, "final", keep=1)
    assert sorted(p.name for p in folder.glob("*.pt")) == ["final.pt", "step_0000003.pt"]
    assert latest_checkpoint(tmp_path) == folder / "final.pt"


def test_missing_target_of_latest_is_explained(tmp_path):
    save_checkpoint(state(1), tmp_path, "step_0000001")
    (tmp_path / "checkpoints" / "step_0000001.pt").unlink()
    with pytest.raises(FileNotFoundError, match="delete"):
        latest_checkpoint(tmp_path)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(empty)


def draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    saved = rng_state()
    expected = draws()
    path = save_checkpoint({"rng": saved, "step": 5}, tmp_path, "step_0000005")
    loaded = torch.load(path, weights_only=True)  # plain containers and tensors only
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(loaded["rng"])
    got = draws()
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


class Opaque:
    """Stands for any pickled object: what weights_only refuses to execute."""


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"obj": Opaque()}, path)
    with pytest.raises(Exception, match="weights_only"):
        load_checkpoint(path)
