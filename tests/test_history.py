"""Audit history: a Delta table, one version per audit (local and S3), read back sorted and as of an
audit; the earlier per-audit files read, and converted by the first append; the report's history plot."""

from __future__ import annotations

import base64
import json
import posixpath
import re
import sys
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
from odin_engine.decide.history import (CONVERTED_KEY, HISTORY_KEY, HISTORY_SCHEMA, append_history, check_history,
                                        history_file_name, history_key, history_row, read_history)
from odin_engine.errors import ConfigError
from odin_engine.io.maintenance import AUDIT_ID_KEY, locate
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
        append_history(store, rows[-1], audit_id=f"result-{day}")
    return rows


def _commits(uri: str) -> dict[int, dict]:
    """The table's commits by version (their metadata), local or S3 (the reader's storage options)."""
    return {c["version"]: c for c in locate(uri).open().history()}


def test_append_and_read_local(tmp_path):
    import deltalake

    store = Store(str(tmp_path / "history"))
    assert read_history(store).empty and list(read_history(store).columns) == HISTORY_SCHEMA.names
    cal = _calibration()
    rows = _append_nights(store, cal, [2, 0, 3, 1])
    commits = _commits(store.uri())
    assert sorted(commits) == [0, 1, 2, 3]  # one version per audit, carrying its result id and row key
    assert [(commits[v][AUDIT_ID_KEY], commits[v][HISTORY_KEY]) for v in range(4)] == \
        [(f"result-{d}", history_key(r)) for d, r in zip([2, 0, 3, 1], rows)]
    df = read_history(store)
    assert len(df) == 4 and df["finished_at"].is_monotonic_increasing
    assert df["alarm"].tolist() == [False, False, False, True]  # the night with a third OOD images
    assert df.loc[3, "p_value"] < 1e-6 and df.loc[:2, "p_value"].min() > 0.01
    # a Delta table in the documented schema, readable without odin-audit
    t = deltalake.DeltaTable(store.uri()).to_pyarrow_table()
    assert t.num_rows == 4 and t.schema.names == HISTORY_SCHEMA.names
    assert t.cast(HISTORY_SCHEMA).sort_by("finished_at").to_pandas().equals(df)
    # time travel: the history as the audit of day 0 left it (nights 2 and 0), as version 0 (night 2)
    assert read_history(store, as_of="result-0")["finished_at"].tolist() == sorted(
        [rows[1]["finished_at"], rows[0]["finished_at"]])
    assert len(read_history(store, as_of=0)) == 1
    append_history(store, rows[2], audit_id="result-3")  # a retried append: not a second row, no new version
    assert len(read_history(store)) == 4 and sorted(_commits(store.uri())) == [0, 1, 2, 3]


def test_a_night_without_ok_images_and_without_alpha(tmp_path):
    cal = _calibration()
    doc, _, _ = _night(cal, 0, n=0, errors=5)
    row = history_row(doc, cal, drift_test(cal, 0, 0), [])
    append_history(Store(str(tmp_path)), row)
    df = read_history(Store(str(tmp_path)))
    assert len(df) == 1 and df.loc[0, "n_error"] == 5
    assert pd.isna(df.loc[0, "p_value"]) and pd.isna(df.loc[0, "alarm"]) and pd.isna(df.loc[0, "flag_rate"])
    assert "<img" in history_plot_html(df)


def test_older_files_missing_a_column_are_read_and_converted(tmp_path):
    """A per-audit file written before a column existed comes back with that column null, before and
    after the first Delta append converts the folder."""
    cal = _calibration()
    doc, drift, per_class = _night(cal, 1)
    row = history_row(doc, cal, drift, per_class)
    doc, drift, per_class = _night(cal, 0)
    legacy = pa.Table.from_pylist([history_row(doc, cal, drift, per_class)], schema=HISTORY_SCHEMA)
    old = tmp_path / "audit-20261101T023000Z-old.parquet"
    pq.write_table(legacy.drop_columns(["predicted_rate_lo", "predicted_rate_hi"]), old)
    first = read_history(Store(str(tmp_path)))
    assert len(first) == 1 and pd.isna(first.loc[0, "predicted_rate_lo"])
    append_history(Store(str(tmp_path)), row, audit_id="r1")
    df = read_history(Store(str(tmp_path)))
    assert len(df) == 2 and pd.isna(df.loc[0, "predicted_rate_lo"]) and df.loc[1, "predicted_rate_lo"] > 0
    commits = _commits(str(tmp_path))
    assert sorted(commits) == [0, 1] and "1 per-audit Parquet files" in commits[0][CONVERTED_KEY]
    assert commits[1][AUDIT_ID_KEY] == "r1" and old.is_file()  # the old file is left (no version names it)
    assert read_history(Store(str(tmp_path)), as_of=0).drop(columns=["predicted_rate_lo", "predicted_rate_hi"]).equals(
        first.drop(columns=["predicted_rate_lo", "predicted_rate_hi"]))


def test_append_and_read_on_s3(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    store = Store(f"s3://{s3_bucket}/history/rn20")
    assert read_history(store).empty
    cal = _calibration()
    rows = _append_nights(store, cal, [1, 0])
    assert append_history(store, rows[0]) == f"s3://{s3_bucket}/history/rn20"  # the same audit again: no second row
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
            if not o["Key"].endswith("/")]  # pyarrow's create_dir leaves "directory" markers
    assert sorted(k.rsplit("/", 1)[1] for k in keys if "_delta_log" in k) == ["00000000000000000000.json",
                                                                            "00000000000000000001.json"]
    assert len([k for k in keys if k.endswith(".parquet")]) == 2 and not any("audit-" in k for k in keys)
    df = read_history(store)
    assert len(df) == 2 and df["finished_at"].is_monotonic_increasing
    assert read_history(store, as_of="result-1")["finished_at"].tolist() == [rows[0]["finished_at"]]


def _write_per_audit_files(store: Store, cal: dict, days) -> list[dict]:
    """The earlier layout, as an older odin-audit wrote it: one Parquet file per audit, named by
    :func:`history_file_name`, in :data:`HISTORY_SCHEMA`."""
    rows = []
    for day in days:
        doc, drift, per_class = _night(cal, day)
        rows.append(history_row(doc, cal, drift, per_class))
        store.write_parquet(history_file_name(rows[-1]), pa.Table.from_pylist([rows[-1]], schema=HISTORY_SCHEMA))
    return rows


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_folder_of_per_audit_files_stays_readable_and_the_first_append_converts_it(
        where, tmp_path, monkeypatch, request):
    """An existing history in the earlier layout is read as it is, and the first append converts it:
    nothing lost, nothing doubled, the old nights still readable as of version 0."""
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        store = Store(f"s3://{request.getfixturevalue('s3_bucket')}/history/rn20")
    else:
        store = Store(str(tmp_path / "history"))
    cal = _calibration()
    old = _write_per_audit_files(store, cal, [0, 1, 2])
    assert read_history(store)["finished_at"].tolist() == [r["finished_at"] for r in old]
    with pytest.raises(ConfigError, match="not a Delta table .* no versions"):
        read_history(store, as_of=0)
    new = _append_nights(store, cal, [3])
    df = read_history(store)
    assert df["finished_at"].tolist() == [r["finished_at"] for r in old + new]
    commits = _commits(store.uri())
    assert sorted(commits) == [0, 1] and "3 per-audit Parquet files" in commits[0][CONVERTED_KEY]
    assert len(read_history(store, as_of=0)) == 3 and len(read_history(store, as_of="result-3")) == 4
    append_history(store, old[1])  # a row that was one of the converted files: not appended again
    assert len(read_history(store)) == 4 and len(_commits(store.uri())) == 2
    assert {posixpath.basename(i.path) for i in store.listdir()} >= {history_file_name(r) for r in old}  # left
    with monkeypatch.context() as mp:  # deltalake missing: refused before anything is written
        mp.setitem(sys.modules, "deltalake", None)
        for call in (lambda: check_history(store), lambda: append_history(store, new[0])):
            with pytest.raises(ConfigError, match="needs the deltalake package"):
                call()


def test_a_file_as_history_is_refused(tmp_path):
    (tmp_path / "h").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_history(Store(str(tmp_path / "h")))


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


def test_two_audits_appending_at_once_both_land(tmp_path):
    """Two processes append 5 nights each to one history at the same moment: delta-rs retries the
    appends that lost a race, so every row lands once, one version each."""
    import pickle
    import subprocess
    import time

    from conftest import REPO

    cal = _calibration()
    store = Store(str(tmp_path / "history"))
    _append_nights(store, cal, [0])  # the table exists: the race is between appends
    batches = {}
    for who, days in (("a", range(1, 6)), ("b", range(6, 11))):
        rows = []
        for day in days:
            doc, drift, per_class = _night(cal, day)
            rows.append(history_row(doc, cal, drift, per_class))
        (tmp_path / f"{who}.pkl").write_bytes(pickle.dumps(rows))
        batches[who] = rows
    start = time.time() + 4
    code = ("import pickle, sys, time\nfrom odin_engine.decide.history import append_history\n"
            "from odin_engine.io.store import Store\nrows = pickle.loads(open(sys.argv[1], 'rb').read())\n"
            "while time.time() < float(sys.argv[3]): pass\n"
            "for i, r in enumerate(rows): append_history(Store(sys.argv[2]), r, audit_id=f'{sys.argv[4]}{i}')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{w}.pkl"), store.uri(), str(start), w],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for w in batches]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    df = read_history(store)
    assert len(df) == 11 and df["finished_at"].is_unique
    commits = _commits(store.uri())
    assert sorted(commits) == list(range(11))
    assert sorted(c.get(AUDIT_ID_KEY) for c in commits.values()) == sorted(
        ["result-0"] + [f"{w}{i}" for w in batches for i in range(5)])
