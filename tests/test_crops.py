import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from t3d.config import ConfigError, CropConfig, DataConfig, PretrainConfig
from t3d.data.cache import AIR_HU, StudyCache, StudyMeta
from t3d.data.crops import CropDataset, WholeVolumeDataset, read_crop
from t3d.losses import method_spec
from t3d.pretrain.data import build_dataset

SIZE = (16, 16, 16)


def write_cache(root, volumes, labels=None):
    """A cache holding ``volumes`` ({id: int16 (X, Y, Z)}) written through the real StudyCache writer."""
    cache = StudyCache(root)
    rows = []
    for study_id, image in volumes.items():
        meta = StudyMeta(
            id=study_id,
            key=study_id,
            shape=image.shape,
            spacing=(1.0, 1.0, 1.0),
            affine=np.eye(4).tolist(),
            source=f"/nowhere/{study_id}.nii.gz",
            source_hash="x",
        )
        cache.write_study(meta, image.astype(np.int16), None if labels is None else labels[study_id])
        rows.append({"id": study_id, "key": study_id, "report": f"report of {study_id}"})
    cache.write_index(rows)
    return root


def body_volume(shape=(40, 40, 30), seed=0, body=((8, 32), (6, 34), (5, 25))):
    """Air with a textured soft-tissue box (HU -100..300) at ``body`` (per-axis [start, stop))."""
    vol = np.full(shape, AIR_HU, dtype=np.int16)
    box = tuple(slice(a, b) for a, b in body)
    vol[box] = np.random.default_rng(seed).integers(-100, 300, size=vol[box].shape)
    return vol


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    vols = {f"s{i}": body_volume(seed=i) for i in range(5)}
    return write_cache(tmp_path_factory.mktemp("cache"), vols)


def cfg(**kw):
    return CropConfig(**{"size": SIZE, "sites": 2, **kw})


def window(hu, lo, hi):
    return min(max((hu - lo) / (hi - lo), 0.0), 1.0)


def assert_items_equal(a, b):
    assert a["id"] == b["id"] and a["index"] == b["index"]
    assert torch.equal(a["centers"], b["centers"]) and torch.equal(a["views"], b["views"])


def test_item_shapes_and_dtypes(cache):
    ds = CropDataset(cache, cfg(sites=3, windows=((-1000, 1000), (-100, 200))))
    item = ds[1]
    assert item["views"].shape == (3, 2, 2, *SIZE) and item["views"].dtype == torch.float32
    assert item["centers"].shape == (3, 2, 3) and item["centers"].dtype == torch.int64
    assert item["index"] == 1 and item["id"] == "s1"
    assert len(ds) == 5
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["views"].shape == (2, 3, 2, 2, *SIZE)


def test_windows_map_known_hu_to_channels(tmp_path):
    root = write_cache(tmp_path, {"flat": np.full((24, 24, 24), 200, dtype=np.int16)})
    windows = ((-1000.0, 1000.0), (0.0, 100.0), (150.0, 350.0))
    views = CropDataset(root, cfg(windows=windows, augment=False))[0]["views"]
    for c, (lo, hi) in enumerate(windows):
        torch.testing.assert_close(views[:, :, c], torch.full_like(views[:, :, c], window(200, lo, hi)))
    assert views[0, 0, 0, 0, 0, 0].item() == pytest.approx(0.6)


def test_views_overlap_and_differ_with_augmentation(cache):
    c = cfg(max_shift=0.25, sites=4)
    max_d = int(0.25 * SIZE[0])
    aug = CropDataset(cache, c, epoch_length=20)
    differ = 0
    for i in range(len(aug)):
        item = aug[i]
        d = (item["centers"][:, 0] - item["centers"][:, 1]).abs()
        assert (d <= max_d).all()
        differ += int(not torch.equal(item["views"][:, 0], item["views"][:, 1]))
    assert differ == len(aug)
    # Without shift and augmentation both views are the very same crop: the differences came from those.
    same = CropDataset(cache, cfg(max_shift=0.0, augment=False))[0]
    assert torch.equal(same["views"][:, 0], same["views"][:, 1])
    assert torch.equal(same["centers"][:, 0], same["centers"][:, 1])


def test_augmentation_jitter_stays_within_bounds(cache):
    views = CropDataset(cache, cfg(intensity_scale=0.1, intensity_shift=0.1))[0]["views"]
    assert views.min() >= -0.1 - 1e-6 and views.max() <= 1.2 + 1e-6


def test_sites_are_foreground_biased(tmp_path):
    body = ((30, 50), (30, 50), (20, 40))  # ~4 % of the centre positions a 16^3 crop can take
    root = write_cache(tmp_path, {"a": body_volume((80, 80, 60), body=body), "b": body_volume((80, 80, 60), 1, body)})

    def inside_fraction(prob):
        ds = CropDataset(root, cfg(foreground_prob=prob, max_shift=0.0, sites=4), epoch_length=60)
        centres = torch.cat([ds[i]["centers"][:, 0] for i in range(len(ds))]).numpy()
        inside = [all(lo <= x < hi for x, (lo, hi) in zip(c, body)) for c in centres]
        return float(np.mean(inside))

    assert inside_fraction(0.9) >= 0.8
    assert inside_fraction(0.0) <= 0.2


def test_small_volume_is_padded_with_air(tmp_path):
    vol = np.full((10, 12, 8), 100, dtype=np.int16)
    root = write_cache(tmp_path, {"small": vol})
    lo, hi = -1100.0, 1000.0
    item = CropDataset(root, cfg(windows=((lo, hi),), augment=False))[0]
    views = item["views"][:, :, 0]  # (K, 2, D, H, W)
    inner = (slice(3, 13), slice(2, 14), slice(4, 12))  # centred: (16 - shape) // 2 voxels before
    expected = torch.full(SIZE, window(AIR_HU, lo, hi))
    expected[inner] = window(100, lo, hi)
    for k in range(views.shape[0]):
        for v in range(2):
            torch.testing.assert_close(views[k, v], expected)
    # Flips move the padding but keep its amount; only along the allowed axes (AP by default, SI on request).
    plain = {"windows": ((lo, hi),), "flip_prob": 1.0, "intensity_scale": 0, "intensity_shift": 0}
    flipped = CropDataset(root, cfg(**plain))[0]
    torch.testing.assert_close(flipped["views"][0, 0, 0], expected.flip(1))
    flipped = CropDataset(root, cfg(**plain, flip_axes=("AP", "SI")))[0]
    torch.testing.assert_close(flipped["views"][0, 0, 0], expected.flip(1, 2))


def test_read_crop_matches_padded_reference():
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(9, 11, 7)).astype(np.int16)
    pad = 20
    padded = np.pad(vol, pad, constant_values=AIR_HU)
    for _ in range(50):
        start = rng.integers(-14, 14, size=3)
        flips = rng.random(3) < 0.5
        out = read_crop(vol, start, np.empty((6, 8, 5), dtype=np.float32), flips)
        ref = padded[tuple(slice(s + pad, s + pad + n) for s, n in zip(start, out.shape))]
        ref = np.flip(ref, axis=tuple(np.flatnonzero(flips))) if flips.any() else ref
        np.testing.assert_array_equal(out, ref.astype(np.float32))


def test_same_seed_same_items_other_seed_or_epoch_differs(cache):
    a, b = CropDataset(cache, cfg(), seed=3), CropDataset(cache, cfg(), seed=3)
    for i in range(len(a)):
        assert_items_equal(a[i], b[i])
    other = CropDataset(cache, cfg(), seed=4)
    assert not torch.equal(a[0]["views"], other[0]["views"])
    first = a[0]
    a.set_epoch(1)
    assert not torch.equal(first["views"], a[0]["views"])
    a.set_epoch(0)
    assert_items_equal(first, a[0])


def test_epoch_length_wraps_over_studies(cache):
    ds = CropDataset(cache, cfg(), epoch_length=12)
    assert len(ds) == 12
    assert [ds[i]["index"] for i in (0, 5, 11)] == [0, 0, 1]
    assert not torch.equal(ds[0]["centers"], ds[5]["centers"])  # same study, another draw
    with pytest.raises(IndexError):
        ds[12]


def test_dataloader_workers_give_identical_batches(cache):
    ds = CropDataset(cache, cfg(), seed=1, epoch_length=8)
    runs = [list(DataLoader(ds, batch_size=3, num_workers=w)) for w in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == 3
    for b0, b1 in zip(*runs):
        assert b0["id"] == b1["id"] and torch.equal(b0["views"], b1["views"])
        assert torch.equal(b0["centers"], b1["centers"]) and torch.equal(b0["index"], b1["index"])


def test_pickled_dataset_does_not_carry_open_volumes(cache):
    ds = CropDataset(cache, cfg())
    empty = len(pickle.dumps(ds))
    ds[0], ds[1]
    assert len(pickle.dumps(ds)) == empty
    assert_items_equal(pickle.loads(pickle.dumps(ds))[1], ds[1])


def test_set_epoch_reaches_persistent_workers(cache):
    ds = CropDataset(cache, cfg(), seed=2)
    loader = DataLoader(ds, batch_size=5, num_workers=1, persistent_workers=True)
    epoch0 = next(iter(loader))
    ds.set_epoch(1)
    epoch1 = next(iter(loader))
    reference = CropDataset(cache, cfg(), seed=2)
    reference.set_epoch(1)
    assert not torch.equal(epoch0["views"], epoch1["views"])
    assert torch.equal(epoch1["views"], torch.stack([reference[i]["views"] for i in range(5)]))


def test_distributed_shards_are_disjoint_and_match_single_process(cache):
    ds = CropDataset(cache, cfg(), seed=5, epoch_length=10)
    ds.set_epoch(2)
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(2)
        shards.append(list(sampler))
        items = list(DataLoader(ds, batch_size=None, sampler=sampler))
        for i, item in zip(shards[-1], items):
            assert_items_equal(item, ds[i])
    assert set(shards[0]).isdisjoint(shards[1]) and sorted(shards[0] + shards[1]) == list(range(10))


def test_ids_select_and_order_studies(cache):
    ds = CropDataset(cache, cfg(), ids=["s3", "s1"])
    assert [ds[i]["id"] for i in range(2)] == ["s3", "s1"] and [ds[i]["index"] for i in range(2)] == [3, 1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(CropDataset(cache, cfg(), ids=["s2", "gone"])) == 1
    assert any("gone" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="no studies"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CropDataset(cache, cfg(), ids=["gone"])


def test_labels_follow_the_same_crops_and_flips(tmp_path):
    vol = body_volume((30, 30, 30), body=((5, 20), (10, 28), (3, 17)))
    vol[vol > AIR_HU] = 500
    root = write_cache(tmp_path, {"lab": vol}, labels={"lab": (vol > 0).astype(np.uint8)})
    c = cfg(sites=4, flip_prob=0.5, intensity_scale=0.0, intensity_shift=0.0)
    item = CropDataset(root, c, with_labels=True)[0]
    assert item["labels"].shape == (4, 2, 1, *SIZE) and item["labels"].dtype == torch.uint8
    assert torch.equal(item["labels"].bool(), item["views"][:, :, :1] > 0.5)
    assert item["labels"].any()
    nolabel = write_cache(tmp_path / "nolabel", {"x": vol})
    with pytest.raises(ValueError, match="label"):
        CropDataset(nolabel, c, with_labels=True)[0]


def lateral_gradient_volume(shape=(40, 36, 30)):
    """HU rising strictly from right to left (along X) and, more slowly, along Y and Z."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (-400 + 20 * x + 3 * y + 2 * z).astype(np.int16)


def increasing(a, axis):
    return bool((np.diff(np.asarray(a), axis=axis) > 0).all())


@pytest.mark.parametrize("flip_axes", [("AP",), ("AP", "SI"), ()])
def test_flips_never_touch_left_right_and_by_default_not_superior_inferior(tmp_path, flip_axes):
    root = write_cache(tmp_path, {"lat": lateral_gradient_volume()})
    c = cfg(sites=4, flip_prob=0.9, flip_axes=flip_axes, windows=((-1000.0, 1000.0),))
    ds = CropDataset(root, c, epoch_length=8)
    flipped = {1: False, 2: False}
    for i in range(len(ds)):
        views = ds[i]["views"][:, :, 0].flatten(0, 1)  # (K*2, D, H, W)
        for v in views:
            assert increasing(v, 0)  # left-right order is kept in every view of every item
            for axis in (1, 2):
                flipped[axis] |= not increasing(v, axis)
    assert flipped[1] == ("AP" in flip_axes)
    assert flipped[2] == ("SI" in flip_axes)
    assert CropConfig().flip_axes == ("AP",)


def test_clip_whole_volume_gets_the_same_augmentation_policy(tmp_path):
    root = write_cache(tmp_path, {"lat": lateral_gradient_volume(), "b": body_volume()})
    aug = CropConfig(flip_prob=1.0, flip_axes=("AP",))
    plain = WholeVolumeDataset(root, grid=(16, 16, 12))[0]["volume"]
    seen = [WholeVolumeDataset(root, grid=(16, 16, 12), augment=aug, seed=s)[0]["volume"] for s in range(4)]
    for vol in seen:
        assert increasing(vol[0], 0) and not increasing(vol[0], 1)  # AP flipped, LR never
        assert not torch.allclose(vol, plain.flip(2))  # intensity jitter on top of the flip
        torch.testing.assert_close(vol, plain.flip(2), atol=0.25, rtol=0)
    assert not torch.allclose(seen[0], seen[1])  # draws differ per seed (and epoch)
    ds = WholeVolumeDataset(root, grid=(16, 16, 12), augment=aug)
    first = ds[0]["volume"]
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["volume"])
    assert torch.equal(WholeVolumeDataset(root, grid=(16, 16, 12))[0]["volume"], plain)  # evaluation: no draws
    pre = PretrainConfig(method="clip", seed=3, data=DataConfig(cache=str(root)))
    ds = build_dataset(pre, method_spec("clip"))  # what `t3d pretrain` trains clip on
    assert isinstance(ds, WholeVolumeDataset) and ds.augment is pre.crops and ds.seed == 3


def test_crop_config_rejects_left_right_flips():
    with pytest.raises(ConfigError, match="LR.*side"):
        CropConfig(flip_axes=("LR",))
    with pytest.raises(ConfigError, match="flip_axes"):
        CropConfig(flip_axes=("XY",))


def test_crop_config_rejects_bad_augmentation():
    with pytest.raises(ConfigError, match="intensity_scale"):
        CropConfig(intensity_scale=1.5)
    with pytest.raises(ConfigError, match="foreground_prob"):
        CropConfig(foreground_prob=2.0)


def test_whole_volume_is_resized_to_the_grid(tmp_path):
    vol = np.full((64, 64, 48), AIR_HU, dtype=np.int16)
    vol[:16, :16, :12] = 1000  # a bright cube in the first 1/4 x 1/4 x 1/4 corner
    root = write_cache(tmp_path, {"w": vol, "tiny": np.full((8, 70, 20), 1000, dtype=np.int16)})
    ds = WholeVolumeDataset(root, grid=(16, 16, 12), windows=((-1000, 1000), (-100, 100)))
    item = ds[0]
    out = item["volume"]
    assert out.shape == (2, 16, 16, 12) and out.dtype == torch.float32 and item["id"] == "w"
    torch.testing.assert_close(out[:, :4, :4, :3], torch.ones(2, 4, 4, 3))
    region = torch.zeros(16, 16, 12, dtype=torch.bool)
    region[:4, :4, :3] = True
    assert out[0][~region].max() < 0.01
    assert out[0].mean().item() == pytest.approx(vol.size / 64 / vol.size, abs=0.01)  # 1/64 of the volume is bright
    # Up-sampling along an axis (8 < 16) and down-sampling along another in one call.
    assert ds[1]["volume"].shape == (2, 16, 16, 12)
    ds.set_epoch(3)  # no-op, shared interface with CropDataset
