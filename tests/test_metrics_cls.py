"""Classification metrics of t3d.metrics: AUROC / F1 / accuracy against scikit-learn, threshold choice, bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from t3d.metrics import (
    accuracy_per_class,
    auroc,
    auroc_per_class,
    bootstrap_indices,
    classification_metrics,
    f1_per_class,
    f1_thresholds,
    percentile_interval,
    rarest_label_strata,
)


def _signal(n: int, num: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, num)) < 0.4).astype(float)
    return y, y * 0.8 + rng.normal(0, 0.6, size=y.shape)


def test_auroc_known_value_and_sklearn_reference():
    # Pairs (pos, neg): 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4 = 0.75.
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    y, s = _signal(50, 4)
    expected = [roc_auc_score(y[:, c], s[:, c]) for c in range(4)]
    np.testing.assert_allclose(auroc_per_class(y, s), expected)


def test_auroc_is_nan_for_a_single_label_value():
    assert np.isnan(auroc([0, 0, 0], [0.2, 0.5, 0.9]))
    assert np.isnan(auroc([1, 1], [0.2, 0.5]))


def test_f1_and_accuracy_match_sklearn():
    y, s = _signal(80, 3, seed=1)
    thr = np.array([0.2, 0.4, 0.6])
    pred = s >= thr
    np.testing.assert_allclose(f1_per_class(y, s, thr), [f1_score(y[:, c], pred[:, c]) for c in range(3)])
    np.testing.assert_allclose(accuracy_per_class(y, s, thr), [(pred[:, c] == y[:, c]).mean() for c in range(3)])
    y[:, 1] = 0
    assert np.isnan(f1_per_class(y, s, thr)[1])


def test_f1_threshold_is_the_best_observed_score():
    y = np.array([0, 0, 0, 1, 1, 1], dtype=float)[:, None]
    s = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])[:, None]
    # t=0.4: TP 3, FP 1 -> F1 6/7; t=0.6: 2/3; t=0.7: 0.8; t=0.9: 0.5.
    assert f1_thresholds(y, s)[0] == pytest.approx(0.4)
    y2, s2 = _signal(40, 2, seed=3)
    chosen = f1_thresholds(y2, s2)
    for c in range(2):
        best = max(f1_score(y2[:, c], s2[:, c] >= t) for t in np.unique(s2[:, c]))
        assert f1_score(y2[:, c], s2[:, c] >= chosen[c]) == pytest.approx(best)
    assert f1_thresholds(np.zeros((5, 1)), np.random.default_rng(0).random((5, 1)))[0] == 0.5


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    widths = []
    for n in (40, 640):
        y, s = _signal(n, 2, seed=n)
        result = classification_metrics(y, s, 0.4, ["a", "b"], n_boot=300, seed=0)
        macro = result["macro"]["auroc"]
        assert macro["low"] <= macro["value"] <= macro["high"]
        assert macro["value"] == pytest.approx(np.mean(auroc_per_class(y, s)))
        widths.append(macro["high"] - macro["low"])
    assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(16) in theory


def test_bootstrap_is_seeded():
    y, s = _signal(60, 2)
    a = classification_metrics(y, s, 0.4, ["a", "b"], n_boot=100, seed=7)
    b = classification_metrics(y, s, 0.4, ["a", "b"], n_boot=100, seed=7)
    c = classification_metrics(y, s, 0.4, ["a", "b"], n_boot=100, seed=8)
    assert a["macro"]["auroc"] == b["macro"]["auroc"]
    assert a["macro"]["auroc"]["low"] != c["macro"]["auroc"]["low"]


def test_degenerate_resamples_are_skipped_and_counted():
    y, s = _signal(30, 2, seed=4)
    y[:, 1] = 0
    y[5, 1] = 1  # one positive: absent from ~37 % of plain resamples
    result = classification_metrics(y, s, 0.5, ["common", "rare"], n_boot=400, seed=0)
    rare = result["per_class"]["rare"]["auroc"]
    assert 150 < rare["n_used"] < 400
    assert result["macro"]["auroc"]["n_used"] <= rare["n_used"]
    assert result["per_class"]["common"]["auroc"]["n_used"] == 400


def test_class_without_positives_is_nan_with_a_note_and_left_out_of_macro():
    y, s = _signal(40, 3, seed=5)
    y[:, 2] = 0
    result = classification_metrics(y, s, 0.4, ["a", "b", "never"], n_boot=50, seed=0)
    never = result["per_class"]["never"]
    assert np.isnan(never["auroc"]["value"]) and np.isnan(never["f1"]["value"])
    assert "no positives" in never["note"] and any("never" in n for n in result["notes"])
    assert result["scored_classes"] == ["a", "b"]
    assert result["macro"]["auroc"]["value"] == pytest.approx(np.mean(auroc_per_class(y, s)[:2]))
    assert not np.isnan(never["accuracy"]["value"])


def test_stratified_resampling_keeps_strata_sizes():
    y = np.array([[1, 0], [1, 1], [0, 0], [1, 0], [0, 1], [0, 0]], dtype=float)
    strata = rarest_label_strata(y)
    # class 1 (2 positives) is rarer than class 0 (3): rows 1 and 4 -> stratum 1; rows 0, 3 -> 0; others -1.
    np.testing.assert_array_equal(strata, [0, 1, -1, 0, 1, -1])
    idx = bootstrap_indices(len(y), 50, seed=0, strata=strata)
    for row in idx:
        np.testing.assert_array_equal(np.bincount(strata[row] + 1, minlength=3), np.bincount(strata + 1, minlength=3))
    y2, s2 = _signal(30, 2, seed=6)
    out = classification_metrics(y2, s2, 0.4, ["a", "b"], n_boot=100, seed=0, stratified=True)
    assert out["bootstrap"]["resampling"] == "stratified"
    assert out["macro"]["auroc"]["n_used"] == 100  # every resample keeps positives of both classes


def test_percentile_interval_of_undefined_metric_is_nan():
    iv = percentile_interval(float("nan"), np.full(10, np.nan))
    assert np.isnan(iv.low) and iv.n_used == 0 and iv.n_boot == 10


def test_vectorised_bootstrap_auroc_equals_sklearn():
    from t3d.metrics import auroc_replicates

    rng = np.random.default_rng(9)
    y = rng.random((20, 30)) < 0.3
    s = np.round(rng.random((20, 30)), 1)  # coarse scores: many ties
    y[3] = False  # a row with one label value -> NaN
    got = auroc_replicates(y, s)
    assert np.isnan(got[3])
    for b in [i for i in range(20) if i != 3]:
        assert got[b] == pytest.approx(roc_auc_score(y[b], s[b]))


def test_no_bootstrap_gives_point_estimates_only():
    y, s = _signal(30, 2)
    out = classification_metrics(y, s, 0.4, ["a", "b"], n_boot=0)
    assert np.isfinite(out["macro"]["auroc"]["value"]) and np.isnan(out["macro"]["auroc"]["low"])
