"""Exact OOD-detection metrics. Convention throughout: **in-distribution is the positive
class** and a **higher score means more in-distribution** (the ODIN paper's convention).

No threshold grid: thresholds are the observed scores themselves, and "reaches the
threshold" always means ``score >= δ``.
"""

from __future__ import annotations

import numpy as np

# scikit-learn (~1 s to import) loads on first use: `calibrate` and `audit` need only threshold_at_tpr


def _arrays(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    id_s = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_s = np.asarray(ood_scores, dtype=np.float64).ravel()
    if id_s.size == 0 or ood_s.size == 0:
        raise ValueError("both id_scores and ood_scores must be non-empty")
    if not (np.isfinite(id_s).all() and np.isfinite(ood_s).all()):
        raise ValueError("scores must be finite")
    return id_s, ood_s


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """δ = the largest threshold with ``mean(id_scores >= δ) >= tpr``.

    That is the ``k``-th largest in-distribution score, ``k = ceil(tpr · n)``.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1]; got {tpr}")
    s = np.sort(np.asarray(id_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("id_scores must be non-empty")
    k = int(np.ceil(tpr * s.size - 1e-9))
    return float(s[max(k, 1) - 1])


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """FPR at ``tpr`` TPR, the ODIN paper's definition (in-distribution positive):

    ``FPR = mean(ood_scores >= δ)`` with ``δ = threshold_at_tpr(id_scores, tpr)``, the
    largest threshold that keeps at least ``tpr`` of in-distribution images. (Some
    libraries treat OOD as positive and report a different number under the same name.)
    """
    id_s, ood_s = _arrays(id_scores, ood_scores)
    return float(np.mean(ood_s >= threshold_at_tpr(id_s, tpr)))


def detection_error(id_scores, ood_scores) -> float:
    """``min_δ 0.5·(1 − TPR(δ)) + 0.5·FPR(δ)`` over every threshold, with TPR/FPR at ``score >= δ``
    (equal priors, as in the ODIN paper)."""
    id_s, ood_s = _arrays(id_scores, ood_scores)
    thresholds = np.unique(np.concatenate([id_s, ood_s, [np.inf]]))
    id_sorted, ood_sorted = np.sort(id_s), np.sort(ood_s)
    tpr = 1.0 - np.searchsorted(id_sorted, thresholds, side="left") / id_s.size
    fpr = 1.0 - np.searchsorted(ood_sorted, thresholds, side="left") / ood_s.size
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


def _labels_scores(id_s: np.ndarray, ood_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[np.ones(id_s.size), np.zeros(ood_s.size)], np.r_[id_s, ood_s]


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve, in-distribution positive (ties count one half)."""
    y, s = _labels_scores(*_arrays(id_scores, ood_scores))
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with in-distribution as the positive class, score as is."""
    y, s = _labels_scores(*_arrays(id_scores, ood_scores))
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s))


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class, ranked by ``−score``."""
    y, s = _labels_scores(*_arrays(id_scores, ood_scores))
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(1 - y, -s))


def all_metrics(id_scores, ood_scores, tpr: float = 0.95) -> dict[str, float]:
    """``fpr_at_tpr``, ``detection_error``, ``auroc``, ``aupr_in``, ``aupr_out`` in one dict."""
    return {
        "fpr_at_tpr": fpr_at_tpr(id_scores, ood_scores, tpr),
        "detection_error": detection_error(id_scores, ood_scores),
        "auroc": auroc(id_scores, ood_scores),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
    }
