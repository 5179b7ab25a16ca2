"""ResumableSampler: rank shards, exact resume positions, epoch permutations."""

import numpy as np
import pytest

from t3d.data.sampler import ResumableSampler


def epoch(n, batch, world, e, seed=0, drop_last=False):
    """Every rank's indices of epoch ``e``: {rank: list}."""
    out = {}
    for r in range(world):
        s = ResumableSampler(n, batch, seed=seed, rank=r, world_size=world, drop_last=drop_last)
        s.set_position(e, 0)
        out[r] = list(s)
        assert len(out[r]) == len(s)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_epoch(world):
    n, batch = 24, 4  # a multiple of batch * world for 1, 2, 3 ranks: no padding
    shards = epoch(n, batch, world, e=0)
    flat = [i for r in range(world) for i in shards[r]]
    assert sorted(flat) == list(range(n))
    assert all(len(shards[r]) == n // world for r in range(world))


def test_padding_repeats_only_enough_studies_for_equal_shards():
    n, batch, world = 10, 4, 2  # padded to 16: every rank yields 2 batches of 4
    shards = epoch(n, batch, world, e=0)
    assert [len(shards[r]) for r in range(world)] == [8, 8]
    flat = shards[0] + shards[1]
    assert set(flat) == set(range(n))
    counts = np.bincount(flat, minlength=n)
    assert counts.max() == 2 and (counts == 2).sum() == 16 - n


def test_drop_last_drops_the_partial_global_batch():
    shards = epoch(10, 4, 2, e=0, drop_last=True)  # 10 // 8 = 1 batch per rank, no duplicates
    flat = shards[0] + shards[1]
    assert len(flat) == 8 and len(set(flat)) == 8


@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_resuming_at_a_batch_yields_exactly_the_rest_of_the_epoch(start):
    n, batch, world = 26, 3, 2
    for rank in range(world):
        full = ResumableSampler(n, batch, seed=7, rank=rank, world_size=world)
        full.set_position(3, 0)
        indices = list(full)
        resumed = ResumableSampler(n, batch, seed=7, rank=rank, world_size=world)  # a fresh process
        resumed.set_position(3, start)
        assert list(resumed) == indices[start * batch :]
        assert len(resumed) == len(indices) - start * batch


def test_epochs_are_different_permutations_and_reproducible():
    e0, e1 = epoch(20, 5, 1, e=0)[0], epoch(20, 5, 1, e=1)[0]
    assert sorted(e0) == sorted(e1) == list(range(20))
    assert e0 != e1
    assert epoch(20, 5, 1, e=1)[0] == e1
    assert epoch(20, 5, 1, e=1, seed=1)[0] != e1


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="at least one sample"):
        ResumableSampler(0, 4)
