"""The drift test holds its false-alarm rate on in-distribution nights, including δ's own sampling error.

Simulation: draw held-out sets of n N(0, 1) scores, calibrate δ (the project's calibrate(), checked
against the vectorised order statistic), draw one night of m ID scores per held-out set, compute the
p-value. Each (held-out set, night) pair is independent, so the number of alarms among N pairs is
Binomial(N, s), where s is the test's exact attained level (``false_alarm_rate``; ≤ α because the
count is discrete). The check allows 4 binomial standard deviations, sqrt(s(1−s)/N), plus 1/N: a
correct test fails it with probability < 1e-4 (and the seeds are fixed, so the run is reproducible).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import betabinom, binom

from odin_engine.decide import drift
from odin_engine.decide.calibration import calibrate
from odin_engine.decide.drift import drift_test, false_alarm_rate, simulate_id_nights
from odin_engine.errors import ConfigError

SIMS = 20_000
ALPHAS = (0.01, 0.05)


def _tolerance(s: float, sims: int) -> float:
    return 4.0 * math.sqrt(s * (1.0 - s) / sims) + 1.0 / sims


# small held-out set / large nights (where the plain binomial test fails worst), and a larger
# held-out set at another TPR with smaller nights
@pytest.mark.parametrize("n,tpr,m", [(100, 0.95, 1000), (500, 0.90, 300)])
def test_false_alarm_rate_on_id_nights_is_alpha(n, tpr, m):
    sim = simulate_id_nights(n, m, tpr, SIMS, seed=n + m)
    k = sim["b"]
    assert k == math.ceil(tpr * n - 1e-9)
    print(f"\nn={n} tpr={tpr} m={m}, {SIMS} held-out sets x 1 night:")
    for alpha in ALPHAS:
        exact = false_alarm_rate(n, k, m, alpha)
        assert 0.75 * alpha <= exact <= alpha, (alpha, exact)  # discreteness costs little at these m
        rate = float(np.mean(sim["p_beta_binomial"] < alpha))
        tol = _tolerance(exact, SIMS)
        print(f"  alpha={alpha}: beta-binomial alarms {rate:.4f} (exact level {exact:.4f} ± {tol:.4f}); "
              f"plain binomial {np.mean(sim['p_binomial'] < alpha):.4f} "
              f"(exact {false_alarm_rate(n, k, m, alpha, 'binomial', tpr):.4f})")
        assert abs(rate - exact) <= tol, (alpha, rate, exact, tol)


def test_plain_binomial_test_false_alarms_far_above_alpha():
    """The reason for the design: ignoring δ's sampling error, the binomial test alarms on ID nights."""
    n, tpr, m = 100, 0.95, 1000
    sim = simulate_id_nights(n, m, tpr, SIMS, seed=7)
    for alpha in ALPHAS:
        plain = float(np.mean(sim["p_binomial"] < alpha))
        exact = false_alarm_rate(n, sim["b"], m, alpha, "binomial", tpr)
        assert abs(plain - exact) <= _tolerance(exact, SIMS), (plain, exact)
        assert plain > 5 * alpha, (alpha, plain)  # 0.33 at alpha = 0.01
        assert float(np.mean(sim["p_beta_binomial"] < alpha)) <= alpha + _tolerance(alpha, SIMS)


def test_ties_keep_the_test_conservative():
    """Scores rounded to steps of 0.5 (heavy ties): flagging score < δ can only flag fewer ID images."""
    sims = 10_000
    sim = simulate_id_nights(100, 1000, 0.95, sims, seed=3, discrete=0.5)
    for alpha in ALPHAS:
        assert float(np.mean(sim["p_beta_binomial"] < alpha)) <= alpha + _tolerance(alpha, sims)


@pytest.mark.parametrize("n,m,n_ood", [(100, 1000, 333), (100, 90, 30)])
def test_power_a_third_ood_night_alarms(n, m, n_ood):
    """A night with a third OOD images (scores shifted 3 sd low) gives p < 0.01, for nearly every calibration."""
    rng = np.random.default_rng(11)
    ps = []
    for _ in range(200):
        cal = calibrate(rng.standard_normal(n), 0.95)
        night = np.concatenate([rng.standard_normal(m - n_ood), rng.standard_normal(n_ood) - 3.0])
        ps.append(drift_test(cal, m, int(np.sum(night < cal["delta"])), alpha=0.01)["p_value"])
    ps = np.array(ps)
    print(f"\nn={n} m={m} ood={n_ood}: alarm share {np.mean(ps < 0.01):.3f}, median p {np.median(ps):.2g}")
    assert np.mean(ps < 0.01) >= 0.98


def test_drift_test_result():
    cal = calibrate(np.random.default_rng(0).standard_normal(200), 0.95)
    n, k = cal["n_heldout"], cal["order_statistic_k"]
    r = drift_test(cal, 1000, 90, alpha=0.01)
    assert r["p_value"] == pytest.approx(betabinom.sf(89, 1000, n - k + 1, k))
    assert r["flag_rate"] == 0.09 and r["n_ok"] == 1000 and r["n_flagged"] == 90
    # the expected rate and its interval are the calibration's TPR statistics, turned around
    assert r["expected_rate"] == pytest.approx(1 - cal["expected_tpr_new_data"])
    assert r["expected_rate_ci"] == pytest.approx([1 - cal["tpr_ci"][1], 1 - cal["tpr_ci"][0]])
    lo, hi = r["predicted_rate_interval"]
    assert lo < r["expected_rate"] < hi and lo <= r["expected_rate_ci"][0] and hi >= r["expected_rate_ci"][1]
    assert r["alarm"] is (r["p_value"] < 0.01)
    # more flags, smaller p; no alpha, no alarm
    assert drift_test(cal, 1000, 120)["p_value"] < r["p_value"] and drift_test(cal, 1000, 120)["alarm"] is None
    assert drift_test(cal, 1000, 0)["p_value"] == 1.0


def test_alarm_is_strictly_below_alpha():
    cal = {"n_heldout": 100, "order_statistic_k": 95}
    p = drift_test(cal, 500, 60)["p_value"]
    assert drift_test(cal, 500, 60, alpha=p)["alarm"] is False
    assert drift_test(cal, 500, 60, alpha=min(0.999, p * 1.0001))["alarm"] is True


def test_night_without_ok_images_is_not_tested():
    r = drift_test({"n_heldout": 100, "order_statistic_k": 95}, 0, 0, alpha=0.01)
    assert r["p_value"] is None and r["alarm"] is None and r["flag_rate"] is None
    assert r["expected_rate"] == pytest.approx(6 / 101)


def test_bad_input():
    cal = {"n_heldout": 100, "order_statistic_k": 95}
    with pytest.raises(ValueError):
        drift_test(cal, 10, 11)
    with pytest.raises(ValueError):
        drift_test(cal, -1, 0)
    for alpha in (0, 1, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="alpha"):
            drift_test(cal, 10, 1, alpha=alpha)
    with pytest.raises(ConfigError, match="n_heldout"):
        drift_test({"delta": 0.1}, 10, 1)
    with pytest.raises(ConfigError, match="impossible"):
        drift_test({"n_heldout": 100, "order_statistic_k": 101}, 10, 1)
    # a calibration without k: derived from the target TPR as calibrate() does
    assert drift_test({"n_heldout": 100, "target_tpr": 0.95}, 10, 1)["order_statistic_k"] == 95


def test_large_night_paths_agree_with_the_exact_ones(monkeypatch):
    """Above 10⁶ / 2·10⁴ images the tail and the quantiles are computed another way: same numbers."""
    a, b, m = 6, 95, 50_000
    xs = [0, 1, 1500, 3000, 6000, 12_000, m]
    exact_tail = [drift.upper_tail(x, m, a, b) for x in xs]
    exact_q = [drift.predictive_quantile(q, m, a, b) for q in (0.025, 0.5, 0.975)]
    assert exact_q == [int(betabinom.ppf(q, m, a, b)) for q in (0.025, 0.5, 0.975)]
    monkeypatch.setattr(drift, "EXACT_SUM_MAX", 10)
    monkeypatch.setattr(drift, "EXACT_PPF_MAX", 10)
    for x, e in zip(xs, exact_tail):
        assert drift.upper_tail(x, m, a, b) == pytest.approx(e, rel=1e-4, abs=1e-12)
    approx_q = [drift.predictive_quantile(q, m, a, b) for q in (0.025, 0.5, 0.975)]
    # the mixture cdf is within 1/4096 of the exact one: the quantile moves by at most a few counts
    assert all(abs(u - v) <= 0.002 * m for u, v in zip(approx_q, exact_q)), (approx_q, exact_q)


def test_binomial_reference_is_the_plain_test():
    n, k, m = 100, 95, 200
    xs = np.arange(m + 1)
    crit = xs[binom.sf(xs - 1, m, 0.05) < 0.01].min()
    assert false_alarm_rate(n, k, m, 0.01, "binomial", 0.95) == pytest.approx(betabinom.sf(crit - 1, m, n - k + 1, k))
    with pytest.raises(ValueError):
        false_alarm_rate(n, k, m, 0.01, "binomial")
