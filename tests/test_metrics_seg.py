import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from t3d.metrics import (
    dice_per_class,
    equivalent_diameter_mm,
    hd95_per_class,
    small_lesion_scores,
    summarise_lesions,
)


def reference_hd(a, b, spacing, percentile):
    """Naive symmetric percentile Hausdorff distance: surfaces by one erosion, all pairwise distances in mm."""

    def surface(mask):
        return np.argwhere(mask ^ ndimage.binary_erosion(mask)) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = cdist(sa, sb)
    return max(np.percentile(d.min(axis=1), percentile), np.percentile(d.min(axis=0), percentile))


def test_dice_matches_hand_computed_cubes():
    pred, target = np.zeros((12, 12, 12), int), np.zeros((12, 12, 12), int)
    pred[2:6, 2:6, 2:6] = 1
    target[4:8, 2:6, 2:6] = 1  # shifted by 2 voxels: overlap 2*4*4 = 32 of 64 + 64
    target[9:11, 9:11, 9:11] = 2  # class 2 only in the ground truth: Dice 0
    np.testing.assert_allclose(dice_per_class(pred, target, 3), [0.5, 0.0], atol=1e-6)
    target[target == 2] = 0  # class 2 absent everywhere: NaN (left out of means), not 1
    d = dice_per_class(pred, target, 3)
    assert d[0] == pytest.approx(0.5) and math.isnan(d[1])


def test_hd_of_shifted_cubes_in_mm():
    a, b = np.zeros((16, 14, 12), bool), np.zeros((16, 14, 12), bool)
    a[3:8, 4:9, 3:8] = True
    b[6:11, 4:9, 3:8] = True  # 3 voxels along x at 2 mm: every surface point moves 6 mm at most
    hd100 = hd95_per_class(a.astype(int), b.astype(int), 2, spacing=(2.0, 1.0, 1.0), percentile=100)
    assert hd100[0] == pytest.approx(6.0)


def test_hd95_matches_a_naive_reference_on_anisotropic_shapes():
    grid = np.indices((20, 18, 14))
    ball = ((grid - np.array([9, 8, 6])[:, None, None, None]) ** 2 * np.array([1, 1, 4])[:, None, None, None]).sum(0)
    pred = (ball <= 30).astype(int)
    target = np.zeros_like(pred)
    target[5:14, 4:11, 4:9] = 1
    spacing = (0.8, 0.8, 2.5)
    expected = reference_hd(pred == 1, target == 1, spacing, 95)
    assert hd95_per_class(pred, target, 2, spacing)[0] == pytest.approx(expected, rel=1e-5)


def test_hd95_is_nan_when_the_prediction_misses_the_class():
    target = np.zeros((10, 10, 10), int)
    target[2:5, 2:5, 2:5] = 1
    assert math.isnan(hd95_per_class(np.zeros_like(target), target, 2, (1, 1, 1))[0])


def test_small_lesion_dice_scores_each_small_component():
    target = np.zeros((40, 40, 20), int)
    target[2:24, 2:24, 2:18] = 2  # a large lesion (~ 30 mm): not small, not scored
    target[30:32, 30:32, 5:7] = 2  # 8 voxels of 1 mm: diameter 2.48 mm, found exactly
    target[30:33, 5:8, 12:15] = 2  # 27 voxels: missed
    pred = np.zeros_like(target)
    pred[30:32, 30:32, 5:7] = 2
    pred[2:10, 2:10, 2:10] = 2
    scores = small_lesion_scores(pred, target, [2], spacing=(1.0, 1.0, 1.0), max_diameter_mm=10.0)
    assert sorted((s.voxels, s.dice, s.detected) for s in scores) == [(8, 1.0, True), (27, 0.0, False)]
    assert min(s.diameter_mm for s in scores) == pytest.approx((6 * 8 / math.pi) ** (1 / 3))
    summary = summarise_lesions(scores)
    assert summary == {"small_lesion_dice": 0.5, "small_lesion_detection": 0.5, "small_lesions": 2}
    assert math.isnan(summarise_lesions([])["small_lesion_dice"])


def test_equivalent_diameter_uses_the_voxel_volume():
    # A 1000 mm^3 lesion has the diameter of a 1000 mm^3 sphere whatever the voxel shape.
    assert equivalent_diameter_mm(125, (2.0, 2.0, 2.0)) == pytest.approx(equivalent_diameter_mm(1000, (1, 1, 1)))
    assert equivalent_diameter_mm(1000, (1, 1, 1)) == pytest.approx(12.407, abs=1e-3)
