"""Flags: every corpus row kept, outliers are score < δ, errors stay errors, ranks and summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _odin_helpers import noise_images, score_frame, smooth_images, tiny_model
from odin_engine.decide.calibration import calibrate_frames
from odin_engine.errors import ConfigError
from odin_engine.decide.flagging import flag, summarize, write_flags


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    model, _ = tiny_model(tmp_path_factory.mktemp("flag"))
    heldout = score_frame(model, smooth_images(100, 1), epsilon=0.0, prefix="held")
    corpus = score_frame(model, np.concatenate([smooth_images(40, 2), noise_images(20, 3)]), epsilon=0.0,
                         prefix="corp", errors=4)
    cal = calibrate_frames(corpus, heldout, tpr=0.95, method="msp")
    return corpus, cal, heldout


def test_every_row_is_kept_and_outliers_are_below_delta(scored):
    corpus, cal, _ = scored
    d = cal["delta"]
    f = flag(corpus, d, "msp")
    assert len(f) == len(corpus) and list(f["image_id"]) == list(corpus["image_id"])
    ok = f[f["status"] == "ok"]
    assert len(ok) == len(corpus) - 4
    assert (ok["is_outlier"].astype(bool) == (ok["msp"] < d)).all()
    np.testing.assert_allclose(ok["margin"].astype(float), ok["msp"] - d, rtol=1e-12)
    # δ is one of the held-out scores, so "reaches δ" (score >= δ) is not an outlier
    assert not flag(pd.DataFrame({"image_id": ["x"], "status": ["ok"], "msp": [d]}), d, "msp")["is_outlier"].iloc[0]


def test_errors_stay_errors(scored):
    corpus, cal, _ = scored
    f = flag(corpus, cal["delta"], "msp")
    err = f[f["status"] == "error"]
    assert len(err) == 4
    assert err["is_outlier"].isna().all() and err["margin"].isna().all() and err["rank"].isna().all()
    assert (err["error"] == "cannot identify image file").all()
    # a row claiming 'ok' without a score is a bug upstream, not an in-distribution image
    broken = corpus.copy()
    broken.loc[0, "msp"] = np.nan
    with pytest.raises(ValueError, match="no finite msp"):
        flag(broken, cal["delta"], "msp")
    with pytest.raises(ConfigError):
        flag(corpus.drop(columns=["odin"]), cal["delta"], "odin")


def test_rank_one_is_the_most_anomalous(scored):
    corpus, cal, _ = scored
    f = flag(corpus, cal["delta"], "msp")
    ok = f[f["status"] == "ok"].sort_values("rank")
    assert ok["rank"].iloc[0] == 1
    assert ok["msp"].iloc[0] == ok["msp"].min()
    assert ok["msp"].is_monotonic_increasing
    assert set(ok["rank"].astype(int)) <= set(range(1, len(ok) + 1))


def test_summary_overall_and_per_class(scored):
    corpus, cal, _ = scored
    f = flag(corpus, cal["delta"], "msp")
    s = summarize(f, class_names=[f"c{i}" for i in range(10)])
    ok = f[f["status"] == "ok"]
    assert s["overall"] == {
        "n_rows": len(f), "n_ok": len(ok), "n_error": 4,
        "n_outliers": int((ok["msp"] < cal["delta"]).sum()),
        "outlier_rate": float((ok["msp"] < cal["delta"]).mean()),
    }
    assert sum(c["n"] for c in s["per_class"]) == len(ok)
    assert sum(c["n_outliers"] for c in s["per_class"]) == s["overall"]["n_outliers"]
    for c in s["per_class"]:
        g = ok[ok["pred"] == c["pred"]]
        assert c["n"] == len(g) and c["outlier_rate"] == pytest.approx((g["msp"] < cal["delta"]).mean())
        assert c["class_name"] == f"c{c['pred']}"


def test_written_flags_keep_nulls(scored, tmp_path):
    corpus, cal, _ = scored
    path = write_flags(flag(corpus, cal["delta"], "msp"), tmp_path)
    back = pd.read_parquet(path)
    assert back["is_outlier"].isna().sum() == 4
    assert back["rank"].isna().sum() == 4
    assert str(back["is_outlier"].dtype) == "boolean"
    assert not list(tmp_path.glob("flags/.*"))  # no temp file left behind



def test_corpus_of_only_errors_is_calibrated_and_flagged_as_errors(scored):
    corpus, _, heldout = scored
    all_err = corpus[corpus["status"] == "error"]
    cal = calibrate_frames(all_err, heldout, tpr=0.95, method="msp")
    f = flag(all_err, cal["delta"], "msp")
    s = summarize(f)
    assert s["overall"] == {"n_rows": 4, "n_ok": 0, "n_error": 4, "n_outliers": 0, "outlier_rate": None}
    assert f["is_outlier"].isna().all() and (f["status"] == "error").all()
