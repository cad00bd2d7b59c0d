"""Audit history: one Parquet row per audit (local and S3), read back sorted; the report's history plot."""

from __future__ import annotations

import base64
import json
import os
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from odin_engine.decide.calibration import calibrate
from odin_engine.decide.drift import drift_test
from odin_engine.decide.flagging import prepare, summarize
from odin_engine.io.scores import ScoreTable
from odin_engine.decide.history import (HISTORY_SCHEMA, append_history, history_file_name, history_row,
                                        read_history)
from odin_engine.io.store import Store
from odin_engine.report.history import history_plot_html

T0 = datetime(2026, 11, 1, 2, 30, tzinfo=timezone.utc)


def _calibration(seed: int = 0) -> dict:
    cal = calibrate(np.random.default_rng(seed).standard_normal(200), 0.95)
    return {**cal, "method": "odin", "model_id": "cifar_resnet20@sha256:0123456789abcdef", "temperature": 1000.0,
            "epsilon": 0.0014, "created_at": "2026-10-31T12:00:00+00:00"}


def _night(cal: dict, day: int, n: int = 400, ood_share: float = 0.0, errors: int = 2, seed: int = 0):
    """An audit's results built by the real flagging code on a synthetic score table."""
    rng = np.random.default_rng(seed + day)
    n_ood = int(ood_share * n)
    scores = np.concatenate([rng.standard_normal(n - n_ood), rng.standard_normal(n_ood) - 3.0])
    corpus = pd.DataFrame({
        "image_id": [f"img{i}" for i in range(n + errors)],
        "status": ["ok"] * n + ["error"] * errors,
        "odin": np.concatenate([scores, np.full(errors, np.nan)]),
        "pred": pd.array(list(rng.integers(0, 3, n)) + [None] * errors, dtype="Int64"),
        "model_id": cal["model_id"], "temperature": 1000.0, "epsilon": 0.0014,
    })
    summary = summarize(prepare(ScoreTable.from_table(corpus), cal["delta"], "odin").stats, ["cat", "dog", "ship"])
    s = summary["overall"]
    doc = {"finished_at": (T0 + timedelta(days=day)).isoformat(timespec="seconds"), "model_spec": "cifar_resnet20",
           "model_id": cal["model_id"], "temperature": 1000.0, "epsilon": 0.0014, "method": "odin",
           "summary": s, "score_runs": {"corpus": {"source": "s3://b/incoming/", "run_id": "run 1/x"}}}
    drift = drift_test(cal, s["n_ok"], s["n_outliers"], alpha=0.01)
    return doc, drift, summary["per_class"]


def test_history_row_holds_the_audit_and_the_drift_test():
    cal = {**_calibration(), "frozen_from": "s3://b/cal/calibration.json"}
    doc, drift, per_class = _night(cal, 0)
    row = history_row(doc, cal, drift, per_class, output="s3://b/audits/rn20/")
    assert set(row) == set(HISTORY_SCHEMA.names)
    assert row["n_images"] == 402 and row["n_ok"] == 400 and row["n_error"] == 2
    assert row["n_flagged"] == doc["summary"]["n_outliers"] and row["flag_rate"] == row["n_flagged"] / 400
    assert row["p_value"] == drift["p_value"] and row["alarm"] is drift["alarm"] and row["alpha"] == 0.01
    assert row["expected_rate_lo"] < row["expected_rate"] < row["expected_rate_hi"]
    assert row["calibration_from"] == "s3://b/cal/calibration.json" and row["delta"] == cal["delta"]
    assert json.loads(row["run_ids"]) == {"corpus": "run 1/x"}
    classes = json.loads(row["per_class"])
    assert {c["class_name"] for c in classes} == {"cat", "dog", "ship"} and sum(c["n"] for c in classes) == 400
    assert history_file_name(row) == "audit-20261101T023000Z-run_1_x.parquet"
    with pytest.raises(ValueError, match="not the audit's"):
        history_row(doc, cal, drift_test(cal, 400, 0), per_class)


def _append_nights(store: Store, cal: dict, days, ood_day: int | None = 3) -> list[dict]:
    rows = []
    for day in days:  # written out of order: the reader sorts by time
        doc, drift, per_class = _night(cal, day, ood_share=0.34 if day == ood_day else 0.0)
        rows.append(history_row(doc, cal, drift, per_class))
        append_history(store, rows[-1])
    return rows


def test_append_and_read_local(tmp_path):
    store = Store(str(tmp_path / "history"))
    assert read_history(store).empty and list(read_history(store).columns) == HISTORY_SCHEMA.names
    cal = _calibration()
    _append_nights(store, cal, [2, 0, 3, 1])
    names = sorted(os.listdir(tmp_path / "history"))
    assert len(names) == 4 and all(re.fullmatch(r"audit-\d{8}T\d{6}Z-run_1_x\.parquet", n) for n in names)
    df = read_history(store)
    assert len(df) == 4 and df["finished_at"].is_monotonic_increasing
    assert df["alarm"].tolist() == [False, False, False, True]  # the night with a third OOD images
    assert df.loc[3, "p_value"] < 1e-6 and df.loc[:2, "p_value"].min() > 0.01
    # each file is a Parquet table in the documented schema, readable without odin-audit
    t = pq.read_table(tmp_path / "history" / names[0])
    assert t.schema.equals(HISTORY_SCHEMA, check_metadata=False) and t.num_rows == 1


def test_a_night_without_ok_images_and_without_alpha(tmp_path):
    cal = _calibration()
    doc, _, _ = _night(cal, 0, n=0, errors=5)
    row = history_row(doc, cal, drift_test(cal, 0, 0), [])
    append_history(Store(str(tmp_path)), row)
    df = read_history(Store(str(tmp_path)))
    assert len(df) == 1 and df.loc[0, "n_error"] == 5
    assert pd.isna(df.loc[0, "p_value"]) and pd.isna(df.loc[0, "alarm"]) and pd.isna(df.loc[0, "flag_rate"])
    assert "<img" in history_plot_html(df)


def test_older_files_missing_a_column_still_read(tmp_path):
    """A file written before a column existed comes back with that column null."""
    cal = _calibration()
    doc, drift, per_class = _night(cal, 1)
    row = history_row(doc, cal, drift, per_class)
    doc, drift, per_class = _night(cal, 0)
    legacy = pa.Table.from_pylist([history_row(doc, cal, drift, per_class)], schema=HISTORY_SCHEMA)
    pq.write_table(legacy.drop_columns(["predicted_rate_lo", "predicted_rate_hi"]),
                   tmp_path / "audit-20261101T023000Z-old.parquet")
    append_history(Store(str(tmp_path)), row)
    df = read_history(Store(str(tmp_path)))
    assert len(df) == 2 and pd.isna(df.loc[0, "predicted_rate_lo"]) and df.loc[1, "predicted_rate_lo"] > 0


def test_append_and_read_on_s3(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    store = Store(f"s3://{s3_bucket}/history/rn20")
    assert read_history(store).empty
    cal = _calibration()
    rows = _append_nights(store, cal, [1, 0])
    uri = append_history(store, rows[0])  # the same audit again: the same file, not a second row
    assert uri == f"s3://{s3_bucket}/history/rn20/{history_file_name(rows[0])}"
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
            if not o["Key"].endswith("/")]  # pyarrow's create_dir leaves "directory" markers
    assert sorted(keys) == sorted(f"history/rn20/{history_file_name(r)}" for r in rows)
    df = read_history(store)
    assert len(df) == 2 and df["finished_at"].is_monotonic_increasing


def _png_of(html_text: str) -> bytes:
    m = re.search(r'src="data:image/png;base64,([^"]+)"', html_text)
    assert m, html_text[:500]
    return base64.b64decode(m.group(1))


@pytest.mark.parametrize("nights", [1, 40])
def test_history_plot_renders(tmp_path, nights):
    store = Store(str(tmp_path))
    cal = _calibration()
    _append_nights(store, cal, range(nights), ood_day=nights - 2)
    df = read_history(store)
    html_text = history_plot_html(df)
    png = _png_of(html_text)
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    assert f"{nights} audit(s); {int(nights > 1)} drift alarm(s) at α = 0.01" in html_text
    assert html_text.count("<tr>") == 1 + min(nights, 30)  # header + latest rows
    assert ("ALARM" in html_text) is (nights > 1)
    assert history_plot_html(df.iloc[0:0]) == ""
