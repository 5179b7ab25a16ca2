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


def test_a_sentence_run_is_measured_by_its_sentences_best_tiles(tmp_path):
    from types import SimpleNamespace

    from alignment_gates import measure
    from cls_helpers import synth_dataset, write_checkpoint
    from t3d.evaluate.joint import load_joint
    from t3d.evaluate.studies import cached_ids, prepare_cache

    data = synth_dataset(tmp_path / "data", num_studies=8)
    run = write_checkpoint(tmp_path / "run", "t3d-sentence")
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "align": 1.5, "target_entropy": 0.0}) + "\n")
    cache = tmp_path / "cache"
    prepare_cache(data / "pretrain.jsonl", cache, load_joint(run, device=torch.device("cpu")).cfg.preprocess)
    truth = data / "ground_truth.jsonl"
    args = SimpleNamespace(window=1, max_crops=4, n_boot=20, seed=0, repeats=1, ground_truth=str(truth))
    out = measure(run, cache, cached_ids(cache, None), args)
    ids = cached_ids(cache, None)  # the pre-training studies of the manifest
    assert out["scores"] == "sentence" and out["n_heldout"] == len(ids) > 2 and out["method"] == "t3d-sentence"
    assert 0 <= out["retrieval_r5"] <= 1 and out["retrieval_chance"] == pytest.approx(min(1.0, 5 / len(ids)))
    assert -1 <= out["heldout_study_cos"] <= 1 and "same_findings_r5" in out and "text_diag_diff" in out
