"""δ calibration: the threshold, its confidence interval, the minimum held-out size, settings checks, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import beta

from _odin_helpers import noise_images, score_frame, smooth_images, tiny_model, write_scores
from jobs.cli import main as cli
from odin_engine.decide.calibration import calibrate, calibrate_tables, min_heldout, tpr_interval
from odin_engine.io.results import open_flags
from odin_engine.io.scores import ScoreTable
from odin_engine.settings import CalibrationSettings
from odin_engine.errors import ConfigError
from odin_engine.metrics import threshold_at_tpr


def calibrate_frames(corpus, heldout, tpr=0.95, method="odin"):
    return calibrate_tables(ScoreTable.from_table(corpus), ScoreTable.from_table(heldout), CalibrationSettings(tpr, method))


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cal")
    model, weights = tiny_model(tmp)
    heldout = score_frame(model, smooth_images(130, 1), prefix="held", split="heldout", errors=3)
    corpus = score_frame(model, np.concatenate([smooth_images(30, 2), noise_images(10, 3)]), prefix="corp", errors=2)
    return {"model": model, "weights": weights, "heldout": heldout, "corpus": corpus, "tmp": tmp}


def test_delta_is_largest_threshold_keeping_target_tpr():
    rng = np.random.default_rng(0)
    for n in (100, 101, 257, 1000):
        s = rng.normal(size=n)
        cal = calibrate(s, 0.95)
        d = cal["delta"]
        assert d == threshold_at_tpr(s, 0.95)
        assert np.mean(s >= d) >= 0.95
        above = s[s > d]
        assert np.mean(s >= above.min()) < 0.95  # the next larger threshold loses the target
        assert cal["achieved_tpr"] == np.mean(s >= d)
        assert cal["n_heldout"] == n


def test_interval_is_the_order_statistic_beta_and_covers_new_data():
    n, tpr = 200, 0.95
    k = int(np.ceil(tpr * n))
    lo, hi = tpr_interval(n, k)
    assert (lo, hi) == pytest.approx((beta.ppf(0.025, k, n - k + 1), beta.ppf(0.975, k, n - k + 1)))
    assert lo < tpr < hi
    # Simulation: ID scores ~ U(0,1), so the TPR δ achieves on new ID data is exactly 1 − δ.
    rng = np.random.default_rng(42)
    sims = 4000
    achieved = np.array([1.0 - calibrate(rng.uniform(size=n), tpr)["delta"] for _ in range(sims)])
    inside = np.mean((achieved >= lo) & (achieved <= hi))
    assert 0.935 <= inside <= 0.965  # 95% ± ~4.4 binomial standard errors
    assert achieved.mean() == pytest.approx(k / (n + 1), abs=0.002)


def test_minimum_heldout_size_is_derived_and_enforced():
    assert min_heldout(0.95) == 100
    assert min_heldout(0.90) == 50
    assert min_heldout(0.99) == 500
    s = np.linspace(0, 1, 99)
    with pytest.raises(ConfigError, match="at least 100"):
        calibrate(s, 0.95)
    assert calibrate(np.linspace(0, 1, 100), 0.95)["n_heldout"] == 100
    for bad in (0.0, 1.0, 1.5, float("nan"), "x", None):
        with pytest.raises(ConfigError, match="tpr") as err:
            calibrate(np.linspace(0, 1, 1000), bad)
        assert err.value.parameter == "tpr" and "--" not in str(err.value)  # the engine names the parameter


def test_calibrate_frames_uses_ok_heldout_rows_and_records_settings(frames):
    cal = calibrate_frames(frames["corpus"], frames["heldout"], tpr=0.95, method="odin")
    ok = frames["heldout"][frames["heldout"]["status"] == "ok"]["odin"].to_numpy()
    assert cal["delta"] == threshold_at_tpr(ok, 0.95)
    assert cal["n_heldout"] == 127 and cal["n_heldout_errors"] == 3
    assert cal["model_id"] == frames["model"].model_id
    assert (cal["temperature"], cal["epsilon"], cal["method"]) == (1000.0, 0.0014, "odin")
    lo, hi = cal["tpr_ci"]
    assert lo < cal["target_tpr"] < hi


@pytest.mark.parametrize("column,value", [("temperature", 1.0), ("epsilon", 0.0), ("model_id", "other@sha256:0")])
def test_different_settings_are_refused(frames, column, value):
    held = frames["heldout"].copy()
    held[column] = value
    with pytest.raises(ConfigError, match=column):
        calibrate_frames(frames["corpus"], held)


def test_mixed_settings_within_one_set_are_refused(frames):
    held = frames["heldout"].copy()
    held.loc[held.index[:5], "epsilon"] = 0.002
    with pytest.raises(ConfigError, match="mix"):
        calibrate_frames(frames["corpus"], held)


def test_cli_writes_calibration_and_flags(frames, tmp_path, capsys):
    corpus_dir = write_scores(frames["corpus"], tmp_path / "corpus")
    held_dir = write_scores(frames["heldout"], tmp_path / "held", parts=3)
    out = tmp_path / "out"
    rc = cli(["calibrate", "--scores", str(corpus_dir), "--heldout-scores", str(held_dir), "--output", str(out)])
    assert rc == 0
    cal = json.loads((out / "calibration.json").read_text())
    for key in ("delta", "target_tpr", "achieved_tpr", "n_heldout", "tpr_ci", "model_id", "temperature",
                "epsilon", "method", "min_heldout"):
        assert key in cal
    flags = open_flags(str(out)).to_pandas()
    assert len(flags) == len(frames["corpus"])
    ok = flags[flags["status"] == "ok"]
    assert (ok["is_outlier"] == (ok["odin"] < cal["delta"])).all()
    assert cal["summary"]["n_outliers"] == int(ok["is_outlier"].sum())
    assert "flagged" in capsys.readouterr().out


def test_extra_columns_of_types_delta_refuses_become_delta_types_in_the_flags(frames, tmp_path):
    """A score dataset written by pandas (timestamp[ns]) with unsigned, float16, duration and
    dictionary columns: the flags' Delta table stores each in the nearest type Delta has, values kept."""
    import pyarrow as pa
    from deltalake import DeltaTable

    df = frames["corpus"].copy()
    n = len(df)
    df["captured_at"] = pd.Timestamp("2026-12-05 01:02:03.123456789") + pd.to_timedelta(np.arange(n), "s")
    df["camera"] = np.full(n, 255, np.uint8)
    df["big"] = np.full(n, 2**63 + 5, np.uint64)
    df["gain"] = np.full(n, 1.5, np.float16)
    df["exposure"] = pd.to_timedelta(np.arange(n), "ms")
    df["site"] = pd.Categorical(["north", "south"] * (n // 2) + ["north"] * (n % 2))
    corpus_dir = write_scores(df, tmp_path / "corpus")
    held_dir = write_scores(frames["heldout"], tmp_path / "held")
    out = tmp_path / "out"
    assert cli(["calibrate", "--scores", str(corpus_dir), "--heldout-scores", str(held_dir), "--output", str(out)]) == 0
    t = DeltaTable(str(out / "flags")).to_pyarrow_table().sort_by("image_id")
    types = {name: t.schema.field(name).type for name in ("captured_at", "camera", "big", "gain", "exposure", "site")}
    assert types == {"captured_at": pa.timestamp("us"), "camera": pa.int16(), "big": pa.decimal128(20, 0),
                     "gain": pa.float32(), "exposure": pa.int64(), "site": pa.string()}
    want = df.sort_values("image_id").reset_index(drop=True)
    assert t.column("camera").to_pylist() == [255] * n and t.column("gain").to_pylist() == [1.5] * n
    assert [int(v) for v in t.column("big").to_pylist()] == [2**63 + 5] * n
    in_us = pa.array(want["captured_at"].values.astype("datetime64[us]"))
    assert t.column("captured_at").to_pylist() == in_us.to_pylist()
    assert t.column("exposure").to_pylist() == [int(v / pd.Timedelta(1, "us")) for v in want["exposure"]]
    assert t.column("site").to_pylist() == list(want["site"].astype(str))
    assert open_flags(str(out)).read().num_rows == n


def test_cli_bad_configuration_exits_2_and_writes_nothing(frames, tmp_path, capsys):
    corpus_dir = write_scores(frames["corpus"], tmp_path / "corpus")
    few = write_scores(frames["heldout"].iloc[:60], tmp_path / "few")
    other_t = frames["heldout"].copy()
    other_t["temperature"] = 10.0
    mism = write_scores(other_t, tmp_path / "mism")
    held = write_scores(frames["heldout"], tmp_path / "held")
    dup = write_scores(pd.concat([frames["corpus"], frames["corpus"].iloc[:3]]), tmp_path / "dup")
    cases = [
        (["--scores", str(corpus_dir), "--heldout-scores", str(few)], "at least 100"),
        (["--scores", str(corpus_dir), "--heldout-scores", str(mism)], "temperature"),
        (["--scores", str(corpus_dir), "--heldout-scores", str(tmp_path / "nope")], "not found"),
        (["--scores", str(corpus_dir), "--heldout-scores", str(few), "--tpr", "95"], "--tpr must be"),
        (["--scores", str(corpus_dir), "--heldout-scores", str(held), "--output", str(corpus_dir / "scores" /
                                                                                    "part-000.parquet")], "is a file"),
        (["--heldout-scores", str(few)], "--scores"),
        (["--scores", str(dup), "--heldout-scores", str(held)], "more than once"),
    ]
    for i, (argv, msg) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert cli(["calibrate", "--output", str(out), *argv]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()


def test_calibrated_threshold_holds_on_fresh_in_distribution_images(frames):
    """δ from one ID sample keeps about the target share of a second, independent ID sample."""
    model = frames["model"]
    held = score_frame(model, smooth_images(300, 11), epsilon=0.0, prefix="h")
    fresh = score_frame(model, smooth_images(300, 12), epsilon=0.0, prefix="f")
    cal = calibrate_frames(fresh, held, tpr=0.95, method="msp")
    kept = float(np.mean(fresh["msp"] >= cal["delta"]))
    lo, hi = cal["tpr_ci"]
    # the fresh sample's share carries its own binomial noise (s.e. ≈ 1.3% at n=300): widen by 3 s.e.
    se = np.sqrt(0.95 * 0.05 / len(fresh))
    assert lo - 3 * se <= kept <= hi + 3 * se


def test_calibrating_does_not_import_scikit_learn():
    """`calibrate` and `audit` need only threshold_at_tpr from odin_engine.metrics: scikit-learn (~1 s to
    import, for the AUROC/AUPR metrics) is not loaded by a calibration, nor scipy.stats (~0.55 s, half
    of a small `calibrate`: the TPR interval's quantiles come from scipy.special)."""
    code = ("import sys, numpy as np; from odin_engine.decide.calibration import calibrate; "
            "calibrate(np.random.default_rng(0).standard_normal(200), 0.95); "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'; "
            "assert 'scipy.stats' not in sys.modules, 'scipy.stats imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
