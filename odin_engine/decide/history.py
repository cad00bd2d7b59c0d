"""Audit history: one Parquet row per audit, one file per audit, under a history location.

``<history>/audit-<finished_at UTC, %Y%m%dT%H%M%SZ>-<corpus run id>.parquet``, all in
:data:`HISTORY_SCHEMA`, so the directory is a Parquet dataset that DuckDB, Spark or
``pyarrow.dataset`` read as one table. One file per audit means appending never rewrites what is
there (object stores have no append) and two writers never touch the same file; file names sort
by time.

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

from odin_engine.io.store import Store

HISTORY_VERSION = 1
FILE_PREFIX = "audit-"

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
    """``audit-<UTC time>-<corpus run id>.parquet``: names sort by time; one audit, one name."""
    ts = _timestamp(row["finished_at"]).strftime("%Y%m%dT%H%M%SZ")
    run = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(row.get("corpus_run_id") or "run"))[:80]
    return f"{FILE_PREFIX}{ts}-{run}.parquet"


def append_history(store: Store, row: Mapping[str, Any]) -> str:
    """Write ``row`` as one new Parquet file under ``store``; returns its URI.

    Local disks: write a hidden temp file, then rename (readers never see a partial file). Object
    stores: one upload, visible only once complete.
    """
    return store.write_parquet(history_file_name(row), pa.Table.from_pylist([dict(row)], schema=HISTORY_SCHEMA))


def read_history(store: Store) -> pd.DataFrame:
    """Every history row under ``store`` as a frame sorted by ``finished_at`` (empty if there is none).

    Files are read in :data:`HISTORY_SCHEMA` (a column an older file lacks comes back null).
    """
    files = sorted(i.path for i in store.listdir()
                   if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith(FILE_PREFIX)
                   and i.path.endswith(".parquet"))
    if not files:
        return HISTORY_SCHEMA.empty_table().to_pandas()
    table = pads.dataset(files, schema=HISTORY_SCHEMA, filesystem=store.fs, format="parquet").to_table()
    return table.to_pandas().sort_values("finished_at", kind="stable").reset_index(drop=True)
