"""Frozen-encoder probes: oracle and constant features, the lesion-crop sampler, feature caching and the gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from t3d.checkpoint import save_checkpoint
from t3d.config import CropConfig, ModelConfig, PreprocessConfig, PretrainConfig
from t3d.data.cache import StudyCache
from t3d.evaluate.features import (
    cached,
    centre_cells,
    crop_features,
    frozen_encoder,
    study_features,
    voxel_statistics,
)
from t3d.evaluate.gate import (
    NOT_MEASURED,
    NOT_SENSITIVE,
    gate_entry,
    gate_table,
    is_sensitive,
    metric_kind,
    sensitive_metrics,
)
from t3d.evaluate.lesions import (
    CropSite,
    cross_check,
    find_lesions,
    lesion_sites,
    relative_position,
    window_has_lesion,
)
from t3d.evaluate.linear import fit_probe
from t3d.evaluate.probes import (
    cluster_auroc,
    lesion_probe,
    paired_cluster_auroc,
    paired_macro_auroc,
    size_stratum,
    stratum_names,
    study_probe,
)
from t3d.finetune.networks import SegSpec
from t3d.metrics import auroc
from t3d.pretrained import load_pretrained

LESIONS = (9, 10, 11, 12)


def _split(n: int) -> np.ndarray:
    return np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))


def _labels(n: int, classes: int = 3, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, classes)) < 0.3).astype(np.float32)


def test_study_probe_oracle_features_give_auroc_one():
    y = _labels(240)
    noise = np.random.default_rng(1).normal(size=(240, 5)).astype(np.float32)
    x = np.concatenate([y * 3.0, noise], axis=1)  # the labels themselves, plus nuisance features
    out = study_probe(x, y, _split(240), ["a", "b", "c"], n_boot=200)
    assert out["metrics"]["macro"]["auroc"]["value"] > 0.99
    assert out["metrics"]["macro"]["auroc"]["low"] > 0.95
    for name in "abc":
        assert out["metrics"]["per_class"][name]["auroc"]["value"] > 0.99


def test_study_probe_constant_features_give_chance():
    y = _labels(240)
    out = study_probe(np.ones((240, 4), np.float32), y, _split(240), ["a", "b", "c"], n_boot=200)
    assert out["metrics"]["macro"]["auroc"]["value"] == pytest.approx(0.5)


def _sites_and_features(oracle: bool, n_studies: int = 120, seed: int = 0):
    """Per study one lesion of random size and one matched negative from another (lesion-free) study."""
    rng = np.random.default_rng(seed)
    sites, feats = [], []
    for g in range(n_studies):
        diameter = float(rng.uniform(3, 25))
        sites.append(CropSite(f"p{g}", f"p{g}", (0, 0, 0), 1, diameter, g))
        sites.append(CropSite(f"n{g}", f"n{g}", (0, 0, 0), 0, diameter, g))
    for s in sites:
        signal = float(s.label) if oracle else 1.0
        feats.append([signal * 2.0, *rng.normal(size=3)])
    split = {s.study: ("train", "train", "val", "test", "test")[int(s.study[1:]) % 5] for s in sites}
    return np.asarray(feats, np.float32), sites, split


def test_lesion_probe_oracle_and_constant_per_size_stratum():
    x, sites, split = _sites_and_features(oracle=True)
    out = lesion_probe(x, sites, split, thresholds=(10.0,), n_boot=200)
    assert set(out["strata"]) == {"small", "large"}
    for entry in out["strata"].values():
        assert entry["value"] > 0.99 and entry["positives"] > 0 and entry["negatives"] == entry["positives"]
    x, sites, split = _sites_and_features(oracle=False)
    x[:, 1:] = 0.0  # constant features
    out = lesion_probe(x, sites, split, thresholds=(10.0,), n_boot=200)
    for entry in out["strata"].values():
        assert entry["value"] == pytest.approx(0.5)


def test_lesion_probe_per_class_sees_lesions_that_differ_from_their_surroundings_in_opposite_directions():
    """Class 9 lesions are brighter than their matched negatives, class 10 darker: one probe over both cannot rank
    them, one probe per class can. A class without training crops is left out, not scored by another class's probe."""
    rng = np.random.default_rng(0)
    sites, feats = [], []
    for g in range(240):
        cls, diameter = (9, 10)[g % 2], float(rng.uniform(3, 25))
        sign = 1.0 if cls == 9 else -1.0
        sites.append(CropSite(f"p{g}", f"p{g}", (0, 0, 0), 1, diameter, g, cls))
        sites.append(CropSite(f"n{g}", f"n{g}", (0, 0, 0), 0, diameter, g, cls))
        feats += [
            [sign * 2.0 + rng.normal(scale=0.3), *rng.normal(size=3)],
            [rng.normal(scale=0.3), *rng.normal(size=3)],
        ]
    x = np.asarray(feats, np.float32)
    split = {s.study: ("train", "train", "val", "test", "test")[(int(s.study[1:]) // 2) % 5] for s in sites}
    pooled = lesion_probe(x, sites, split, n_boot=100, per_class=False)
    per_class = lesion_probe(x, sites, split, n_boot=100)
    assert pooled["all"]["value"] < 0.75 and set(pooled["l2"]) == {"all"}
    assert per_class["all"]["value"] > 0.97 and set(per_class["l2"]) == {"9", "10"}
    assert [sites[i].label for i in per_class["test"]["site"]] == per_class["test"]["label"]
    extra = CropSite("q0", "q0", (0, 0, 0), 1, 5.0, 999, 11)  # only in a test study
    split["q0"] = "test"
    out = lesion_probe(np.vstack([x, x[:1]]), [*sites, extra], split, n_boot=50)
    assert len(sites) not in out["test"]["site"] and len(out["test"]["label"]) == len(per_class["test"]["label"])


def test_size_strata_follow_configurable_thresholds():
    assert [size_stratum(d, (10.0,)) for d in (4.0, 9.99, 10.0, 30.0)] == [0, 0, 1, 1]
    assert [size_stratum(d, (5.0, 15.0)) for d in (4.0, 10.0, 20.0)] == [0, 1, 2]
    assert stratum_names((5.0, 15.0)) == ["lt5mm", "5-15mm", "ge15mm"]


def test_paired_differences_and_cluster_interval():
    rng = np.random.default_rng(0)
    y = np.tile([1.0, 0.0], 100)
    good = y + rng.normal(scale=0.3, size=200)
    bad = rng.normal(size=200)
    clusters = np.repeat(np.arange(50), 4)
    delta = paired_cluster_auroc(y, good, bad, clusters, n_boot=300)
    assert delta["value"] > 0.3 and delta["low"] > 0
    same = paired_cluster_auroc(y, good, good, clusters, n_boot=100)
    assert same["value"] == 0 and same["low"] == 0 and same["high"] == 0
    single = cluster_auroc(y, good, clusters, n_boot=100)
    assert single["low"] <= single["value"] <= single["high"]
    ym = np.stack([y, 1 - y], axis=1)
    macro = paired_macro_auroc(ym, np.stack([good, -good], 1), np.stack([bad, bad], 1), n_boot=200)
    assert macro["value"] > 0.3 and macro["low"] > 0


def test_fit_probe_ties_keep_the_strongest_regularisation():
    probe = fit_probe(np.ones((20, 3)), _labels(20, 1), np.ones((8, 3)), _labels(8, 1, seed=3), l2_grid=(0.01, 1.0))
    assert probe.l2 == 1.0 and len(probe.sweep) == 2


# ----------------------------------------------------------------------------------------------- lesion sampler


def test_find_lesions_and_window_check():
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:4, 2:4, 2:4] = 9  # 8 voxels
    label[10:16, 10:16, 10:16] = 11  # 216 voxels
    label[10:12, 2:4, 2:4] = 3  # an organ, not a lesion class
    lesions = sorted(find_lesions(label, LESIONS, (1.0, 1.0, 1.0)), key=lambda les: les.voxels)
    assert [(les.label, les.voxels) for les in lesions] == [(9, 8), (11, 216)]
    assert lesions[1].diameter_mm == pytest.approx((6 * 216 / np.pi) ** (1 / 3))
    assert all(label[les.centre] == les.label for les in lesions)
    assert window_has_lesion(label, (12, 12, 12), (4, 4, 4), LESIONS)
    assert not window_has_lesion(label, (11, 3, 3), (2, 2, 2), LESIONS)
    assert relative_position((5, 0, 10), (np.zeros(3), np.array([10, 10, 10]))).tolist() == [0.5, 0.0, 1.0]


def test_negative_crops_never_hold_a_lesion(tiny_cache):
    cache = StudyCache(tiny_cache.cache)
    size = (32, 32, 32)
    sites = lesion_sites(cache, None, LESIONS, size, negatives_per_lesion=3, seed=0)
    positives = [s for s in sites if s.label == 1]
    negatives = [s for s in sites if s.label == 0]
    assert positives and len(negatives) == 3 * len(positives)
    with_lesion = {s.study for s in positives}
    for s in negatives:
        assert s.study not in with_lesion
        assert not window_has_lesion(cache.label(s.key), s.centre, size, LESIONS)
        assert s.group in {p.group for p in positives}
    for s in positives:
        assert window_has_lesion(cache.label(s.key), s.centre, size, LESIONS)


def test_lesion_sites_are_centred_and_pairs_stay_in_one_split(tiny_cache):
    cache = StudyCache(tiny_cache.cache)
    ids = [row["id"] for row in cache.index()]
    clean = [s.study for s in lesion_sites(cache, None, LESIONS, (32, 32, 32), seed=0) if s.label == 0]
    split = {i: ("test" if n % 2 else "train") for n, i in enumerate(ids)}
    split.update({i: "train" for i in clean[:1]})
    sites = lesion_sites(cache, None, LESIONS, (32, 32, 32), negatives_per_lesion=2, seed=0, split_of=split)
    positives = {s.group: s for s in sites if s.label == 1}
    lesions = {les.centre for s in positives.values() for les in find_lesions(cache.label(s.key), LESIONS, (1, 1, 1))}
    assert all(s.centre in lesions for s in positives.values())  # centred on the lesion, never shifted inward
    for s in sites:
        if s.label == 0:
            assert split[s.study] == split[positives[s.group].study]
        assert s.lesion_class == int(cache.label(positives[s.group].key)[positives[s.group].centre])  # pair's class


def test_voxel_statistics_control_sees_the_lesion(tiny_cache):
    cache = StudyCache(tiny_cache.cache)
    sites = lesion_sites(cache, None, LESIONS, (32, 32, 32), negatives_per_lesion=2, seed=0)
    one = voxel_statistics(tiny_cache.cache, sites, (1, 1, 1))
    assert one.shape == (len(sites), 27)
    assert [float(v) for v in one[:, 0]] == [float(cache.image(s.key)[s.centre]) for s in sites]
    x = voxel_statistics(tiny_cache.cache, sites, (2, 2, 2)).numpy()
    y = np.array([s.label for s in sites], np.float32)
    probe = fit_probe(x, y[:, None], x, y[:, None], l2_grid=(1e-2,))
    # Lesions at the crop centre shift the central HU statistics (tiny preset: 5 mm voxels, lesions of few voxels).
    assert auroc(y, probe.scores(x)[:, 0]) > 0.75


@pytest.mark.usefixtures("one_thread")
def test_features_are_cached_per_encoder(tiny_cache, tmp_path):
    cfg = PretrainConfig(
        crops=CropConfig(size=(32, 32, 32)), model=ModelConfig(encoder="resnet", preset="tiny", embed_dim=16)
    )
    enc = frozen_encoder(None, cfg, seed=0)
    ids = [row["id"] for row in StudyCache(tiny_cache.cache).index()[:3]]
    calls = []

    def compute():
        calls.append(1)
        return study_features(enc, tiny_cache.cache, ids, max_crops=4)

    x, out_ids = cached(tmp_path / "f.pt", enc.fingerprint, compute)
    again, _ = cached(tmp_path / "f.pt", enc.fingerprint, compute)
    assert len(calls) == 1 and out_ids == ids and torch.equal(x, again)
    assert x.shape == (3, 2 * enc.encoder.embed_channels)
    other = frozen_encoder(None, cfg, seed=1)
    cached(tmp_path / "f.pt", other.fingerprint, compute)
    assert len(calls) == 2
    sites = lesion_sites(tiny_cache.cache, ids, LESIONS, (32, 32, 32))
    assert crop_features(enc, tiny_cache.cache, sites).shape == (len(sites), enc.encoder.embed_channels)
    centre = crop_features(enc, tiny_cache.cache, sites, pooling="centre", region=(4, 4, 4))
    assert centre.shape == (len(sites), sum(enc.encoder.feature_channels[1:]))
    with pytest.raises(ValueError, match="pooling"):
        crop_features(enc, tiny_cache.cache, sites, pooling="mean")


def test_centre_cells_cover_the_central_box():
    # 64 x 64 x 32 crop: stride 2 (32 x 32 x 16 cells) and a 4 x 4 x 2 box -> the two cells around the centre
    assert centre_cells((32, 32, 16), (64, 64, 32), (4, 4, 2)) == (slice(15, 17), slice(15, 17), slice(7, 9))
    assert centre_cells((16, 16, 8), (64, 64, 32), (20, 20, 10)) == (slice(5, 11), slice(5, 11), slice(2, 6))
    assert centre_cells((2, 2, 1), (64, 64, 32), (4, 4, 2)) == (slice(0, 2), slice(0, 2), slice(0, 1))
    assert centre_cells((4, 4, 4), (64, 64, 64), (999, 999, 999)) == (slice(0, 4),) * 3  # clipped to the map


def test_centre_pooling_sees_a_small_lesion_the_crop_pool_dilutes():
    """A 4 x 4 x 2 voxel blob at the centre of a 64 x 64 x 32 crop (0.02 % of it) moves the lesion-scale features
    several times more, relative to their size, than the encoder's pooled feature of the whole crop."""
    cfg = PretrainConfig(
        crops=CropConfig(size=(64, 64, 32)), model=ModelConfig(encoder="resnet", preset="tiny", embed_dim=16)
    )
    for seed in range(2):
        enc = frozen_encoder(None, cfg, seed=seed)
        x = 0.1 * torch.randn(1, cfg.crops.channels, 64, 64, 32, generator=torch.Generator().manual_seed(seed))
        y = x.clone()
        y[..., 30:34, 30:34, 15:17] += 3.0
        a, b = enc.embed_centre(x, (4, 4, 2)), enc.embed_centre(y, (4, 4, 2))
        pa, pb = enc.embed(x), enc.embed(y)
        assert (a - b).norm() / a.norm() > 2 * (pa - pb).norm() / pa.norm()


def test_a_segmentation_run_is_probed_with_the_encoder_it_trained(tmp_path):
    """The probes read a ``t3d finetune seg`` run's encoder exactly as the segmentation network holds it."""
    windows = ((-1000.0, 1000.0), (-160.0, 240.0))
    spec = SegSpec(ModelConfig(encoder="resnet", preset="tiny"), PreprocessConfig(), windows, (32, 32, 32),
                   {0: "background", 1: "organ"})  # fmt: skip
    torch.manual_seed(3)
    net = spec.build().eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))  # away from any init a rebuilt encoder could fall back to
    state = {"kind": "t3d-seg", "model": net.state_dict(), "spec": spec.as_dict(), "step": 7}
    save_checkpoint(state, tmp_path / "seg", "best")
    enc = frozen_encoder(tmp_path / "seg")
    assert enc.crop_size == (32, 32, 32) and enc.windows == spec.windows and "seg-step7" in enc.fingerprint
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        want = net.encoder.forward_features(x)
    assert torch.equal(enc.embed(x), net.encoder.pool(want))
    pre = load_pretrained(tmp_path / "seg")
    assert pre.method == "seg" and pre.model == spec.model and set(pre.state) == set(net.encoder.state_dict())


# ----------------------------------------------------------------------------------------------- gate


def test_gate_logic():
    assert metric_kind("study_probe_auroc") == "auroc" and metric_kind("frozen_seg_organ_dice") == "dice"
    with pytest.raises(ValueError, match="neither"):
        metric_kind("hd95")
    assert is_sensitive(0.2, 0.05, 0.3, 0.15)
    assert not is_sensitive(0.2, -0.01, 0.4, 0.15)  # CI includes 0
    assert not is_sensitive(0.12, 0.05, 0.2, 0.15)  # below the threshold
    assert not is_sensitive(float("nan"), 0.1, 0.2, 0.15)
    gate = {
        "study_probe_auroc": gate_entry("study_probe_auroc", {"value": 0.3, "low": 0.2, "high": 0.4}),
        "organ_dice": gate_entry(
            "organ_dice", {"value": 0.12, "low": -0.01, "high": 0.2}, {"value": 0.01, "low": -0.1, "high": 0.1}
        ),
        "lesion_dice": gate_entry("lesion_dice", {"value": 0.11, "low": 0.02, "high": 0.2}),
    }
    gate["lesion_probe_auroc_small"] = gate_entry(
        "lesion_probe_auroc_small",
        {"value": 0.05, "low": -0.02, "high": 0.1},
        None,
        {"value": 0.2, "low": 0.1, "high": 0.3},
    )  # the findings control fails, the segmentation control passes: the metric sees encoder content
    assert sensitive_metrics(gate) == ["study_probe_auroc", "lesion_dice", "lesion_probe_auroc_small"]
    assert gate["lesion_probe_auroc_small"]["sensitive_by"] == ["supervised-seg"]
    assert gate["study_probe_auroc"]["sensitive_by"] == ["supervised"]
    assert gate["organ_dice"]["sensitive_by"] == [] and math.isnan(gate["organ_dice"]["supervised_seg_minus_random"])
    entry = gate["organ_dice"]
    for key in ("supervised_minus_random", "ci_low", "ci_high", "vssl_minus_random", "vssl_ci_low", "sensitive"):
        assert key in entry
    assert entry["threshold"] == 0.10 and entry["vssl_minus_random"] == 0.01
    rows = gate_table(gate)
    assert len(rows) == 6 and all(r.count("|") == 7 for r in rows)
    assert NOT_SENSITIVE in rows[3] and "color:grey" in rows[3] and NOT_SENSITIVE not in rows[2]
    assert "sensitive (supervised-seg)" in rows[5] and "+0.200 [+0.100, +0.300]" in rows[5]
    gate["frozen_seg_organ_dice"] = gate_entry("frozen_seg_organ_dice", None)  # its stage not in the configuration
    row = gate_table(gate)[-1]
    assert NOT_MEASURED in row and NOT_SENSITIVE not in row and "color:grey" in row


def test_strong_penalty_still_moves_from_zero_weights():
    rng = np.random.default_rng(0)
    y = np.tile([1.0, 0.0], 150)[:, None].astype(np.float32)
    x = (rng.normal(size=(300, 64)) + 0.3 * y).astype(np.float32)  # a weak signal in every feature
    for l2 in (10.0, 0.01):
        probe = fit_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=(l2,))
        assert probe.head.weight.abs().max() > 0
        assert len(np.unique(probe.scores(x[200:]))) > 1


def test_lesions_agree_with_the_synthetic_ground_truth(tiny_cache):
    check = cross_check(tiny_cache.cache, tiny_cache.data / "ground_truth.jsonl", LESIONS)
    assert check["studies"] == tiny_cache.num_studies and check["recorded"] > 0
    assert check["found"] == check["recorded"] and check["studies_agreeing"] == check["studies"]
    assert check["centres_checked"] == check["recorded"] == check["centres_on_lesion"]
    assert 0.5 < check["median_diameter_over_size"] < 2.0
