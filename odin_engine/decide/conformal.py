"""Conformal p-values per image and Benjamini–Hochberg flagging at a controlled false-discovery rate.

Bates, Candès, Lei, Romano & Sesia, "Testing for outliers with conformal p-values", Annals of
Statistics 51(1), 2023.

With ``n`` held-out in-distribution scores ``s_1 … s_n`` (higher = more in-distribution), an image
with score ``s`` gets the **marginal conformal p-value**

    p(s) = (1 + #{i : s_i ≤ s}) / (n + 1)          (ties counted as written: ``≤``)

For a new in-distribution image exchangeable with the held-out set, ``P(p ≤ α) ≤ α`` for every α
(over the draw of both), and the p-values of a corpus are positively dependent (PRDS), so the
Benjamini–Hochberg procedure on them controls the false-discovery rate (Bates et al., Thm. 2.3).

**Calibration-conditional p-values** (``conditional = DELTA``, Bates et al. §3, the DKW
construction): ``p_cc(s) = min(1, #{i : s_i ≤ s}/n + ε)`` with ``ε = sqrt(ln(1/DELTA) / (2n))``.
By the one-sided Dvoretzky–Kiefer–Wolfowitz inequality with Massart's constant,
``F(s) ≤ F̂_n(s) + ε`` for every ``s`` with probability ≥ 1 − DELTA over the held-out draw
(``F`` the in-distribution CDF of the score), and then ``P(p_cc ≤ t | held-out set) ≤ t`` for every
``t``: the guarantee holds for *this* held-out set, not only on average over held-out sets. Cost:
every p-value is larger by about ``ε − 1/(n+1)``, so fewer images are flagged (ε = 0.0107 at
n = 10,000 and DELTA = 0.1). Requires DELTA ≤ 0.5 (Massart's condition).

**Both p-values depend on ``s`` only through ``j = #{i : s_i ≤ s} ∈ {0 … n}``** and increase with it.
So the decision stage needs, per corpus, only the counts ``c_j`` of ok images at each level
(``n + 1`` integers, whatever the corpus size), and BH is exact on them:
``N(t) = c_0 + … + c_t`` images have ``p ≤ v_t``; BH flags ``{j ≤ t*}`` with
``t* = max{t : v_t ≤ N(t)·Q/m}`` (m = ok corpus images), the same set as the step-up procedure on
the sorted p-values (ties included). Since ``j ≤ t ⇔ s < h_t`` (``h`` the held-out scores sorted
ascending, 0-based), BH's decision is a score threshold too: ``score < h_{t*}``.

**Relation to δ and the TPR rule.** δ is the ``k``-th largest held-out score, ``k = ⌈tpr·n⌉``, i.e.
``δ = h_{n−k}``. For any score ``s``: ``s < δ ⇔ #{s_i ≤ s} ≤ n − k ⇔ p(s) ≤ (n − k + 1)/(n + 1)``
(exactly, ties included). The TPR rule *is* the rule "p ≤ α" at ``α = (n − k + 1)/(n + 1) ≈ 1 − tpr``;
the two differ only by the ``+1`` terms (``1 − tpr`` vs ``(n − k + 1)/(n + 1)``) and ties.

**Honest limits.** The smallest p-value possible is ``v_0`` (``1/(n+1)``, or ``ε`` conditionally).
BH at level Q flags anything only when at least ``m·v_0/Q`` corpus images reach it: with
``m = 10⁷`` and ``n = 10⁴`` at Q = 0.1 that is ``10⁴`` images. It can never flag when
``v_0 > Q``: :func:`min_heldout_for_fdr` is the held-out size below which that happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from odin_engine.errors import ConfigError

STOREY_LAMBDA = 0.5
P_VALUE_KINDS = ("marginal", "calibration-conditional (DKW)")


def dkw_epsilon(n: int, delta: float) -> float:
    """``sqrt(ln(1/delta) / (2n))``: the one-sided DKW band (Massart) at confidence ``1 − delta``."""
    return math.sqrt(math.log(1.0 / float(delta)) / (2.0 * int(n)))


def min_heldout_for_fdr(q: float, conditional: float | None = None) -> int:
    """Smallest held-out size whose smallest p-value is ≤ ``q`` (below it BH at ``q`` can never flag).

    Marginal: ``1/(n+1) ≤ q ⇔ n ≥ ⌈1/q⌉ − 1``; conditional: ``ε(n) ≤ q ⇔ n ≥ ⌈ln(1/DELTA)/(2q²)⌉``.
    """
    q = float(q)
    if conditional is None:
        return max(1, int(math.ceil(round(1.0 / q, 9))) - 1)
    return max(1, int(math.ceil(round(math.log(1.0 / float(conditional)) / (2.0 * q * q), 9))))


def check_heldout_for_fdr(n: int, q: float, conditional: float | None = None,
                          what: str = "held-out in-distribution scores") -> None:
    """Refuse a held-out set so small that BH at ``q`` could not flag even a corpus of pure outliers."""
    need = min_heldout_for_fdr(q, conditional)
    if n < need:
        smallest = ("1/(n+1)" if conditional is None else "sqrt(ln(1/DELTA)/(2n)) (--conditional)")
        raise ConfigError(
            f"{n} {what} are too few for --fdr {q:g}: the smallest p-value, {smallest}, would exceed {q:g}, so "
            f"Benjamini–Hochberg could never flag anything; need at least {need} held-out images")


@dataclass(frozen=True)
class ConformalPValues:
    """p-values against the sorted held-out scores ``heldout`` (ascending); ``conditional``: DELTA or None."""

    heldout: np.ndarray
    conditional: float | None = None

    @classmethod
    def from_scores(cls, scores, conditional: float | None = None) -> "ConformalPValues":
        h = np.sort(np.asarray(scores, np.float64).ravel())
        if not h.size:
            raise ConfigError("conformal p-values need at least one held-out score")
        if not np.isfinite(h).all():
            raise ConfigError("held-out scores contain NaN or infinite values")
        return cls(h, None if conditional is None else float(conditional))

    @property
    def n(self) -> int:
        return int(self.heldout.size)

    @property
    def kind(self) -> str:
        return P_VALUE_KINDS[self.conditional is not None]

    def levels(self) -> np.ndarray:
        """``v_j``, the p-value of an image with ``j = #{s_i ≤ s}``, for j = 0 … n (non-decreasing)."""
        j = np.arange(self.n + 1, dtype=np.float64)
        if self.conditional is None:
            return (1.0 + j) / (self.n + 1.0)
        return np.minimum(1.0, j / self.n + dkw_epsilon(self.n, self.conditional))

    def level_index(self, scores) -> np.ndarray:
        """``j = #{i : s_i ≤ s}`` per score (int64)."""
        return np.searchsorted(self.heldout, np.asarray(scores, np.float64), side="right").astype(np.int64)

    def p_values(self, scores) -> np.ndarray:
        return self.levels()[self.level_index(scores)]

    def counts(self, scores) -> np.ndarray:
        """``c_j``: how many of ``scores`` sit at each level j = 0 … n."""
        return np.bincount(self.level_index(scores), minlength=self.n + 1)

    def cut(self, t: int) -> float:
        """The score threshold of "flag ``j ≤ t``": ``score < cut`` (−inf: none; +inf: all)."""
        if t < 0:
            return -math.inf
        return math.inf if t >= self.n else float(self.heldout[t])


def bh_index(counts: np.ndarray, levels: np.ndarray, q: float) -> int:
    """Benjamini–Hochberg at level ``q`` on p-values given as counts per level: ``t*`` (flag ``j ≤ t*``),
    −1 when nothing is flagged. ``t* = max{t : v_t ≤ N(t)·q/m}``, ``N`` the cumulative counts."""
    c = np.asarray(counts, np.int64)
    m = int(c.sum())
    if not m:
        return -1
    ok = np.flatnonzero(np.asarray(levels, np.float64) <= np.cumsum(c) * float(q) / m)
    return int(ok[-1]) if ok.size else -1


def storey_pi0(counts: np.ndarray, levels: np.ndarray, lam: float = STOREY_LAMBDA) -> float | None:
    """Storey's estimate of the share of in-distribution images: ``π̂₀ = #{p > λ} / (m·(1 − λ'))``, capped
    at 1; ``λ'`` = the largest p-value level ≤ λ (the exact ``P(p ≤ λ)`` of discrete conformal p-values)."""
    c = np.asarray(counts, np.int64)
    v = np.asarray(levels, np.float64)
    m = int(c.sum())
    if not m:
        return None
    below = v <= lam
    lam_eff = float(v[below].max()) if below.any() else 0.0
    return min(1.0, float(c[~below].sum()) / (m * (1.0 - lam_eff))) if lam_eff < 1.0 else 1.0


def decision_summary(pv: ConformalPValues, counts: np.ndarray, *, order_statistic_k: int, fdr: float | None,
                     reference_fdr: float = 0.1) -> dict[str, Any]:
    """Everything the outputs say about the p-values and both rules (data only).

    ``fdr``: BH's level when BH decides (None: the TPR rule decides, and BH at ``reference_fdr``
    is reported for comparison). ``order_statistic_k``: the calibration's ``k`` (δ = h_{n−k}).
    """
    v = pv.levels()
    c = np.asarray(counts, np.int64)
    m = int(c.sum())
    n = pv.n
    t_tpr = n - int(order_statistic_k)
    q = float(fdr if fdr is not None else reference_fdr)
    t_bh = bh_index(c, v, q)
    pi0 = storey_pi0(c, v)
    return {
        "rule": "fdr" if fdr is not None else "tpr",
        "rule_text": (f"Benjamini–Hochberg at FDR {q:g} on {pv.kind} conformal p-values" if fdr is not None
                      else "TPR rule: score < δ"),
        "p_value": pv.kind,
        "conditional_delta": pv.conditional,
        "n_heldout": n,
        "fdr_q": q,
        "n_ok": m,
        "n_flagged_tpr": int(c[: t_tpr + 1].sum()),
        "tpr_p_threshold": float(v[t_tpr]),  # TPR rule ⇔ p ≤ this (marginal: (n − k + 1)/(n + 1))
        "n_flagged_fdr": int(c[: t_bh + 1].sum()),
        "fdr_p_threshold": float(v[t_bh]) if t_bh >= 0 else None,  # BH flags p ≤ this
        "fdr_score_threshold": _finite(pv.cut(t_bh)),  # BH flags score < this (None: nothing / everything)
        "min_p_value": float(v[0]),
        "bh_min_count": int(math.ceil(m * float(v[0]) / q - 1e-9)) if m else None,
        "n_at_min_p_value": int(c[v == v[0]].sum()),
        "storey_lambda": STOREY_LAMBDA,
        "storey_pi0": pi0,
        "estimated_outliers": None if pi0 is None else int(round(m * (1.0 - pi0))),
    }


def heldout_needed(q: float, shares=(1.0, 0.1, 0.01, 0.001), conditional: float | None = None) -> list[dict]:
    """Held-out sizes at which BH at ``q`` can flag when a share ``r`` of the corpus reaches the smallest
    p-value: marginal ``n + 1 ≥ 1/(q·r)``; conditional ``ε(n) ≤ q·r``."""
    rows = []
    for r in shares:
        level = q * r
        n = (int(math.ceil(round(1.0 / level, 9))) - 1 if conditional is None
             else int(math.ceil(math.log(1.0 / conditional) / (2.0 * level * level))))
        rows.append({"share": float(r), "n_heldout": max(1, n)})
    return rows


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
