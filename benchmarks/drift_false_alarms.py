"""False-alarm rate of the drift test on in-distribution nights: Beta-binomial vs the plain binomial test.

    python -m benchmarks.drift_false_alarms [--sims 20000] [--tpr 0.95]

1. Exact rates (no simulation): the probability that an ID night of ``m`` images alarms at level α
   when δ was calibrated on ``n`` held-out ID images, for this project's Beta-binomial test and for
   a plain binomial test against ``1 − tpr``. The law of the night's count is
   ``BetaBinomial(m, n − k + 1, k)`` either way; each rate is its mass on the counts the test rejects.
2. Simulation (``--sims`` held-out sets, δ from ``calibrate()``, one night each): the same rates
   measured, as the check that the law is right.
3. Clustering: nights that share one δ. ``P(alarm tonight | alarm last night)``, exactly
   (``E[P(alarm | C)²] / E[P(alarm | C)]`` by quadrature over ``C ~ Beta(k, n − k + 1)``) and by
   simulation (two nights per held-out set).
4. The cost of one ``drift_test`` call as the night grows (exact sum up to 10⁶ images, quadrature above).

Scores are N(0, 1) draws; the results do not depend on the score distribution (only on ranks).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.integrate import quad
from scipy.stats import beta, binom

from odin_engine.decide.drift import drift_test, false_alarm_rate, simulate_id_nights, tail_table

ALPHAS = (0.01, 0.05)


def _k(n: int, tpr: float) -> int:
    return int(math.ceil(tpr * n - 1e-9))


def alarm_given_alarm(n: int, k: int, m: int, alpha: float) -> float:
    """``P(night 2 alarms | night 1 alarmed)`` for two ID nights sharing one δ (exact, by quadrature)."""
    a, b = n - k + 1, k
    p = tail_table(m, a, b)
    crit = int(np.argmax(p < alpha)) if (p < alpha).any() else m + 1  # smallest count that alarms
    if crit > m:
        return float("nan")
    f = lambda q, e: binom.sf(crit - 1, m, q) ** e * beta.pdf(q, a, b)  # noqa: E731
    # the integrand is a step near q = crit/m: split there for the quadrature
    both = sum(quad(f, lo, hi, args=(2,), limit=200)[0] for lo, hi in ((0, crit / m), (crit / m, 1)))
    one = sum(quad(f, lo, hi, args=(1,), limit=200)[0] for lo, hi in ((0, crit / m), (crit / m, 1)))
    return both / one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=20_000, help="held-out sets per simulated setting")
    ap.add_argument("--tpr", type=float, default=0.95)
    args = ap.parse_args()
    tpr = args.tpr
    t0 = time.time()

    print(f"1. exact false-alarm rate of an ID night (tpr={tpr}); columns: alpha = {', '.join(map(str, ALPHAS))}")
    print(f"{'n held-out':>10} {'m night':>8} | {'beta-binomial':>16} | {'plain binomial':>16}")
    for n in (100, 1_000, 10_000):
        for m in (100, 1_000, 10_000, 100_000):
            k = _k(n, tpr)
            bb = "  ".join(f"{false_alarm_rate(n, k, m, a):.4f}" for a in ALPHAS)
            pl = "  ".join(f"{false_alarm_rate(n, k, m, a, 'binomial', tpr):.4f}" for a in ALPHAS)
            print(f"{n:>10} {m:>8} | {bb:>16} | {pl:>16}")

    print(f"\n2. simulated ({args.sims} held-out sets, δ from calibrate(), one ID night each)")
    print(f"{'n':>6} {'m':>6} {'alpha':>6} | {'beta-binomial sim':>17} {'exact':>7} | {'plain sim':>9} {'exact':>7}")
    for n, m in ((100, 1_000), (1_000, 1_000), (1_000, 10_000)):
        sim = simulate_id_nights(n, m, tpr, args.sims, seed=n + m)
        k = sim["b"]
        for a in ALPHAS:
            print(f"{n:>6} {m:>6} {a:>6} | {np.mean(sim['p_beta_binomial'] < a):>17.4f} "
                  f"{false_alarm_rate(n, k, m, a):>7.4f} | {np.mean(sim['p_binomial'] < a):>9.4f} "
                  f"{false_alarm_rate(n, k, m, a, 'binomial', tpr):>7.4f}")

    print("\n3. clustering: P(alarm | the previous night under the same δ alarmed), alpha = 0.01")
    print(f"{'n':>6} {'m':>6} | {'exact':>7} {'simulated':>9} (unconditional: ~0.01)")
    for n, m in ((100, 1_000), (1_000, 1_000), (10_000, 1_000), (10_000, 100)):
        k = _k(n, tpr)
        sims = args.sims if n <= 1_000 else max(1, args.sims // 4)
        al = simulate_id_nights(n, m, tpr, sims, nights=2, seed=7 * n + m)["p_beta_binomial"] < 0.01
        sim = al[al[:, 0], 1].mean() if al[:, 0].any() else float("nan")
        print(f"{n:>6} {m:>6} | {alarm_given_alarm(n, k, m, 0.01):>7.3f} {sim:>9.3f} "
              f"({int(al[:, 0].sum())} first-night alarms in {sims})")
    print("\n4. cost of one drift_test (n = 1,000 held-out), a night flagging 6%")
    cal = {"n_heldout": 1_000, "order_statistic_k": _k(1_000, tpr)}
    for m in (10**3, 10**5, 10**6, 10**7, 10**8):
        t = time.perf_counter()
        r = drift_test(cal, m, int(0.06 * m), alpha=0.01)
        print(f"  m = {m:>11,}: {time.perf_counter() - t:.3f} s (p = {r['p_value']:.3g})")
    print(f"\n{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
