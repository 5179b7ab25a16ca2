"""The gate logic and the finding-level diagnostics of benchmarks/alignment_gates.py (issue 10 item 3)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from alignment_gates import (  # noqa: E402
    align_share,
    finding_oracle_r5,
    finding_sets,
    gate_passes,
    lesion_floors,
    report_lesion_chance,
    same_findings_comparisons,
    same_findings_hits,
    same_findings_r5,
)

SETS = [frozenset({("liver_lesion", "liver", None)}), frozenset(), frozenset({("lung_nodule", "lung_left", "left")})]


def test_finding_oracle_is_perfect_when_every_study_differs_and_chance_when_none_does():
    distinct = [frozenset({(f"type{i}", None, None)}) for i in range(20)]
    assert finding_oracle_r5(distinct, seed=0) == 1.0
    same = [frozenset()] * 40  # every study normal: only random tie-breaks remain
    assert finding_oracle_r5(same, seed=0, draws=200) == pytest.approx(5 / 40, abs=0.02)


def test_same_findings_r5_and_its_chance():
    sets = SETS * 10  # 30 studies, 10 of each finding set
    u = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert same_findings_r5(u @ u.T, sets)["same_findings_r5"] == 1.0  # the own report ranks first
    chance = 1 - math.comb(20, 5) / math.comb(30, 5)
    t = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    got = same_findings_r5(u @ t.T, sets)
    assert got["same_findings_r5_chance"] == pytest.approx(chance)
    # random rankings average to that chance
    rng = np.random.default_rng(0)
    hits = [any(sets[j] == sets[0] for j in rng.permutation(30)[:5]) for _ in range(4000)]
    assert np.mean(hits) == pytest.approx(chance, abs=0.03)
    hit, per_image = same_findings_hits(u @ t.T, sets)
    assert hit.mean() == got["same_findings_r5"] and set(hit) <= {0.0, 1.0}
    assert per_image.mean() == pytest.approx(chance)
    # Fewer than 5 held-out studies: every report is in the top k, a hit and chance alike.
    assert same_findings_r5(u[:3] @ t[:3].T, sets[:3]) == {"same_findings_r5": 1.0, "same_findings_r5_chance": 1.0}


def test_finding_sets_read_the_ground_truth_and_name_missing_studies(tmp_path):
    path = tmp_path / "ground_truth.jsonl"
    rows = [
        {"id": "a", "findings": [{"type": "liver_lesion", "organ": "liver", "side": None}]},
        {"id": "b", "findings": []},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert finding_sets(path, ["b", "a"]) == [frozenset(), SETS[0]]
    with pytest.raises(ValueError, match="ground_truth.jsonl.*c"):
        finding_sets(path, ["a", "c"])


def test_gates_pass_and_fail_on_their_thresholds():
    assert align_share({"align": math.log(8), "target_entropy": 0.0}, 8)["align_share"] == pytest.approx(0.0)
    ok = {"align_share": 0.5, "retrieval_r5_ci_low": 0.05, "retrieval_chance": 0.03, "heldout_study_cos": 0.5}
    assert gate_passes(ok | {"text_diag_ci_low": 0.001}) == {
        "align_share": True,
        "retrieval_above_chance": True,
        "heldout_study_cos": True,
        "text_diagnostic": True,
    }
    bad = {"align_share": 0.29, "retrieval_r5_ci_low": 0.03, "retrieval_chance": 0.03, "heldout_study_cos": 0.9}
    assert gate_passes(bad) == {
        "align_share": False,
        "retrieval_above_chance": False,
        "heldout_study_cos": False,
        "text_diagnostic": None,
    }


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory):
    """Eight synthetic studies with reports and label maps, cached as the tiny test checkpoints preprocess them."""
    from cls_helpers import synth_dataset, write_checkpoint
    from t3d.evaluate.joint import load_joint
    from t3d.evaluate.studies import prepare_cache

    root = tmp_path_factory.mktemp("gates")
    data = synth_dataset(root / "data", num_studies=8)
    run = write_checkpoint(root / "run", "t3d")
    prepare_cache(data / "pretrain.jsonl", root / "cache", load_joint(run, device=torch.device("cpu")).cfg.preprocess)
    return data, root / "cache"


def test_a_sentence_run_is_measured_by_its_sentences_best_tiles(tmp_path, synth_cache):
    from types import SimpleNamespace

    from alignment_gates import measure
    from cls_helpers import write_checkpoint
    from t3d.evaluate.studies import cached_ids

    data, cache = synth_cache
    run = write_checkpoint(tmp_path / "run", "t3d-sentence")
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "align": 1.5, "target_entropy": 0.0}) + "\n")
    truth = data / "ground_truth.jsonl"
    args = SimpleNamespace(window=1, max_crops=4, n_boot=20, seed=0, repeats=1, ground_truth=str(truth))
    out = measure(run, cache, cached_ids(cache, None), args)
    ids = cached_ids(cache, None)  # the pre-training studies of the manifest
    assert out["scores"] == "sentence" and out["n_heldout"] == len(ids) > 2 and out["method"] == "t3d-sentence"
    assert 0 <= out["retrieval_r5"] <= 1 and out["retrieval_chance"] == pytest.approx(min(1.0, 5 / len(ids)))
    assert -1 <= out["heldout_study_cos"] <= 1 and "same_findings_r5" in out and "text_diag_diff" in out
    assert len(out["same_findings_hits"]) == len(ids)
    excess = out["same_findings_r5"] - out["same_findings_r5_chance"]
    assert out["same_findings_excess"] == pytest.approx(excess)
    assert out["same_findings_excess_ci_low"] <= excess <= out["same_findings_excess_ci_high"]


def test_lesion_floors_restore_a_lesion_as_itself_or_as_its_host():
    target = torch.full((2, 8, 8, 8), 0.2)
    lesion = torch.zeros(8, 8, 8, dtype=torch.bool)
    lesion[2:4, 2:4, 2:4] = True  # one 8-voxel lesion, 0.6 brighter than its organ
    lesion[6, 6, 6] = True  # a second one, never hidden
    target[:, lesion] = 0.8
    target[0, 2, 2, 2] = 1.0  # texture in channel 0
    hidden = torch.zeros(8, 8, 8, dtype=torch.bool)
    hidden[:3] = True  # hides half of the first lesion and none of the second
    out = lesion_floors(target, hidden, lesion)
    assert out["voxels"] == out["host_fill_voxels"] == 4
    own = 0.8 + 0.2 / 8  # channel 0's component mean; channel 1's is 0.8, so channel 1 costs nothing
    expected_oracle = (abs(1.0 - own) / 2 + 3 * abs(0.8 - own) / 2) / 4  # hidden: (2, 2, 2) and three at 0.8
    assert out["oracle"] / out["voxels"] == pytest.approx(expected_oracle, rel=1e-5)
    assert out["host_fill"] / out["host_fill_voxels"] == pytest.approx(((0.8 + 0.6) / 2 + 3 * 0.6) / 4, rel=1e-5)
    assert not out["whole"].any()  # half of the first lesion is visible
    assert lesion_floors(target, ~lesion, lesion)["voxels"] == 0  # nothing of a lesion hidden: nothing counted
    whole = lesion_floors(target, lesion, lesion)["whole"]
    assert torch.equal(whole, lesion)  # every lesion hidden entirely


def test_report_lesion_chance_is_lesion_over_host_voxels_of_the_named_organ(tmp_path):
    from test_crops import write_cache

    labels = {"a": np.zeros((10, 10, 10), np.uint8), "b": np.zeros((10, 10, 10), np.uint8)}
    labels["a"][:4, :5, :5] = 1  # 100 liver voxels
    labels["a"][9, 9, :4] = 9  # its 4 lesion voxels (not liver-labelled)
    labels["b"][:6, :10, :1] = 1  # 60 liver voxels
    labels["b"][5:9, :10, 5] = 3  # 40 left-kidney voxels
    write_cache(tmp_path / "cache", {k: np.zeros(v.shape, np.int16) for k, v in labels.items()}, labels)
    truth = tmp_path / "ground_truth.jsonl"
    rows = [
        {
            "id": "a",
            "findings": [
                {"type": "liver_lesion", "organ": "liver", "voxels": 4},
                {"type": "hepatic_steatosis", "organ": "liver", "voxels": 100},
            ],
        },
        {
            "id": "b",
            "findings": [
                {"type": "liver_lesion", "organ": "liver", "voxels": 2},
                {"type": "liver_lesion", "organ": "liver", "voxels": 6},
                {"type": "renal_cyst", "organ": "kidney_left", "voxels": 10},
                {"type": "pleural_effusion", "organ": "pleura", "voxels": 50},
            ],
        },
    ]
    truth.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = report_lesion_chance(truth, tmp_path / "cache", ["a", "b"])
    assert set(out) == {"liver_lesion", "renal_cyst"}  # steatosis is no lesion, the pleura no labelled organ
    assert out["liver_lesion"]["studies"] == 2 and out["liver_lesion"]["max"] == pytest.approx(8 / 68)
    assert out["liver_lesion"]["median"] == pytest.approx((4 / 104 + 8 / 68) / 2)
    assert out["renal_cyst"] == {"median": 0.2, "p90": 0.2, "max": 0.2, "studies": 1}
    with pytest.raises(ValueError, match="study c is missing"):
        report_lesion_chance(truth, tmp_path / "cache", ["a", "c"])


def test_text_diagnostic_sees_whether_the_report_moves_the_restoration(tmp_path, synth_cache):
    from alignment_gates import text_diagnostic
    from cls_helpers import write_checkpoint
    from t3d.evaluate.joint import load_joint
    from t3d.evaluate.studies import cached_ids, report_texts

    _, cache = synth_cache
    jm = load_joint(write_checkpoint(tmp_path / "run", "t3d"), device=torch.device("cpu"))
    ids, texts = report_texts(cache, jm.cfg.text.sections, cached_ids(cache, None))
    untrained = text_diagnostic(jm, cache, ids, texts, repeats=1, seed=0)  # FiLM starts at identity
    why = untrained["why"]
    assert why["output_change_all_voxels"] == 0
    np.testing.assert_array_equal(untrained["true"], untrained["shuffled"])  # NaN: no lesion voxel hidden
    assert 0 < why["lesion_share"] < 1 and why["by_finding"]
    assert 0 <= why["oracle_l1"] < why["host_fill_l1"]  # a lesion's own mean restores it better than its organ
    torch.manual_seed(0)
    for film in jm.model.decoder.films:
        torch.nn.init.normal_(film.linear.weight, std=0.5)
    moved = text_diagnostic(jm, cache, ids, texts, repeats=1, seed=0)
    assert moved["why"]["output_change_all_voxels"] > 0 and moved["why"]["output_change"] > 0
    assert moved["true"][0] != moved["shuffled"][0]
    for finding, v in moved["why"]["by_finding"].items():
        assert v["voxels"] == why["by_finding"][finding]["voxels"]  # the same crops and masks in both runs
    rows = np.asarray(moved["true"])  # all hidden, hidden lesion, focal lesions hidden entirely, partly
    assert rows.shape == (4, len(ids)) and np.isfinite(rows[0]).all()
    focal = np.isfinite(rows[2]) | np.isfinite(rows[3])
    assert focal.any() and not (focal & ~np.isfinite(rows[1])).any()  # focal lesion voxels are lesion voxels


def test_same_findings_comparisons_pair_runs_on_the_same_studies():
    hits = np.zeros(60, dtype=int)
    hits[:30] = 1
    runs = {"a": {"same_findings_hits": hits.tolist()}, "b": {"same_findings_hits": [0] * 60}, "c": {}}
    (only,) = same_findings_comparisons(runs, n_boot=200, seed=0)  # "c" has no hits: left out
    assert (only["a"], only["b"], only["diff"]) == ("a", "b", 0.5) and 0.3 < only["ci_low"] < 0.5 < only["ci_high"]
    tied = same_findings_comparisons({"a": runs["a"], "b": runs["a"]}, n_boot=200, seed=0)[0]
    assert tied["diff"] == tied["ci_low"] == tied["ci_high"] == 0  # the same studies, paired: no spread at all
