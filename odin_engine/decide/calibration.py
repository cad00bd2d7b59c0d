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
count to be informative — i.e. **n ≥ ⌈5 / (1 − tpr)⌉**: 100 for 95%, 50 for 90%, 500 for 99%
(:func:`odin_engine.settings.check_heldout_size`, the one home of that rule and its message).
At n = 100 and 95% the interval is about [0.89, 0.98]; at n = 1,000 about [0.93, 0.96].
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from odin_engine.errors import ConfigError
from odin_engine.io.scores import OK, NOT_OK, ScoreTable, check_same_settings
from odin_engine.settings import CalibrationSettings, check_heldout_size, min_heldout  # noqa: F401 (re-exported)

CALIBRATION_VERSION = 1
HELDOUT_SCORES = "heldout_scores_sorted"  # calibration.json's sorted held-out scores (conformal p-values)


def heldout_p_values(calibration: dict[str, Any], conditional: float | None = None):
    """:class:`~odin_engine.decide.conformal.ConformalPValues` from a calibration's sorted held-out
    scores; None for a calibration written before they were kept."""
    from odin_engine.decide.conformal import ConformalPValues

    scores = calibration.get(HELDOUT_SCORES)
    if not scores:
        return None
    return ConformalPValues.from_scores(scores, conditional)


def tpr_interval(n: int, k: int, confidence: float = 0.95) -> tuple[float, float]:
    """Central ``confidence`` interval of ``C ~ Beta(k, n − k + 1)``, the TPR δ achieves on new ID data.

    The quantiles are ``betaincinv(k, n − k + 1, q)``, the function ``scipy.stats.beta.ppf`` calls:
    ``scipy.special`` loads in ~0.17 CPU-s, ``scipy.stats`` in ~0.55 (half of a small ``calibrate``).
    """
    from scipy.special import betaincinv  # scipy and scikit-learn load on use: the command starts faster

    a = (1.0 - confidence) / 2.0
    return float(betaincinv(k, n - k + 1, a)), float(betaincinv(k, n - k + 1, 1.0 - a))


def calibrate(heldout_scores, settings: CalibrationSettings | float = CalibrationSettings()) -> dict[str, Any]:
    """δ and its statistics from an array of held-out ID scores (higher = more in-distribution).

    ``settings``: a :class:`CalibrationSettings` (or just the target TPR).
    """
    from odin_engine.metrics import threshold_at_tpr

    if not isinstance(settings, CalibrationSettings):
        settings = CalibrationSettings(tpr=settings)
    tpr = settings.tpr
    s = np.asarray(heldout_scores, dtype=np.float64).ravel()
    settings.check_heldout_size(int(s.size))
    if not np.isfinite(s).all():
        raise ConfigError("held-out scores contain NaN or infinite values")
    delta = threshold_at_tpr(s, tpr)
    n = int(s.size)
    k = int(np.ceil(tpr * n - 1e-9))
    lo, hi = tpr_interval(n, k, settings.confidence)
    return {
        "delta": float(delta),
        "target_tpr": tpr,
        "achieved_tpr": float(np.mean(s >= delta)),
        "n_heldout": n,
        "min_heldout": settings.min_heldout,
        "order_statistic_k": k,
        "expected_tpr_new_data": k / (n + 1),
        "tpr_ci": [lo, hi],
        "tpr_ci_confidence": settings.confidence,
        "tpr_ci_method": "order statistic: TPR on new ID data ~ Beta(k, n-k+1), central interval",
        # the whole held-out distribution, sorted (8 bytes an image in memory): exact conformal p-values
        # for this audit and for every later one that reuses this calibration (a frozen --calibration)
        HELDOUT_SCORES: np.sort(s).tolist(),
    }


HELDOUT_QUANTILES = 200  # calibration.json keeps the held-out scores' 0, 0.5, 1, …, 100 % quantiles


def heldout_quantiles(scores: np.ndarray, n: int = HELDOUT_QUANTILES) -> list[float]:
    """The ``i/n`` quantiles (i = 0 … n) of the held-out scores: min, …, max, for display (not for δ)."""
    s = np.asarray(scores, np.float64)
    return np.quantile(s, np.linspace(0.0, 1.0, n + 1)).tolist() if s.size else []


def heldout_scores(heldout: ScoreTable, method: str) -> tuple[np.ndarray, int]:
    """The ok held-out ``method`` scores (only that column and ``status`` are read) and the error count."""
    heldout.require([method], "held-out scores")
    ok = heldout.read([method], OK).column(method)
    if ok.null_count:
        from odin_engine.methods import REGISTRY

        m = REGISTRY.get(method)
        why = (f"it is computed only on request (its own extra forward): score with --fit FIT --methods "
               f"default,{method}" if m and m.on_request
               else "it needs fitted reference statistics: score with --fit FIT (`odin-audit fit`)" if m and m.needs_fit
               else "it needs the model's classifier head (see --head)" if m and m.needs_features
               else "those rows were scored without it")
        raise ConfigError(f"{ok.null_count} of {len(ok)} ok held-out rows have no {method} score: {why}")
    return ok.to_numpy(zero_copy_only=False).astype(np.float64), heldout.count(NOT_OK)


def heldout_errors(heldout: ScoreTable, limit: int = 3) -> tuple[int, list[tuple[str, str]]]:
    """How many held-out rows failed to score, and the first ``limit`` ``(image_id, error)`` of them."""
    n = heldout.count(NOT_OK)
    examples: list[tuple[str, str]] = []
    if n:
        cols = ["image_id"] + (["error"] if "error" in heldout.columns else [])
        for batch in heldout.batches(cols, NOT_OK):
            d = batch.to_pydict()
            for i, image_id in enumerate(d["image_id"]):
                examples.append((str(image_id), str((d.get("error") or [None] * (i + 1))[i] or "")))
            if len(examples) >= limit:
                break
    return n, examples[:limit]


def check_same_fit(corpus: ScoreTable, heldout: ScoreTable, method: str) -> str | None:
    """For a method fitted on reference images (``needs_fit``: knn, vim, …), refuse corpus and
    held-out scores made with different ``--fit`` files — a score is a distance to *that* fit's
    statistics, so δ from another fit means nothing. Returns the fit's digest (``None`` for a
    method without a fit, or tables whose metadata does not record it)."""
    from odin_engine.methods import REGISTRY

    if method not in REGISTRY or not REGISTRY[method].needs_fit:
        return None
    c, h = corpus.fit_id(), heldout.fit_id()
    if c and h and c != h:
        raise ConfigError(
            f"the corpus and held-out {method} scores were made with different --fit files (fit digest "
            f"{c} vs {h}): score both sets with the same --fit")
    return c or h


def calibrate_tables(corpus: ScoreTable, heldout: ScoreTable,
                     settings: CalibrationSettings = CalibrationSettings()) -> dict[str, Any]:
    """Check both tables (one model/T/ε each and the same for both; each ``image_id`` once), then
    :func:`calibrate` on the held-out ``settings.method`` column.

    Held-out rows with ``status='error'`` are left out of δ and counted in ``n_heldout_errors``.
    Reads the corpus's settings and ``image_id`` columns only; the held-out method column.
    """
    method = settings.method
    corpus.require([method], "corpus scores")
    h_set = heldout.settings("held-out scores")
    if h_set is None:
        raise ConfigError("the held-out scores have no row with status 'ok'")
    # a corpus whose every image failed to decode has no scores to compare: its rows stay errors
    c_set = corpus.settings("corpus scores") or h_set
    check_same_settings(c_set, h_set)
    fit_id = check_same_fit(corpus, heldout, method)
    heldout.check_unique_ids("held-out scores")
    corpus.check_unique_ids("corpus scores")
    scores, n_errors = heldout_scores(heldout, method)
    result = calibrate(scores, settings)
    return {
        "version": CALIBRATION_VERSION,
        **result,
        "method": method,
        "model_id": c_set["model_id"],
        "temperature": c_set["temperature"],
        "epsilon": c_set["epsilon"],
        "n_heldout_errors": n_errors,
        "fit_id": fit_id,  # the --fit a fitted method's scores depend on (None: no fitted method)
        # the held-out distribution in HELDOUT_QUANTILES + 1 points: a later audit that reuses this
        # file (a frozen --calibration) scores no held-out set and draws its histogram from these
        "heldout_quantiles": heldout_quantiles(scores),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
