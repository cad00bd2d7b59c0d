"""Drift test: does tonight's corpus flag more images than the frozen calibration predicts?

The law of a night's flag count
-------------------------------
δ is frozen: the ``k``-th largest of ``n`` held-out in-distribution (ID) scores, ``k = ceil(tpr·n)``
(:mod:`odin_engine.decide.calibration`). The share of new ID images that δ keeps,
``C = P(score ≥ δ | δ)``, is itself random — δ came from a finite sample — and for continuous
i.i.d. scores **C ~ Beta(k, n − k + 1)** exactly, whatever the score distribution. A night of
``m`` ok ID images flags ``X`` of them (``score < δ``), and given δ they are ``m`` independent
draws, so ``X | C ~ Binomial(m, 1 − C)``. Integrating over ``C``:

    X ~ BetaBinomial(m, a = n − k + 1, b = k)

The p-value for "this night flags more than the calibration predicts" is
``P(X ≥ x_obs) = betabinom.sf(x_obs − 1, m, a, b)``; the night raises an alarm at level α when
``p < α``. The expected flag rate is ``E[1 − C] = (n − k + 1)/(n + 1)``; its central interval is
that of ``1 − C ~ Beta(n − k + 1, k)`` (the rate δ gives on ID data, the calibration's TPR interval
turned around), and the night's own predictive interval — where ``X/m`` falls on an ID night — is
the central interval of the Beta-binomial (wider: it adds the night's binomial noise).

Why not a plain binomial test against ``1 − tpr``
-------------------------------------------------
``binom.sf(x − 1, m, 1 − tpr)`` treats the rate δ gives as known. It is not: with ``n = 100``
held-out images at 95% TPR the rate δ actually gives on ID data has a 95% interval of about
[0.02, 0.11], while the binomial noise of a night of ``m = 1,000`` images is ±0.014. Every
calibration whose δ landed a little high then alarms on most ID nights: the plain test's
false-alarm rate is far above α when ``n`` is small or ``m`` large (``python -m
benchmarks.drift_false_alarms`` prints it: 0.33 instead of 0.01 at n = 100, m = 1,000). The
Beta-binomial p-value integrates δ's sampling error and holds its level for every ``n`` and ``m``
(``tests/test_drift.py`` checks both by simulation).

What it assumes, and what it does not promise
---------------------------------------------
* ID scores are i.i.d. draws from one distribution, held-out and nightly alike (the held-out set
  is representative of what "no drift" looks like), and images within a night are independent.
* Continuous scores. With ties (discrete or saturated scores) flagging ``score < δ`` can only flag
  fewer ID images than the continuous law says (``F(δ⁻) ≤ F(δ)``), so ``X`` is stochastically
  smaller and the p-value conservative: the false-alarm rate stays ≤ α. ``X`` is a count, so even
  for continuous scores the attained level is the largest Beta-binomial tail ≤ α
  (:func:`false_alarm_rate` gives it exactly), slightly below α for small ``m``.
* **The per-night false-alarm rate is α; nights sharing one δ are not independent.** All nights of
  one frozen calibration see the same ``C``: if δ landed high, every night flags a little more, so
  alarms on ID nights cluster (a calibration that produced one false alarm is more likely than α to
  produce another). Over the lifetime of one calibration the expected share of false alarms is α,
  but they are not spread like independent coin flips. The benchmark prints the clustering.
* A night with no ok image has nothing to test: p-value and alarm are ``None``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from scipy.integrate import quad
from scipy.stats import beta, betabinom, binom

from odin_engine.errors import ConfigError

TEST_NAME = "beta-binomial: flagged ~ BetaBinomial(n_ok, n_heldout - k + 1, k)"


def validate_alpha(alpha: float) -> float:
    a = float(alpha)
    if not math.isfinite(a) or not 0.0 < a < 1.0:
        raise ConfigError(f"alpha (the drift test's level) must be strictly between 0 and 1, e.g. 0.01; got {alpha!r}")
    return a


def beta_binomial_params(calibration: Mapping[str, Any]) -> tuple[int, int]:
    """``(a, b) = (n − k + 1, k)`` of a calibration (``n_heldout``, ``order_statistic_k``)."""
    try:
        n = int(calibration["n_heldout"])
        k = calibration.get("order_statistic_k")
        k = int(k) if k is not None else int(math.ceil(float(calibration["target_tpr"]) * n - 1e-9))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the calibration lacks n_heldout/order_statistic_k (or target_tpr): {exc}") from exc
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"the calibration's order statistic is impossible: k={k}, n_heldout={n}")
    return n - k + 1, k


def drift_test(calibration: Mapping[str, Any], n_ok: int, n_flagged: int, alpha: float | None = None,
               confidence: float = 0.95) -> dict[str, Any]:
    """Test one night's flag count against a frozen calibration (see the module docstring).

    ``n_ok``: corpus images scored ``ok`` tonight; ``n_flagged``: those with ``score < δ``.
    ``alpha``: level of the alarm (``alarm = p_value < alpha``); ``None`` leaves ``alarm`` null.
    Returns the counts, the flag rate, the expected rate ``(n − k + 1)/(n + 1)`` with its
    ``confidence`` interval, the night's predictive interval for the flag rate, the p-value and
    the alarm.
    """
    m, x = int(n_ok), int(n_flagged)
    if m < 0 or not 0 <= x <= m:
        raise ValueError(f"need 0 <= n_flagged <= n_ok; got n_flagged={n_flagged}, n_ok={n_ok}")
    a, b = beta_binomial_params(calibration)
    alpha = validate_alpha(alpha) if alpha is not None else None
    tail = (1.0 - confidence) / 2.0
    n = a + b - 1
    if m:
        p = upper_tail(x, m, a, b)
        pred = [predictive_quantile(tail, m, a, b) / m, predictive_quantile(1.0 - tail, m, a, b) / m]
    else:
        p, pred = None, [None, None]
    return {
        "n_ok": m,
        "n_flagged": x,
        "flag_rate": x / m if m else None,
        "expected_rate": a / (n + 1),
        "expected_rate_ci": [float(beta.ppf(tail, a, b)), float(beta.ppf(1.0 - tail, a, b))],
        "predicted_rate_interval": pred,
        "confidence": confidence,
        "p_value": p,
        "alpha": alpha,
        "alarm": (p < alpha) if (alpha is not None and p is not None) else None,
        "n_heldout": n,
        "order_statistic_k": b,
        "test": TEST_NAME,
    }


EXACT_SUM_MAX = 1_000_000  # betabinom.sf sums the pmf: O(x) time and memory, ~10 ms at m = 10⁶
EXACT_PPF_MAX = 20_000  # betabinom.ppf searches with the summed cdf: ~40 ms at m = 2·10⁴, 2 s at 10⁶
MIXTURE_NODES = 4096


def upper_tail(x: int, m: int, a: float, b: float) -> float:
    """``P(X ≥ x)`` for ``X ~ BetaBinomial(m, a, b)``.

    Exact summation up to ``m = 10⁶``; beyond, the same probability as an integral over the rate,
    ``∫ P(Binomial(m, q) ≥ x) · Beta(q; a, b) dq`` (adaptive quadrature, breakpoint at ``q = x/m``;
    relative error ~1e-6 against the exact sum at ``m = 10⁶``), which costs the same at any ``m``.
    """
    if x <= 0:
        return 1.0
    if x > m:
        return 0.0
    if m <= EXACT_SUM_MAX:
        # beyond the mean, sum the tail itself: 1 − cdf loses the digits of small p-values
        v = float(np.sum(betabinom.pmf(np.arange(x, m + 1), m, a, b))) if x > m * a / (a + b) \
            else float(betabinom.sf(x - 1, m, a, b))
    else:
        v = quad(lambda q: binom.sf(x - 1, m, q) * beta.pdf(q, a, b), 0.0, 1.0, points=[x / m], limit=200,
                 epsabs=0.0, epsrel=1e-8)[0]
    return min(1.0, max(0.0, v))


def predictive_quantile(level: float, m: int, a: float, b: float) -> int:
    """Smallest count ``x`` with ``P(X ≤ x) ≥ level``, ``X ~ BetaBinomial(m, a, b)``.

    Exact (``betabinom.ppf``) up to ``m = 20,000``; beyond, ``P(X ≤ x)`` is the mean of
    ``binom.cdf(x, m, q_j)`` over ``4096`` equal-mass Beta quantile nodes ``q_j`` (monotone in ``q``,
    so within ``1/4096`` of the exact value) and ``x`` is found by bisection.
    """
    if m <= EXACT_PPF_MAX:
        return int(betabinom.ppf(level, m, a, b))
    q = beta.ppf((np.arange(MIXTURE_NODES) + 0.5) / MIXTURE_NODES, a, b)
    lo, hi = -1, m  # cdf(lo) < level <= cdf(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if float(np.mean(binom.cdf(mid, m, q))) >= level:
            hi = mid
        else:
            lo = mid
    return hi


def tail_table(m: int, a: float, b: float) -> np.ndarray:
    """``P(X ≥ x)`` for every ``x = 0 … m`` (``X ~ BetaBinomial(m, a, b)``), summed from the far end."""
    return np.minimum(1.0, np.cumsum(betabinom.pmf(np.arange(m + 1), m, a, b)[::-1])[::-1])


def false_alarm_rate(n: int, k: int, m: int, alpha: float, test: str = "beta-binomial",
                     tpr: float | None = None) -> float:
    """Exact probability that an ID night of ``m`` images alarms (``p < alpha``), δ from ``n`` held-out scores.

    ``test="beta-binomial"``: this module's test. ``test="binomial"``: the plain binomial test against
    ``1 − tpr``. Either way the true law of the count is ``BetaBinomial(m, n − k + 1, k)``; the
    rate is its mass on the counts the test rejects.
    """
    a, b = n - k + 1, k
    xs = np.arange(m + 1)
    if test == "beta-binomial":
        p = tail_table(m, a, b)
    elif test == "binomial":
        if tpr is None:
            raise ValueError("the binomial test needs tpr")
        p = binom.sf(xs - 1, m, 1.0 - tpr)
    else:
        raise ValueError(f"test must be 'beta-binomial' or 'binomial'; got {test!r}")
    return float(betabinom.pmf(xs, m, a, b)[p < alpha].sum())


def simulate_id_nights(n: int, m: int, tpr: float, sims: int, nights: int = 1, seed: int = 0,
                       discrete: float | None = None, check_calibrate: int = 200) -> dict[str, Any]:
    """p-values of in-distribution nights, by simulation, for checking the test's level.

    ``sims`` times: draw ``n`` held-out scores from N(0, 1), take δ = their ``k``-th largest, draw
    ``nights`` nights of ``m`` ID scores and count ``score < δ``. ``discrete``: round every score
    to this step (ties). δ is computed for all sets at once (``np.partition``); the first
    ``check_calibrate`` sets also go through :func:`odin_engine.decide.calibration.calibrate`,
    which must give the same δ (else ``RuntimeError``), so the simulation is the project's own
    calibration. Returns ``flagged``, ``p_beta_binomial`` (this module's test) and ``p_binomial``
    (the plain binomial test against ``1 − tpr``), arrays of shape ``(sims, nights)``, and the
    Beta-binomial ``a``, ``b``.
    """
    from odin_engine.decide.calibration import calibrate

    rng = np.random.default_rng(seed)

    def draw(*shape):
        s = rng.standard_normal(shape)
        return np.round(s / discrete) * discrete if discrete else s

    a = b = 0
    deltas = np.empty(sims)
    chunk = max(1, 4_000_000 // n)
    for lo in range(0, sims, chunk):
        heldout = draw(min(sims, lo + chunk) - lo, n)
        if lo == 0:
            a, b = beta_binomial_params(calibrate(heldout[0], tpr))
            for i in range(min(len(heldout), check_calibrate)):
                if calibrate(heldout[i], tpr)["delta"] != np.partition(heldout[i], n - b)[n - b]:
                    raise RuntimeError(f"simulated δ differs from calibrate()'s for held-out set {i}")
        deltas[lo:lo + len(heldout)] = np.partition(heldout, n - b, axis=1)[:, n - b]  # the k-th largest, k = b
    flagged = np.empty((sims, nights), dtype=np.int64)
    chunk = max(1, 4_000_000 // max(1, m * nights))
    for lo in range(0, sims, chunk):
        hi = min(sims, lo + chunk)
        flagged[lo:hi] = (draw(hi - lo, nights, m) < deltas[lo:hi, None, None]).sum(axis=2)
    xs = np.arange(m + 1)
    p_bb = tail_table(m, a, b)  # the p-value of every possible count, looked up
    p_bin = np.minimum(1.0, binom.sf(xs - 1, m, 1.0 - tpr))
    return {"flagged": flagged, "p_beta_binomial": p_bb[flagged], "p_binomial": p_bin[flagged], "a": a, "b": b}
