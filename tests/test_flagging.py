"""Flags: every corpus row kept, outliers are score < δ, errors stay errors, exact global ranks in
bounded memory (several rank ranges, ties, a tied run larger than the budget), many part files,
summaries, the gallery's top-k and the histogram."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from _odin_helpers import noise_images, score_frame, smooth_images, tiny_model
from odin_engine.decide.calibration import calibrate_tables
from odin_engine.decide.flagging import ScoreError, prepare, summarize, write_flags
from odin_engine.errors import ConfigError
from odin_engine.io.scores import ScoreTable
from odin_engine.io.store import Store
from odin_engine.settings import CalibrationSettings


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    model, _ = tiny_model(tmp_path_factory.mktemp("flag"))
    heldout = score_frame(model, smooth_images(100, 1), epsilon=0.0, prefix="held")
    corpus = score_frame(model, np.concatenate([smooth_images(40, 2), noise_images(20, 3)]), epsilon=0.0,
                         prefix="corp", errors=4)
    cal = calibrate_tables(ScoreTable.from_table(corpus), ScoreTable.from_table(heldout),
                           CalibrationSettings(0.95, "msp"))
    return corpus, cal, heldout


def run_flags(corpus: pd.DataFrame, delta: float, method: str, out_dir, **kw):
    budget = kw.pop("budget", 1 << 22)
    plan = prepare(ScoreTable.from_table(corpus), delta, method, budget=budget)
    result = write_flags(plan, Store(str(out_dir)), **kw)
    return plan, result, pd.read_parquet(out_dir)


def test_every_row_is_kept_and_outliers_are_below_delta(scored, tmp_path):
    corpus, cal, _ = scored
    d = cal["delta"]
    _, _, f = run_flags(corpus, d, "msp", tmp_path / "flags")
    assert len(f) == len(corpus) and sorted(f["image_id"]) == sorted(corpus["image_id"])
    ok = f[f["status"] == "ok"]
    assert len(ok) == len(corpus) - 4
    assert (ok["is_outlier"].astype(bool) == (ok["msp"] < d)).all()
    np.testing.assert_allclose(ok["margin"].astype(float), ok["msp"] - d, rtol=1e-12)
    np.testing.assert_array_equal(ok["score"], ok["msp"])
    # δ is one of the held-out scores, so "reaches δ" (score >= δ) is not an outlier
    one = corpus.iloc[:1].assign(msp=d)
    _, _, g = run_flags(one, d, "msp", tmp_path / "one")
    assert not g["is_outlier"].iloc[0]


def test_errors_stay_errors(scored, tmp_path):
    corpus, cal, _ = scored
    _, result, f = run_flags(corpus, cal["delta"], "msp", tmp_path / "flags")
    err = f[f["status"] == "error"]
    assert len(err) == 4
    assert err["is_outlier"].isna().all() and err["margin"].isna().all() and err["rank"].isna().all()
    assert (err["error"] == "cannot identify image file").all()
    assert sorted(i for i, _ in result.errors) == sorted(err["image_id"])
    # a row claiming 'ok' without a score is a damaged table, refused before anything is written
    broken = corpus.copy()
    broken.loc[0, "msp"] = np.nan
    with pytest.raises(ScoreError, match="no finite msp"):
        prepare(ScoreTable.from_table(broken), cal["delta"], "msp")
    with pytest.raises(ConfigError, match="odin"):
        prepare(ScoreTable.from_table(corpus.drop(columns=["odin"])), cal["delta"], "odin")


def _synthetic(n: int, seed: int, ties: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n)
    if ties:  # a few heavily repeated values, one of them repeated more often than the budget below
        s[: n // 3] = rng.choice([-0.5, 0.25, 1.0], n // 3)
        s[n // 3: n // 3 + 40] = 0.7
    status = np.where(rng.uniform(size=n) < 0.05, "error", "ok")
    return pd.DataFrame({
        "image_id": [f"img-{i:06d}" for i in range(n)], "uri": "x", "status": status,
        "error": np.where(status == "error", "broken", None), "pred": rng.integers(0, 4, n),
        "odin": np.where(status == "ok", s, np.nan), "model_id": "m", "temperature": 1000.0, "epsilon": 0.0,
    })


@pytest.mark.parametrize("budget", [10_000, 37, 5])
@pytest.mark.parametrize("ties", [False, True])
def test_rank_is_the_exact_global_rank_whatever_the_budget(tmp_path, budget, ties):
    corpus = _synthetic(1500, 7, ties)
    plan, result, f = run_flags(corpus, 0.1, "odin", tmp_path / "flags", budget=budget, rows_per_file=200)
    ok = f[f["status"] == "ok"]
    want = ok["odin"].rank(method="min").astype("int64")
    np.testing.assert_array_equal(ok["rank"].astype("int64"), want)
    assert ok["rank"].min() == 1 and (f["status"] == "error").sum() == f["rank"].isna().sum()
    assert len(f) == len(corpus) and f["image_id"].is_unique
    if budget < 1000:  # the plan needed several ranges, none holding more values than the budget
        assert len(plan.ranges) > 1
        assert all(r.count <= budget or r.tied for r in plan.ranges)
        assert sum(r.count for r in plan.ranges) == len(ok)
    assert len(result.files) >= len(corpus) // 200  # many files of at most rows_per_file rows
    assert all(len(pd.read_parquet(p)) <= 200 for p in result.files)


def test_gallery_is_the_lowest_scores_and_histogram_counts_every_ok_row(tmp_path):
    corpus = _synthetic(900, 3, ties=True)
    edges = np.linspace(corpus["odin"].min(), corpus["odin"].max(), 17)
    _, result, f = run_flags(corpus, 0.0, "odin", tmp_path / "flags", budget=50, gallery=12, hist_edges=edges)
    ok = f[f["status"] == "ok"].sort_values(["score", "image_id"])
    got = result.gallery.to_pandas()
    assert list(got["image_id"]) == list(ok["image_id"].head(12))
    assert list(got["rank"]) == list(ok["rank"].head(12))
    np.testing.assert_array_equal(result.histogram, np.histogram(ok["odin"], edges)[0])


def test_summary_overall_and_per_class(scored, tmp_path):
    corpus, cal, _ = scored
    plan, _, f = run_flags(corpus, cal["delta"], "msp", tmp_path / "flags")
    s = summarize(plan.stats, class_names=[f"c{i}" for i in range(10)])
    ok = f[f["status"] == "ok"]
    assert s["overall"] == {
        "n_rows": len(f), "n_ok": len(ok), "n_error": 4,
        "n_outliers": int((ok["msp"] < cal["delta"]).sum()),
        "outlier_rate": float((ok["msp"] < cal["delta"]).mean()),
        "rule": "tpr", "n_flagged_tpr": int((ok["msp"] < cal["delta"]).sum()), "n_flagged_fdr": None, "fdr_q": None,
    }
    assert sum(c["n"] for c in s["per_class"]) == len(ok)
    assert sum(c["n_outliers"] for c in s["per_class"]) == s["overall"]["n_outliers"]
    for c in s["per_class"]:
        g = ok[ok["pred"] == c["pred"]]
        assert c["n"] == len(g) and c["outlier_rate"] == pytest.approx((g["msp"] < cal["delta"]).mean())
        assert c["class_name"] == f"c{c['pred']}"


def test_written_flags_keep_nulls_and_leave_no_temp_file(scored, tmp_path):
    corpus, cal, _ = scored
    _, result, back = run_flags(corpus, cal["delta"], "msp", tmp_path / "flags")
    assert back["is_outlier"].isna().sum() == 4 and back["rank"].isna().sum() == 4
    import pyarrow.parquet as pq

    schema = pq.read_schema(result.files[0])
    assert schema.field("is_outlier").type == pa.bool_() and schema.field("rank").type == pa.int64()
    assert not list((tmp_path / "flags").glob(".*"))  # no temp file left behind


def test_corpus_of_only_errors_is_calibrated_and_flagged_as_errors(scored, tmp_path):
    corpus, _, heldout = scored
    all_err = corpus[corpus["status"] == "error"]
    cal = calibrate_tables(ScoreTable.from_table(all_err), ScoreTable.from_table(heldout),
                           CalibrationSettings(0.95, "msp"))
    plan, result, f = run_flags(all_err, cal["delta"], "msp", tmp_path / "flags")
    s = summarize(plan.stats)
    assert s["overall"] == {"n_rows": 4, "n_ok": 0, "n_error": 4, "n_outliers": 0, "outlier_rate": None, "rule": "tpr",
                            "n_flagged_tpr": 0, "n_flagged_fdr": None, "fdr_q": None}
    assert f["is_outlier"].isna().all() and (f["status"] == "error").all()
    assert result.gallery.num_rows == 0
