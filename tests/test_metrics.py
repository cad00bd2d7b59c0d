"""Metric definitions on hand-checked cases (ties included) and against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from odin_engine import metrics as M


def test_threshold_is_kth_largest_id_score():
    id_s = np.arange(1, 21, dtype=float)  # 1..20
    # 95% of 20 = 19 images must be kept: δ = 19th largest = 2
    assert M.threshold_at_tpr(id_s, 0.95) == 2.0
    assert M.threshold_at_tpr(id_s, 1.0) == 1.0
    assert M.threshold_at_tpr(id_s, 0.05) == 20.0
    # 0.95·100 = 95.000…01 in floating point must still mean 95 images
    assert M.threshold_at_tpr(np.arange(100, dtype=float), 0.95) == 5.0


def test_fpr_counts_ood_scores_that_reach_the_threshold():
    id_s = np.arange(1, 21, dtype=float)
    assert M.fpr_at_tpr(id_s, [2.0, 1.9, 3.0]) == pytest.approx(2 / 3)  # 2.0 reaches δ=2: counted
    assert M.fpr_at_tpr(id_s, [0.0, 1.0, 1.99]) == 0.0


def test_fpr_with_ties_at_the_threshold():
    id_s = np.full(20, 0.5)
    assert M.fpr_at_tpr(id_s, [0.5, 0.4]) == 0.5  # the tied OOD score counts as accepted
    assert M.fpr_at_tpr(id_s, [0.5, 0.5]) == 1.0


def test_fpr_matches_sklearn_roc_curve_and_brute_force():
    rng = np.random.default_rng(0)
    id_s = np.round(rng.normal(1.0, 1.0, 537), 2)  # rounding creates many ties
    ood_s = np.round(rng.normal(0.0, 1.0, 411), 2)
    y = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    expected = fpr[np.searchsorted(tpr, 0.95, side="left")]
    assert M.fpr_at_tpr(id_s, ood_s) == pytest.approx(expected)
    # brute force over every candidate threshold
    best = max(t for t in np.unique(id_s) if np.mean(id_s >= t) >= 0.95)
    assert M.fpr_at_tpr(id_s, ood_s) == pytest.approx(np.mean(ood_s >= best))


def test_detection_error_hand_case():
    # thresholds: 0 → .5·0+.5·1=.5; 1 → .5·0+.5·.5=.25; 2 → .25+.25=.5; 3 → .5+.25=.75; ∞ → .5
    assert M.detection_error([1.0, 2.0], [0.0, 3.0]) == pytest.approx(0.25)
    assert M.detection_error([1.0, 2.0], [0.0, 0.5]) == 0.0
    assert M.detection_error([1.0], [1.0]) == 0.5


def test_auroc_ties_count_half():
    assert M.auroc([1.0], [1.0]) == 0.5
    assert M.auroc([2.0, 1.0], [1.0, 0.0]) == pytest.approx(3.5 / 4)


def test_aupr_in_and_out():
    assert M.aupr_in([3.0, 2.0], [1.0]) == 1.0
    assert M.aupr_out([3.0], [1.0, 2.0]) == 1.0
    # ranking by score: id 3, ood 2, id 1 → AP_in = .5·1 + .5·(2/3)
    assert M.aupr_in([1.0, 3.0], [2.0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # OOD positive, ranking by −score: id(1), ood(2), id(3) → AP_out = 1·(1/2)
    assert M.aupr_out([1.0, 3.0], [2.0]) == pytest.approx(0.5)


def test_all_metrics_and_input_checks():
    out = M.all_metrics([3.0, 4.0], [1.0, 2.0])
    assert out == {"fpr_at_tpr": 0.0, "detection_error": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0}
    with pytest.raises(ValueError, match="non-empty"):
        M.fpr_at_tpr([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        M.auroc([np.nan], [1.0])
    with pytest.raises(ValueError, match="tpr"):
        M.threshold_at_tpr([1.0], 0.0)
