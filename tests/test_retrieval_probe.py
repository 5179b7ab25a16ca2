"""Retrieval through linear heads on frozen features (t3d.evaluate.retrieval_probe): it must see features that carry
what the reports say, and must not see features that carry nothing, however well the heads memorise the pairs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cls_helpers import tiny_pretrain_config
from t3d.config import TextConfig
from t3d.evaluate.retrieval_probe import RetrievalProbeConfig, retrieval_probe
from t3d.evaluate.studies import read_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from transfer_retrieval import retrieval_controls, run_retrieval_probe_stage  # noqa: E402

CFG = RetrievalProbeConfig(dim=32, steps=300, batch_size=16, weight_decays=[0.05, 5.0], n_boot=500)


def world(n: int, seed: int, informative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """n studies with 6 binary findings; reports = findings + their own wording; images = findings (or nothing)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.rand(n, 6, generator=g) < 0.4).float()
    mix_t = torch.randn(6, 24, generator=torch.Generator().manual_seed(1))  # the same language for every split
    mix_x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))  # the same imaging for every split
    t = z @ mix_t + 0.3 * torch.randn(n, 24, generator=g)
    x = z @ mix_x if informative else torch.zeros(n, 40)
    return x + 0.3 * torch.randn(n, 40, generator=g), t


def test_features_that_carry_the_findings_retrieve_held_out_reports_above_chance():
    (x, t), (xs, ts) = world(160, 0, True), world(80, 1, True)
    r = retrieval_probe(x, t, xs, ts, CFG, seed=0)
    assert r["chance"] == pytest.approx(5 / 80)
    assert r["r@5"]["low"] > r["chance"]  # the interval clears chance
    assert r["weight_decay"] in CFG.weight_decays and set(r["val_r5"]) == {"0.05", "5.0"}
    u, v = r["embeddings"]
    assert u.shape == v.shape == (80, 32) and torch.allclose(u.norm(dim=1), torch.ones(80))


def test_features_without_the_findings_stay_at_chance_though_the_heads_memorise_the_pairs():
    (x, t), (xs, ts) = world(160, 0, False), world(80, 1, False)
    r = retrieval_probe(x, t, xs, ts, CFG, seed=0)
    assert r["train_r5"] > 4 * 5 / 160  # the heads fit noise in 40 dimensions to the 160 training pairs ...
    assert r["r@5"]["low"] <= r["chance"]  # ... and says nothing about held-out ones
    assert r["r@5"]["value"] < 0.2


def test_settings_and_inputs_are_checked():
    with pytest.raises(ValueError, match="weight_decays"):
        RetrievalProbeConfig(weight_decays=[])
    with pytest.raises(ValueError, match="val_fraction"):
        RetrievalProbeConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        RetrievalProbeConfig(batch_size=1)
    x, t = world(3, 0, True)
    with pytest.raises(ValueError, match="training pairs"):
        retrieval_probe(x, t, x, t, CFG)


@pytest.mark.usefixtures("one_thread")
def test_the_benchmark_stage_reads_an_encoder_its_reports_and_the_finding_ceiling(tiny_cache):
    pcfg = tiny_pretrain_config("t3d")
    pcfg.text = TextConfig()  # the session cache's text store holds these features
    pcfg.crops.windows = ((-1000.0, 1000.0),)
    splits = tiny_cache.data / "splits.json"
    train = (tiny_cache.cache, read_split(splits, "pretrain"))
    test = (tiny_cache.cache, read_split(splits, "finetune") + read_split(splits, "test"))
    cfg = RetrievalProbeConfig(dim=8, steps=5, batch_size=4, weight_decays=[0.1], n_boot=20)
    r = run_retrieval_probe_stage(None, pcfg, cfg, train, test, tiny_cache.data / "ground_truth.jsonl", 0, max_crops=2)
    assert r["n_train"] == len(train[1]) and r["n_test"] == len(test[1]) and "embeddings" not in r
    assert r["chance"] == pytest.approx(min(1.0, 5 / len(test[1])))
    assert {"same_findings_r5", "same_findings_r5_chance", "feature_dim"} <= set(r)
    assert set(r["ceiling"]) == {"findings", "diffuse_findings"}
    rc = retrieval_controls([{**r, "kind": "retrieval_probe", "method": "random", "seed": 0}])
    assert rc["runs"]["random"]["0"]["n_test"] == len(test[1]) and rc["sensitive"] == {"0": None}
