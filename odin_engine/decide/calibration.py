"""Calibrate the outlier threshold δ on held-out in-distribution scores.

δ is the **largest threshold that keeps at least the target TPR** of the held-out
in-distribution (ID) images at or above it (``score >= δ``): the ``k``-th largest held-out
score with ``k = ceil(tpr · n)`` (:func:`odin_engine.metrics.threshold_at_tpr`).

How well does δ do on *new* ID images?
--------------------------------------
For continuous scores drawn i.i.d. from the ID distribution ``F``, the share of new ID
images that reach δ, ``C = 1 − F(δ)``, is a random variable (δ depends on the held-out
sample). δ is the ``(n − k + 1)``-th smallest of ``n`` draws, so ``F(δ) ~ Beta(n − k + 1, k)``
and therefore **C ~ Beta(k, n − k + 1)** exactly, whatever ``F`` is (the classical
order-statistic / tolerance-interval result; it is the same Beta family as the
Clopper–Pearson interval). We report its mean ``k / (n + 1)`` and the central 95% interval
``[Beta.ppf(0.025; k, n−k+1), Beta.ppf(0.975; k, n−k+1)]``. Ties in the scores (e.g. many
saturated MSP values) can only make the real TPR larger.

How many held-out images are needed?
------------------------------------
The threshold sits in the lower ``1 − tpr`` tail of the held-out scores; only
``n·(1 − tpr)`` images lie below it. With fewer than 5 of them the tail quantile is set by a
handful of points and the interval above is wide (for n = 20 at 95%, the single image below
δ gives C ∈ [0.75, 0.99]). We require ``n·(1 − tpr) ≥ 5`` — the usual rule for a binomial
count to be informative — i.e. **n ≥ ⌈5 / (1 − tpr)⌉**: 100 for 95%, 50 for 90%, 500 for 99%.
At n = 100 and 95% the interval is about [0.89, 0.98]; at n = 1,000 about [0.93, 0.96].
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy.stats import beta

from odin_engine.errors import ConfigError
from odin_engine.io.scores import check_same_settings, ok_rows, settings_of
from odin_engine.metrics import threshold_at_tpr
from odin_engine.settings import validate_method, validate_tpr  # noqa: F401

MIN_BELOW_THRESHOLD = 5
CALIBRATION_VERSION = 1


def min_heldout(tpr: float) -> int:
    """Smallest held-out size with at least 5 expected images below δ: ``ceil(5 / (1 − tpr))``."""
    t = validate_tpr(tpr)
    return int(math.ceil(round(MIN_BELOW_THRESHOLD / (1.0 - t), 6)))


def tpr_interval(n: int, k: int, confidence: float = 0.95) -> tuple[float, float]:
    """Central ``confidence`` interval of ``C ~ Beta(k, n − k + 1)``, the TPR δ achieves on new ID data."""
    a = (1.0 - confidence) / 2.0
    return float(beta.ppf(a, k, n - k + 1)), float(beta.ppf(1.0 - a, k, n - k + 1))


def calibrate(heldout_scores, tpr: float = 0.95, confidence: float = 0.95) -> dict[str, Any]:
    """δ and its statistics from an array of held-out ID scores (higher = more in-distribution)."""
    tpr = validate_tpr(tpr)
    s = np.asarray(heldout_scores, dtype=np.float64).ravel()
    need = min_heldout(tpr)
    if s.size < need:
        raise ConfigError(
            f"{s.size} held-out in-distribution scores are too few for a {tpr:g} TPR target: "
            f"need at least {need} (= ceil(5 / (1 - tpr)), so that at least 5 held-out images fall below δ)"
        )
    if not np.isfinite(s).all():
        raise ConfigError("held-out scores contain NaN or infinite values")
    delta = threshold_at_tpr(s, tpr)
    n = int(s.size)
    k = int(np.ceil(tpr * n - 1e-9))
    lo, hi = tpr_interval(n, k, confidence)
    return {
        "delta": float(delta),
        "target_tpr": tpr,
        "achieved_tpr": float(np.mean(s >= delta)),
        "n_heldout": n,
        "min_heldout": need,
        "order_statistic_k": k,
        "expected_tpr_new_data": k / (n + 1),
        "tpr_ci": [lo, hi],
        "tpr_ci_confidence": confidence,
        "tpr_ci_method": "order statistic: TPR on new ID data ~ Beta(k, n-k+1), central interval",
    }


def calibrate_frames(
    corpus: pd.DataFrame, heldout: pd.DataFrame, tpr: float = 0.95, method: str = "odin",
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Check the settings match, then :func:`calibrate` on the held-out ``method`` column.

    Held-out rows with ``status='error'`` are left out of δ and counted in ``n_heldout_errors``.
    """
    method = validate_method(method)
    tpr = validate_tpr(tpr)
    for what, df in (("corpus", corpus), ("held-out", heldout)):
        if method not in df.columns:
            raise ConfigError(f"the {what} scores have no {method!r} column")
    h_set = settings_of(heldout, method, "held-out")
    # a corpus whose every image failed to decode has no scores to compare: its rows stay errors
    c_set = settings_of(corpus, method, "corpus") if not ok_rows(corpus).empty else h_set
    check_same_settings(c_set, h_set)
    h_ok = ok_rows(heldout)
    result = calibrate(h_ok[method].to_numpy(), tpr, confidence)
    return {
        "version": CALIBRATION_VERSION,
        **result,
        "method": method,
        "model_id": c_set["model_id"],
        "temperature": c_set["temperature"],
        "epsilon": c_set["epsilon"],
        "n_heldout_errors": int((heldout["status"] != "ok").sum()),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | Path, obj: Mapping[str, Any]) -> Path:
    """Write JSON atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(p)
    return p


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
