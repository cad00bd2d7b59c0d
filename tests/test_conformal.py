"""Conformal p-values and Benjamini–Hochberg flagging (issue #19).

Exactness: the ``p_value`` column equals the formula recomputed here independently (no
searchsorted: a broadcast count), the TPR rule equals ``p ≤ (n − k + 1)/(n + 1)``, and BH's flagged
set equals an independent step-up BH on the same p-values — through the streaming flag pass with
several rank ranges, and on the test bed (ResNet-20 on CIFAR-10 + OOD sets) through the CLI.
Validity, by simulation over 200+ random held-out/corpus splits (synthetic scores always; the test
bed's scores when ../shared/data is present): in-distribution p-values are uniform, BH's mean
false-discovery proportion stays ≤ Q, and calibration-conditional p-values hold for ≥ 1 − DELTA of
held-out draws.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from _odin_helpers import shared_data, write_scores
from jobs.cli import main as cli
from odin_engine.decide.calibration import calibrate_tables, heldout_p_values
from odin_engine.decide.conformal import (ConformalPValues, bh_index, check_heldout_for_fdr, decision_summary,
                                          dkw_epsilon, heldout_needed, min_heldout_for_fdr, storey_pi0)
from odin_engine.decide.flagging import prepare, summarize, write_flags
from odin_engine.errors import ConfigError
from odin_engine.io.results import open_flags
from odin_engine.io.scores import ScoreTable
from odin_engine.io.store import Store
from odin_engine.settings import CalibrationSettings

ALPHAS = (0.01, 0.05, 0.1)


# --------------------------------------------------------------------------- independent references
def formula_p(heldout: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{i : s_i ≤ s}) / (n + 1), by a broadcast count (no sorting, no searchsorted)."""
    h = np.asarray(heldout, np.float64)
    s = np.asarray(scores, np.float64)
    return (1.0 + (h[None, :] <= s[:, None]).sum(axis=1)) / (h.size + 1.0)


def reference_bh(p: np.ndarray, q: float) -> np.ndarray:
    """Benjamini & Hochberg (1995), step-up: k = max{i : p_(i) ≤ i·q/m}; reject every p ≤ p_(k)."""
    p = np.asarray(p, np.float64)
    m = p.size
    ps = np.sort(p)
    below = [i for i in range(1, m + 1) if ps[i - 1] <= i * q / m]
    if not below:
        return np.zeros(m, bool)
    return p <= ps[max(below) - 1]


def frame(scores: np.ndarray, prefix: str, errors: int = 0, column: str = "odin") -> pd.DataFrame:
    n = len(scores)
    status = np.array(["ok"] * (n - errors) + ["error"] * errors)
    return pd.DataFrame({
        "image_id": [f"{prefix}-{i:06d}" for i in range(n)], "uri": "x", "status": status,
        "error": np.where(status == "error", "broken", None), "pred": np.arange(n) % 4,
        column: np.where(status == "ok", scores, np.nan), "model_id": "m", "temperature": 1000.0, "epsilon": 0.0,
    })


def flag(corpus: pd.DataFrame, heldout: pd.DataFrame, out, *, fdr=None, conditional=None, budget=1 << 22,
         method="odin", tpr=0.95):
    settings = CalibrationSettings(tpr, method, fdr=fdr, conditional=conditional)
    table = ScoreTable.from_table(corpus)
    cal = calibrate_tables(table, ScoreTable.from_table(heldout), settings)
    pv = heldout_p_values(cal, conditional)
    plan = prepare(table, cal["delta"], method, budget=budget, heldout=pv, order_statistic_k=cal["order_statistic_k"],
                   fdr=fdr)
    write_flags(plan, Store(str(out)), rows_per_file=300)
    return cal, plan, pd.read_parquet(out)


def tied_scores(rng, n: int) -> np.ndarray:
    """Rounded scores: many ties within the held-out set and between held-out and corpus."""
    return np.round(rng.normal(size=n), 1)


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("budget", [1 << 22, 97])
@pytest.mark.parametrize("ties", [False, True])
def test_p_value_column_is_the_formula_and_tpr_rule_is_a_p_value_rule(tmp_path, budget, ties):
    rng = np.random.default_rng(3)
    draw = (lambda n: tied_scores(rng, n)) if ties else (lambda n: rng.normal(size=n))
    held = draw(300)
    corpus = frame(np.concatenate([draw(900), draw(100) - 2.0]), "c", errors=20)
    cal, plan, f = flag(corpus, frame(held, "h"), tmp_path / "flags", budget=budget)
    if budget < 1000:
        assert len(plan.ranges) > 1  # the p-values are exact across rank ranges too
    ok = f[f["status"] == "ok"]
    np.testing.assert_array_equal(ok["p_value"].to_numpy(), formula_p(held, ok["odin"].to_numpy()))
    assert f.loc[f["status"] == "error", "p_value"].isna().all()
    # the TPR rule is "p ≤ (n − k + 1)/(n + 1)", exactly, ties included
    n, k = cal["n_heldout"], cal["order_statistic_k"]
    alpha_tpr = (n - k + 1) / (n + 1)
    np.testing.assert_array_equal(ok["is_outlier"].to_numpy(bool), ok["p_value"].to_numpy() <= alpha_tpr)
    np.testing.assert_array_equal(ok["is_outlier"].to_numpy(bool), ok["odin"].to_numpy() < cal["delta"])
    assert plan.decision["tpr_p_threshold"] == pytest.approx(alpha_tpr)
    assert plan.decision["rule"] == "tpr" and plan.decision["n_flagged_tpr"] == int(ok["is_outlier"].sum())
    # held-out scores sit exactly at δ and at every level: the relation holds there as well
    at = frame(np.concatenate([held, [cal["delta"]]]), "at")
    _, _, g = flag(at, frame(held, "h"), tmp_path / "at")
    np.testing.assert_array_equal(g["is_outlier"].to_numpy(bool), g["p_value"].to_numpy() <= alpha_tpr)


@pytest.mark.parametrize("budget", [1 << 22, 61])
@pytest.mark.parametrize("q", [0.01, 0.1, 0.3])
def test_bh_flags_equal_an_independent_bh(tmp_path, budget, q):
    rng = np.random.default_rng(int(q * 1000) + budget % 7)
    held = tied_scores(rng, 400)
    corpus = frame(np.concatenate([tied_scores(rng, 700), rng.normal(-8, 1, 280), rng.normal(-2, 1, 20)]), "c", errors=10)
    cal, plan, f = flag(corpus, frame(held, "h"), tmp_path / "flags", fdr=q, budget=budget)
    ok = f[f["status"] == "ok"]
    p = ok["p_value"].to_numpy()
    want = reference_bh(p, q)
    np.testing.assert_array_equal(ok["is_outlier"].to_numpy(bool), want)
    assert want.any() and not want.all()  # a decision that means something
    d = plan.decision
    assert d["rule"] == "fdr" and d["fdr_q"] == q and d["n_flagged_fdr"] == int(want.sum())
    assert plan.stats.n_outliers == int(want.sum())
    assert d["n_flagged_tpr"] == int((ok["odin"] < cal["delta"]).sum())
    # BH's score threshold: flag ⇔ score < it; its p threshold: flag ⇔ p ≤ it
    np.testing.assert_array_equal(want, ok["odin"].to_numpy() < d["fdr_score_threshold"])
    np.testing.assert_array_equal(want, p <= d["fdr_p_threshold"])
    # rank is by score under both rules; margin stays score − δ
    np.testing.assert_array_equal(ok["rank"], ok["odin"].rank(method="min").astype("int64"))
    s = summarize(plan.stats, decision=d)["overall"]
    assert (s["rule"], s["n_outliers"], s["n_flagged_fdr"]) == ("fdr", int(want.sum()), int(want.sum()))


def test_bh_on_counts_equals_step_up_bh_on_random_p_values():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        pv = ConformalPValues.from_scores(np.round(rng.normal(size=n), 1),
                                          None if trial % 3 else float(rng.uniform(0.01, 0.5)))
        s = np.concatenate([np.round(rng.normal(size=int(rng.integers(0, 80))), 1),
                            rng.normal(-3, 1, int(rng.integers(0, 30)))])
        q = float(rng.uniform(0.01, 0.5))
        t = bh_index(pv.counts(s), pv.levels(), q)
        got = pv.level_index(s) <= t
        np.testing.assert_array_equal(got, reference_bh(pv.p_values(s), q))
        np.testing.assert_array_equal(got, s < pv.cut(t))


def test_everything_or_nothing_flagged_is_handled(tmp_path):
    held = frame(np.linspace(0, 1, 200), "h")
    cal, plan, f = flag(frame(np.full(50, 0.5), "c"), held, tmp_path / "none", fdr=0.05)
    assert not f["is_outlier"].any() and plan.decision["fdr_p_threshold"] is None
    assert plan.decision["fdr_score_threshold"] is None and plan.cut == -math.inf
    cal, plan, f = flag(frame(np.full(50, -1.0), "c"), held, tmp_path / "all", fdr=0.05)
    assert f["is_outlier"].all() and plan.decision["n_flagged_fdr"] == 50


# --------------------------------------------------------------------------- conditional p-values and limits
def test_conditional_p_values_are_the_dkw_shift_and_hold_per_heldout_draw():
    n, delta, alpha, draws = 200, 0.1, 0.1, 400
    eps = dkw_epsilon(n, delta)
    assert eps == pytest.approx(math.sqrt(math.log(10) / 400))
    rng = np.random.default_rng(5)
    broken_cc = broken_marginal = 0
    for _ in range(draws):
        h = rng.uniform(size=n)  # F = identity, so P(p ≤ α | held-out set) is exact
        for cond in (delta, None):
            pv = ConformalPValues.from_scores(h, cond)
            v = pv.levels()
            assert np.all(np.diff(v) >= 0) and v[-1] <= 1.0
            t = int(np.flatnonzero(v <= alpha)[-1]) if (v <= alpha).any() else -1
            type1 = 0.0 if t < 0 else min(1.0, pv.cut(t))  # P(S < h_t) = h_t for uniform scores
            if type1 > alpha:
                if cond is None:
                    broken_marginal += 1
                else:
                    broken_cc += 1
    assert broken_cc / draws <= delta  # the guarantee: for ≥ 1 − DELTA of held-out sets
    assert broken_marginal / draws > 0.3  # marginal p-values hold only on average over held-out sets
    np.testing.assert_allclose(ConformalPValues.from_scores(h, delta).p_values([np.sort(h)[10]]), [11 / n + eps])


def test_too_small_heldout_for_fdr_is_refused_with_the_n_needed():
    assert min_heldout_for_fdr(0.1) == 9 and min_heldout_for_fdr(0.001) == 999
    assert min_heldout_for_fdr(0.1, 0.1) == math.ceil(math.log(10) / 0.02)
    with pytest.raises(ConfigError, match="need at least 999"):
        check_heldout_for_fdr(500, 0.001)
    check_heldout_for_fdr(999, 0.001)
    # the resolution table: n + 1 ≥ 1/(q·share)
    assert [r["n_heldout"] for r in heldout_needed(0.1)] == [9, 99, 999, 9999]


def test_storey_estimate_counts_the_outliers():
    rng = np.random.default_rng(2)
    pv = ConformalPValues.from_scores(rng.normal(size=5000))
    s = np.concatenate([rng.normal(size=7000), rng.normal(-6, 1, 3000)])
    d = decision_summary(pv, pv.counts(s), order_statistic_k=4750, fdr=None)
    assert d["rule"] == "tpr" and 2700 <= d["estimated_outliers"] <= 3300
    assert storey_pi0(pv.counts(rng.normal(size=4000)), pv.levels()) == pytest.approx(1.0, abs=0.06)
    assert d["min_p_value"] == 1 / 5001 and d["bh_min_count"] == math.ceil(10000 / 5001 / 0.1)


# --------------------------------------------------------------------------- validity by simulation
def simulate(pool_id: np.ndarray, pool_ood: np.ndarray, *, splits: int, n_heldout: int, n_test_id: int,
             ood_shares=(0.05, 0.3), q: float = 0.1, seed: int = 0) -> dict:
    """Random splits of the in-distribution pool into held-out and test images; OOD mixed in at each share.

    Returns the share of test ID p-values ≤ α per α (pooled over splits) and BH's FDP per split and share.
    """
    rng = np.random.default_rng(seed)
    below = {a: 0 for a in ALPHAS}
    total = 0
    fdp = {share: [] for share in ood_shares}
    for _ in range(splits):
        perm = rng.permutation(pool_id.size)
        pv = ConformalPValues.from_scores(pool_id[perm[:n_heldout]])
        test_id = pool_id[perm[n_heldout:n_heldout + n_test_id]]
        p_id = pv.p_values(test_id)
        for a in ALPHAS:
            below[a] += int((p_id <= a).sum())
        total += p_id.size
        for share in ood_shares:
            m_ood = int(round(share * n_test_id / (1 - share)))
            ood = pool_ood[rng.choice(pool_ood.size, m_ood, replace=m_ood > pool_ood.size)]
            s = np.concatenate([test_id, ood])
            t = bh_index(pv.counts(s), pv.levels(), q)
            flagged = pv.level_index(s) <= t
            false = int(flagged[: test_id.size].sum())
            fdp[share].append(false / max(1, int(flagged.sum())))
    return {"share_below": {a: below[a] / total for a in ALPHAS}, "n": total, "splits": splits, "fdp": fdp}


def check_validity(r: dict, q: float = 0.1) -> None:
    for a, share in r["share_below"].items():
        # each split's p-values are exchangeable given the split, so only splits are independent:
        # the binomial error of a share over `splits` draws bounds it (4 standard errors, conservative)
        se = math.sqrt(a * (1 - a) / r["splits"])
        assert share <= a + 4 * se, f"share of ID p-values ≤ {a}: {share:.4f}"
        assert share >= a - 4 * se - 0.01, f"ID p-values are not uniform at {a}: {share:.4f}"
    for ood_share, fdps in r["fdp"].items():
        f = np.asarray(fdps)
        se = f.std(ddof=1) / math.sqrt(f.size)
        assert f.mean() <= q + 2 * se, f"mean FDP at {ood_share:.0%} OOD: {f.mean():.4f} ± {se:.4f}"


def test_validity_by_simulation_synthetic_scores():
    """Always runs: 200 splits of a synthetic ID pool (a skewed, tied score like saturated MSP)."""
    rng = np.random.default_rng(11)
    pool_id = np.minimum(1.0, np.round(1 - rng.gamma(1.5, 0.05, 6000), 3))  # many ties at 1.0
    pool_ood = np.round(1 - rng.gamma(3.0, 0.15, 3000), 3)
    r = simulate(pool_id, pool_ood, splits=200, n_heldout=1000, n_test_id=2000, seed=1)
    check_validity(r)


@pytest.fixture(scope="module")
def testbed_scores():
    """ODIN scores (T = 1000, ε = 0.0014) of ResNet-20 on 2,000 CIFAR-10 test images (ID) and on 600
    images of each OOD set, computed here from ../shared/data."""
    data = shared_data()
    if not (data / "cifar10_test_jpeg_yoongikim.npz").is_file():
        pytest.skip(f"../shared/data (the CIFAR-10 test bed) is not beside the repo ({data})")
    from odin_engine.loading import load_model
    from odin_engine.scorer import OdinScorer

    model = load_model("cifar_resnet20", data / "weights" / "resnet20-12fca82f.th")
    rng = np.random.default_rng(0)
    cifar = np.load(data / "cifar10_test_jpeg_yoongikim.npz")["images"]
    ood = [np.load(p)["images"] for p in sorted((data / "ood").glob("*.npz"))]
    ood_imgs = np.concatenate([o[rng.choice(len(o), 200, replace=False)] for o in ood])
    scorer = OdinScorer(model, temperature=1000.0, epsilon=0.0014, device="cpu", batch_size=250)
    id_scores = scorer.score(cifar[rng.choice(len(cifar), 2000, replace=False)])
    ood_scores = scorer.score(ood_imgs)
    return model, id_scores, ood_scores


@pytest.mark.testbed
def test_validity_by_simulation_testbed_scores(testbed_scores):
    _, id_s, ood_s = testbed_scores
    r = simulate(id_s["odin"].astype(np.float64), ood_s["odin"].astype(np.float64), splits=200, n_heldout=1000,
                 n_test_id=1000, seed=2)
    print({a: round(v, 4) for a, v in r["share_below"].items()},
          {k: round(float(np.mean(v)), 4) for k, v in r["fdp"].items()})
    check_validity(r)


@pytest.mark.testbed
def test_testbed_cli_p_values_and_bh_are_exact(testbed_scores, tmp_path, capsys):
    """`calibrate --fdr 0.1` on the test bed's scores: p_value = the formula, flags = an independent BH."""
    model, id_s, ood_s = testbed_scores

    def rows(s: dict, idx, prefix: str) -> pd.DataFrame:
        df = frame(s["odin"][idx].astype(np.float64), prefix)
        for c in ("msp", "energy", "max_logit"):
            df[c] = s[c][idx].astype(np.float64)
        return df.assign(model_id=model.model_id, temperature=1000.0, epsilon=0.0014)

    held = rows(id_s, np.arange(1000), "held")
    corpus = pd.concat([rows(id_s, np.arange(1000, 2000), "cifar"), rows(ood_s, np.arange(len(ood_s["odin"])), "ood")])
    for method in ("odin", "energy"):  # whichever method column decides
        out = tmp_path / method
        rc = cli(["calibrate", "--scores", str(write_scores(corpus, tmp_path / "c")), "--heldout-scores",
                  str(write_scores(held, tmp_path / "h", parts=3)), "--output", str(out), "--fdr", "0.1",
                  "--method", method])
        assert rc == 0
        assert "Benjamini–Hochberg at FDR 0.1" in capsys.readouterr().out
        f = open_flags(str(out)).to_pandas()
        np.testing.assert_array_equal(f["p_value"].to_numpy(), formula_p(held[method], f[method].to_numpy()))
        want = reference_bh(f["p_value"].to_numpy(), 0.1)
        np.testing.assert_array_equal(f["is_outlier"].to_numpy(bool), want)
        cal = json.loads((out / "calibration.json").read_text())
        assert cal["decision"]["rule"] == "fdr" and cal["summary"]["n_outliers"] == int(want.sum())
        assert cal["heldout_scores_sorted"] == sorted(held[method].tolist())
        print(method, "BH flags:", int(want.sum()), "of which OOD:", int(f.loc[want, "image_id"].str.startswith("ood").sum()))
        if method == "odin":  # ODIN separates these sets: BH's flags are mostly the OOD images
            assert want.sum() >= 100 and f.loc[want, "image_id"].str.startswith("ood").mean() >= 0.8


# --------------------------------------------------------------------------- the command line
def test_cli_fdr_and_conditional_record_the_rule(tmp_path, capsys):
    rng = np.random.default_rng(4)
    held = write_scores(frame(rng.normal(size=400), "h"), tmp_path / "h")
    corpus = write_scores(frame(np.concatenate([rng.normal(size=900), rng.normal(-4, 1, 100)]), "c", errors=5),
                          tmp_path / "c")
    base = ["calibrate", "--scores", str(corpus), "--heldout-scores", str(held)]
    assert cli([*base, "--output", str(tmp_path / "tpr")]) == 0
    assert cli([*base, "--output", str(tmp_path / "fdr"), "--fdr", "0.1"]) == 0
    assert cli([*base, "--output", str(tmp_path / "cc"), "--fdr", "0.1", "--conditional", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "decided by: TPR rule" in out and "BH at FDR 0.1 would flag" in out
    tpr, fdr, cc = (json.loads((tmp_path / d / "calibration.json").read_text()) for d in ("tpr", "fdr", "cc"))
    assert tpr["decision"]["rule"] == "tpr" and fdr["decision"]["rule"] == "fdr"
    assert cc["decision"]["p_value"] == "calibration-conditional (DKW)" and cc["decision"]["conditional_delta"] == 0.1
    # same corpus: the TPR rule's count is the same in every run; conditional p-values flag no more than marginal
    assert tpr["decision"]["n_flagged_tpr"] == fdr["decision"]["n_flagged_tpr"] == tpr["summary"]["n_outliers"]
    assert fdr["summary"]["n_outliers"] == fdr["decision"]["n_flagged_fdr"] == tpr["decision"]["n_flagged_fdr"]
    assert cc["summary"]["n_outliers"] <= fdr["summary"]["n_outliers"]
    summary = json.loads((tmp_path / "fdr" / "flag_summary.json").read_text())
    assert summary["overall"]["rule"] == "fdr" and summary["decision"]["fdr_q"] == 0.1
    f = open_flags(str(tmp_path / "cc")).to_pandas()
    ok = f[f["status"] == "ok"]
    want_cc = np.minimum(1.0, (formula_p(tpr["heldout_scores_sorted"], ok["odin"].to_numpy()) * 401 - 1) / 400
                         + dkw_epsilon(400, 0.1))
    np.testing.assert_allclose(ok["p_value"].to_numpy(), want_cc, rtol=1e-12)


def test_cli_refuses_bad_fdr_settings_and_writes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(4)
    held = write_scores(frame(rng.normal(size=200), "h"), tmp_path / "h")
    corpus = write_scores(frame(rng.normal(size=50), "c"), tmp_path / "c")
    base = ["calibrate", "--scores", str(corpus), "--heldout-scores", str(held)]
    for extra, msg in ((["--fdr", "0.001"], "need at least 999"), (["--fdr", "1.5"], "--fdr must be"),
                       (["--fdr", "0.1", "--conditional", "0.7"], "--conditional must be in (0, 0.5]"),
                       (["--fdr", "0.05", "--conditional", "0.1"], "need at least 461")):
        out = tmp_path / "out"
        assert cli([*base, "--output", str(out), *extra]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()
