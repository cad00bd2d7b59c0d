"""Audit history: one row per audit, appended to a Delta table at the ``--history`` location.

Each audit appends its row as **one new version** of the Delta table (``write_deltalake``
``mode="append"``, commit metadata ``{"odin.audit_id": <result id>, "odin.history_key": …}``), so
the history is read as one table by anything that reads Delta (pandas/pyarrow through deltalake,
Polars, DuckDB, Spark), is never rewritten by an append, takes concurrent appends from two audits
(delta-rs retries a conflicting append), and can be read as it was after any audit
(:func:`read_history`'s ``as_of``: a version, a date, an audit id). Appending is idempotent: a row
whose :func:`history_key` (finished time + corpus run id) the table already holds is not appended
again. An append never compacts: one small file per night, merged by ``odin-audit compact --output
<history>`` (a year of nights is a few MB).

**The earlier layout** — one Parquet file per audit, ``<history>/audit-<finished_at UTC,
%Y%m%dT%H%M%SZ>-<corpus run id>.parquet`` — is still read, and is **converted on the first
append**: the rows of every ``audit-*.parquet`` file become version 0 of the new table (commit
metadata ``odin.converted_from``), then tonight's row is version 1. The old files are left where
they are (no version names them, so Delta readers skip them; ``odin-audit compact --vacuum-hours H``
deletes them once older than H hours). An older odin-audit still writing per-audit files there
after the conversion would not be read: upgrade every writer of one history together.

``per_class`` is a JSON string (a list of ``{"pred", "n", "n_outliers", "outlier_rate"[,
"class_name"]}``) rather than a nested ``list<struct>`` column: entries differ in their keys
(``class_name`` only when names were given), and files whose nested types differ do not unify
into one dataset schema, while a string column always does; every engine reads it
(``json_extract`` in DuckDB, ``from_json`` in Spark, ``json.loads`` in pandas).

:func:`history_row` builds the row (data only); :func:`append_history` and :func:`read_history`
are the thin I/O over a :class:`~odin_engine.io.store.Store`.
"""

from __future__ import annotations

import json
import posixpath
import re
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError
from odin_engine.io.maintenance import AUDIT_ID_KEY
from odin_engine.io.store import Store

HISTORY_VERSION = 1
FILE_PREFIX = "audit-"  # the per-audit files of the earlier layout
HISTORY_KEY = "odin.history_key"  # commit metadata: the row appended (history_key)
CONVERTED_KEY = "odin.converted_from"  # commit metadata of the version converted from per-audit files

HISTORY_SCHEMA = pa.schema([
    pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("output", pa.string()),            # the audit's output location
    pa.field("corpus", pa.string()),            # the corpus source audited
    pa.field("corpus_run_id", pa.string()),
    pa.field("run_ids", pa.string()),           # JSON {"corpus": id, "heldout": id, "ood/x": id}
    pa.field("model_spec", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("temperature", pa.float64()),
    pa.field("epsilon", pa.float64()),
    pa.field("method", pa.string()),
    pa.field("target_tpr", pa.float64()),
    pa.field("delta", pa.float64()),
    pa.field("n_heldout", pa.int64()),
    pa.field("order_statistic_k", pa.int64()),
    pa.field("calibration_created_at", pa.string()),  # identifies the calibration: nights are comparable within one
    pa.field("calibration_from", pa.string()),         # the frozen calibration's location; null if made this run
    pa.field("n_images", pa.int64()),          # corpus rows (ok + error)
    pa.field("n_ok", pa.int64()),
    pa.field("n_error", pa.int64()),
    pa.field("n_flagged", pa.int64()),         # score < δ (the TPR rule), whichever rule decided
    pa.field("flag_rate", pa.float64()),       # n_flagged / n_ok; null when n_ok = 0
    pa.field("expected_rate", pa.float64()),   # (n − k + 1)/(n + 1)
    pa.field("expected_rate_lo", pa.float64()),  # central interval of 1 − C ~ Beta(n − k + 1, k)
    pa.field("expected_rate_hi", pa.float64()),
    pa.field("predicted_rate_lo", pa.float64()),  # where this night's rate falls without drift (Beta-binomial)
    pa.field("predicted_rate_hi", pa.float64()),
    pa.field("confidence", pa.float64()),      # of both intervals
    pa.field("p_value", pa.float64()),         # P(X ≥ n_flagged), X ~ BetaBinomial(n_ok, n − k + 1, k)
    pa.field("alpha", pa.float64()),           # --fail-on-drift level; null when none was given
    pa.field("alarm", pa.bool_()),             # p_value < alpha; null without alpha or without ok images
    pa.field("no_data", pa.bool_()),           # with alpha: fewer ok images than --min-ok (exit 6); null in old rows
    pa.field("per_class", pa.string()),        # JSON list, see the module docstring
    pa.field("decision_rule", pa.string()),    # which rule set is_outlier: "tpr" (score < δ) or "fdr" (BH)
    pa.field("fdr_q", pa.float64()),           # BH's level (the reference 0.1 when the TPR rule decided)
    pa.field("n_flagged_fdr", pa.int64()),     # BH's flags at fdr_q; null without held-out scores
    pa.field("n_outliers", pa.int64()),        # flags of the deciding rule (= n_flagged under the TPR rule)
    pa.field("history_version", pa.int32(), nullable=False),
], metadata={"odin.history_version": str(HISTORY_VERSION)})


def _timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        ts = value
    else:
        ts = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def history_row(audit: Mapping[str, Any], calibration: Mapping[str, Any], drift: Mapping[str, Any],
                per_class: Sequence[Mapping[str, Any]] = (), output: str | None = None) -> dict[str, Any]:
    """One history row from an audit's results (data only).

    ``audit``: the audit document (``finished_at``, ``model_id``, ``temperature``, ``epsilon``,
    ``method``, ``summary`` with ``n_rows``/``n_ok``/``n_error``/``n_outliers``, ``score_runs`` with a
    ``run_id`` and ``source`` per scored set; ``model_spec`` optional). ``calibration``: the
    calibration used (``delta``, ``target_tpr``, ``n_heldout``, ``order_statistic_k``,
    ``created_at``, ``frozen_from`` when frozen). ``drift``: :func:`odin_engine.decide.drift.drift_test`'s
    result for this audit. ``per_class``: the flag summary's per-class rates.
    """
    s = audit["summary"]
    n_tpr = s.get("n_flagged_tpr", s["n_outliers"])  # the drift test models the TPR rule's count
    if (int(s["n_ok"]), int(n_tpr)) != (int(drift["n_ok"]), int(drift["n_flagged"])):
        raise ValueError(f"the drift test counts ({drift['n_ok']} ok, {drift['n_flagged']} flagged) are not the "
                         f"audit's ({s['n_ok']} ok, {n_tpr} flagged by score < δ)")
    runs = audit.get("score_runs") or {}
    exp_lo, exp_hi = drift["expected_rate_ci"]
    pred_lo, pred_hi = drift["predicted_rate_interval"]
    return {
        "finished_at": _timestamp(audit["finished_at"]),
        "output": output,
        "corpus": (runs.get("corpus") or {}).get("source"),
        "corpus_run_id": (runs.get("corpus") or {}).get("run_id"),
        "run_ids": json.dumps({k: v.get("run_id") for k, v in runs.items()}, sort_keys=True),
        "model_spec": audit.get("model_spec"),
        "model_id": audit["model_id"],
        "temperature": float(audit["temperature"]),
        "epsilon": float(audit["epsilon"]),
        "method": audit["method"],
        "target_tpr": float(calibration["target_tpr"]),
        "delta": float(calibration["delta"]),
        "n_heldout": int(drift["n_heldout"]),
        "order_statistic_k": int(drift["order_statistic_k"]),
        "calibration_created_at": calibration.get("created_at"),
        "calibration_from": calibration.get("frozen_from"),
        "n_images": int(s["n_rows"]),
        "n_ok": int(s["n_ok"]),
        "n_error": int(s["n_error"]),
        "n_flagged": int(drift["n_flagged"]),
        "flag_rate": drift["flag_rate"],
        "expected_rate": float(drift["expected_rate"]),
        "expected_rate_lo": float(exp_lo),
        "expected_rate_hi": float(exp_hi),
        "predicted_rate_lo": pred_lo,
        "predicted_rate_hi": pred_hi,
        "confidence": float(drift["confidence"]),
        "p_value": drift["p_value"],
        "alpha": drift["alpha"],
        "alarm": drift["alarm"],
        "no_data": drift.get("no_data"),
        "per_class": json.dumps([dict(r) for r in per_class], sort_keys=True, default=str),
        "decision_rule": s.get("rule", "tpr"),
        "fdr_q": s.get("fdr_q"),
        "n_flagged_fdr": s.get("n_flagged_fdr"),
        "n_outliers": int(s["n_outliers"]),
        "history_version": HISTORY_VERSION,
    }


def history_file_name(row: Mapping[str, Any]) -> str:
    """``audit-<UTC time>-<corpus run id>.parquet``: names sort by time; one audit, one name (the
    per-file layout's file; in the Delta table the name without ``.parquet`` is the row's key)."""
    ts = _timestamp(row["finished_at"]).strftime("%Y%m%dT%H%M%SZ")
    run = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(row.get("corpus_run_id") or "run"))[:80]
    return f"{FILE_PREFIX}{ts}-{run}.parquet"


def history_key(row: Mapping[str, Any]) -> str:
    """The row's identity: one audit (finished time, corpus run), one key."""
    return history_file_name(row)[: -len(".parquet")]


def _legacy_files(store: Store) -> list[str]:
    return sorted(i.path for i in store.listdir()
                  if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith(FILE_PREFIX)
                  and i.path.endswith(".parquet"))


def _location(store: Store):
    from odin_engine.io.delta import DeltaLocation

    return DeltaLocation(store.fs, store.path)


def check_history(store: Store) -> None:
    """Refuse (``ConfigError``) a ``--history`` location that cannot be appended to — a file, or
    deltalake missing — before anything is written. Writes nothing."""
    from odin_engine.io.delta import require_deltalake

    if store.is_file():
        raise ConfigError(f"--history {store.uri()} is a file: give a directory (a Delta table, created by the "
                          "first audit)")
    require_deltalake("audit history", store.uri())


def append_history(store: Store, row: Mapping[str, Any], audit_id: str | None = None) -> str:
    """Append ``row`` as one new version of the history table at ``store`` (created by the first
    append; a folder of per-audit files is converted first, see the module docstring); the commit
    carries ``audit_id`` (:data:`~odin_engine.io.maintenance.AUDIT_ID_KEY`) and the row's
    :func:`history_key`. A row whose key the table already holds is not appended again. Returns the
    table's URI."""
    from odin_engine.io.delta import require_deltalake, storage_options

    deltalake = require_deltalake("audit history", store.uri())
    from deltalake import CommitProperties

    loc = _location(store)
    key = history_key(row)
    if not loc.exists():
        legacy = _legacy_files(store)
        if legacy:
            _convert(store, legacy)
    if loc.exists() and key in _keys(store):
        return store.uri()  # appended already (a retried append, or a converted file's row)
    meta = {HISTORY_KEY: key, **({AUDIT_ID_KEY: str(audit_id)} if audit_id else {})}
    # a failure here (the store, a conflict delta-rs could not retry) is a run-time failure (exit 5)
    deltalake.write_deltalake(loc.uri, pa.Table.from_pylist([dict(row)], schema=HISTORY_SCHEMA), mode="append",
                              schema_mode="merge", storage_options=storage_options(store.fs),
                              commit_properties=CommitProperties(custom_metadata=meta))
    return store.uri()


def _keys(store: Store) -> set[str]:
    """The :func:`history_key` of every row of the current version (two small columns of a small table)."""
    from odin_engine.io.maintenance import open_delta_version

    t = open_delta_version(_location(store), schema=HISTORY_SCHEMA, what="history").dataset.to_table(
        columns=["finished_at", "corpus_run_id"])
    return {history_key(r) for r in t.to_pylist()}


def _convert(store: Store, files: list[str]) -> None:
    """The per-audit files' rows as version 0 of a new Delta table at ``store`` (files left in place)."""
    import deltalake
    from deltalake import CommitProperties
    from deltalake.exceptions import DeltaError

    from odin_engine.io.delta import storage_options

    rows = pads.dataset(files, schema=HISTORY_SCHEMA, filesystem=store.fs, format="parquet").to_table()
    rows = rows.sort_by([("finished_at", "ascending")])
    meta = {CONVERTED_KEY: f"{len(files)} per-audit Parquet files ({FILE_PREFIX}*.parquet)"}
    try:
        deltalake.write_deltalake(_location(store).uri, rows, mode="error", storage_options=storage_options(store.fs),
                                  commit_properties=CommitProperties(custom_metadata=meta))
    except DeltaError:
        if not _location(store).exists():  # not a concurrent audit's conversion: a real failure
            raise


def read_history(store: Store, as_of: Any = None) -> pd.DataFrame:
    """Every history row under ``store`` as a frame sorted by ``finished_at`` (empty if there is none).

    A Delta table: its current version, or the version ``as_of`` names (a version number, an ISO
    date/time, an audit id: :func:`odin_engine.io.maintenance.resolve_version`). A folder of
    per-audit files (the earlier layout): every ``audit-*.parquet`` file (``as_of`` is refused).
    Read in :data:`HISTORY_SCHEMA`: a column an older file lacks comes back null."""
    if _location(store).exists():
        from odin_engine.io.maintenance import open_delta_version

        table = open_delta_version(_location(store), as_of, schema=HISTORY_SCHEMA, what="history").dataset.to_table()
    else:
        if as_of is not None:
            raise ConfigError(f"the history at {store.uri()} is not a Delta table (one file per audit): it has no "
                              "versions to read as of; the next append converts it")
        files = _legacy_files(store)
        if not files:
            return HISTORY_SCHEMA.empty_table().to_pandas()
        table = pads.dataset(files, schema=HISTORY_SCHEMA, filesystem=store.fs, format="parquet").to_table()
    return table.to_pandas().sort_values("finished_at", kind="stable").reset_index(drop=True)
