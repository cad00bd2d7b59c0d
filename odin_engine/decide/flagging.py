"""Flag corpus images whose score falls below the calibrated threshold δ — a streaming pass.

Every corpus row is kept. For ``status == 'ok'`` rows: ``score`` (the calibrated method's
column), ``is_outlier = score < δ`` (the TPR rule; with ``fdr``: Benjamini–Hochberg on the
p-values, which is ``score <`` BH's own threshold), ``margin = score − δ`` (negative = below the
TPR rule's δ; the further below 0 the more anomalous), ``rank = 1 + #{ok corpus rows with a lower
score}`` (1 = the most anomalous; ties share the smallest rank, as ``pandas.rank(method="min")``;
the same under both rules, since p-values are increasing in the score) and ``p_value``, the
conformal p-value against the held-out scores (:mod:`odin_engine.decide.conformal`). Rows with
``status == 'error'`` keep their error and get the flag columns null: an image that could not
be scored is never reported as "in distribution" nor as "outlier".

How it runs in bounded memory (:func:`prepare`, then :func:`write_flags`)
--------------------------------------------------------------------------
1. *Stats pass* over ``status``, the score column and ``pred``: row/ok/error/outlier counts,
   per-class counts, the score range; an ok row without a finite score stops here, before
   anything is written.
2. *Rank plan*: ``rank`` needs a global order. The ok scores are cut into contiguous score
   ranges of at most ``budget`` rows (default 4,194,304 = 32 MiB of float64) with histograms of
   counts (4,096 bins per pass; a bin that alone exceeds the budget is cut again inside itself,
   and a bin holding one repeated value needs no values at all). Each range knows how many ok
   scores lie below it. A corpus of at most ``budget`` ok rows is one range and needs no
   histogram.
3. *Write pass per range*: that range's scores are collected and sorted (≤ ``budget`` floats),
   then every row of the range is read with all its columns in batches, flagged — exact rank =
   ``1 + below + searchsorted(sorted, score, "left")`` — and streamed into
   ``flags/part-RRR-KKKKK.parquet`` files of at most ``rows_per_file`` rows (error rows go with
   the first range). Along the way: a bounded top-k of the lowest scores (the report's gallery),
   the first error rows, and fixed-bin histogram counts.

Peak memory is set by ``budget``, the batch size and ``rows_per_file``'s row groups — not by the
corpus. Passes: 2 + 2·(ranges) + (histogram passes), each reading only the columns it needs
except the write passes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from odin_engine.decide.conformal import ConformalPValues, bh_index, decision_summary
from odin_engine.errors import ConfigError
from odin_engine.io.delta import delta_schema, to_delta_types
from odin_engine.io.scores import NOT_OK, OK, ScoreTable
from odin_engine.methods import TABLE_METHODS

FLAG_COLUMNS = ("score", "is_outlier", "margin", "rank", "p_value")
RANK_BUDGET = 1 << 22
ROWS_PER_FILE = 1 << 20
HISTOGRAM_BINS = 4096
HIGH_CARDINALITY = frozenset({"image_id", "uri", "scored_at", *TABLE_METHODS, "score", "margin", "rank", "p_value"})
GALLERY_COLUMNS = ("image_id", "uri", "pred", "score", "margin", "rank", "is_outlier", "p_value")


class ScoreError(ConfigError):
    """An ok row without a finite score: the score table given is damaged."""


@dataclass
class CorpusStats:
    n_rows: int = 0
    n_ok: int = 0
    n_outliers: int = 0
    lo: float = np.inf  # smallest ok score
    hi: float = -np.inf  # largest ok score
    per_class: dict[int, list[int]] = field(default_factory=dict)  # pred -> [n, n_outliers]
    p_counts: np.ndarray | None = None  # ok rows per conformal p-value level (conformal.py), with held-out scores

    @property
    def n_error(self) -> int:
        return self.n_rows - self.n_ok


@dataclass(frozen=True)
class RankRange:
    """Ok scores ``lo <= s < hi``: ``count`` of them, ``below`` ok scores lower than ``lo``;
    ``tied``: they all equal ``lo`` (too many to hold, and none needed)."""

    lo: float
    hi: float
    below: int
    count: int
    tied: bool = False

    def expr(self, method: str) -> pc.Expression:
        e = OK
        if np.isfinite(self.lo):
            e = e & (pc.field(method) >= self.lo)
        if np.isfinite(self.hi):
            e = e & (pc.field(method) < self.hi)
        return e


@dataclass
class FlagPlan:
    """``delta``: the calibration's δ (``margin = score − δ``); ``cut``: the score threshold that decides
    ``is_outlier = score < cut`` — δ under the TPR rule, BH's under ``fdr`` (±inf: nothing/everything);
    ``pvalues``: the held-out scores for the ``p_value`` column (None: an old frozen calibration without
    them; the column is then null); ``decision``: :func:`odin_engine.decide.conformal.decision_summary`."""

    table: ScoreTable
    delta: float
    method: str
    stats: CorpusStats
    ranges: list[RankRange]
    cut: float | None = None
    pvalues: ConformalPValues | None = None
    decision: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.cut is None:
            self.cut = self.delta


def _np(col: pa.Array | pa.ChunkedArray, dtype=np.float64) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def scan_stats(table: ScoreTable, delta: float, method: str, pvalues: ConformalPValues | None = None) -> CorpusStats:
    """Pass 1: counts, per-class counts and the score range; refuses ok rows without a finite score.
    With ``pvalues``: also the ok rows per p-value level (``p_counts``)."""
    table.require([method], "corpus scores")
    has_pred = "pred" in table.columns
    st = CorpusStats()
    if pvalues is not None:
        st.p_counts = np.zeros(pvalues.n + 1, np.int64)
    bad = 0
    for batch in table.batches(["status", method, *(["pred"] if has_pred else [])]):
        st.n_rows += batch.num_rows
        ok = _np(pc.equal(batch.column("status"), "ok").fill_null(False), bool)
        if not ok.any():
            continue
        s = _np(batch.column(method))[ok]  # nulls become NaN
        finite = np.isfinite(s)
        bad += int((~finite).sum())
        s = s[finite]
        st.n_ok += int(s.size)
        if not s.size:
            continue
        if pvalues is not None:
            st.p_counts += pvalues.counts(s)
        out = s < delta
        st.n_outliers += int(out.sum())
        st.lo, st.hi = min(st.lo, float(s.min())), max(st.hi, float(s.max()))
        if has_pred:
            pred = batch.column("pred").to_numpy(zero_copy_only=False)[ok][finite]
            known = ~np.isnan(pred.astype(np.float64))
            pred = pred[known].astype(np.int64)
            n_all = np.bincount(pred - pred.min(), minlength=1) if pred.size else np.zeros(0, np.int64)
            n_out = np.bincount(pred[out[known]] - pred.min(), minlength=len(n_all)) if pred.size else n_all
            for i in np.flatnonzero(n_all):
                acc = st.per_class.setdefault(int(pred.min() + i), [0, 0])
                acc[0] += int(n_all[i])
                acc[1] += int(n_out[i])
    if bad:
        rows = table.read(["image_id", method], OK).to_pandas()
        ids = rows[~np.isfinite(rows[method].astype(float))]["image_id"].astype(str).head(5).tolist()
        raise ScoreError(f"{bad} rows have status 'ok' but no finite {method} score (e.g. {ids}): "
                         "the score table is damaged; rescore those images")
    return st


def plan_ranks(table: ScoreTable, method: str, stats: CorpusStats, budget: int = RANK_BUDGET,
               bins: int = HISTOGRAM_BINS) -> list[RankRange]:
    """Cut the ok scores into ranges of at most ``budget`` rows (see the module docstring)."""
    if stats.n_ok <= budget:
        return [RankRange(-np.inf, np.inf, 0, stats.n_ok)]
    out: list[RankRange] = []
    _split(table, method, stats.lo, float(np.nextafter(stats.hi, np.inf)), 0, stats.n_ok, budget, bins, out)
    return out


def _split(table: ScoreTable, method: str, lo: float, hi: float, below: int, count: int, budget: int, bins: int,
           out: list[RankRange]) -> None:
    if count <= budget:
        out.append(RankRange(lo, hi, below, count))
        return
    if float(np.nextafter(lo, np.inf)) >= hi:  # one float value: all tied
        out.append(RankRange(lo, hi, below, count, tied=True))
        return
    edges = np.unique(np.linspace(lo, hi, bins + 1))
    edges[0], edges[-1] = lo, hi
    if len(edges) < 3:  # lo and hi a few ulps apart: split off lo's own value, so that the recursion ends
        edges = np.array([lo, float(np.nextafter(lo, np.inf)), hi])
    counts = np.zeros(len(edges) - 1, np.int64)
    for batch in table.batches([method], RankRange(lo, hi, 0, 0).expr(method)):
        idx = np.searchsorted(edges, _np(batch.column(0)), side="right") - 1
        counts += np.bincount(np.clip(idx, 0, len(counts) - 1), minlength=len(counts))
    start, acc, seen = 0, 0, below
    for i, c in enumerate(counts.tolist()):
        if c > budget:
            if acc:
                out.append(RankRange(float(edges[start]), float(edges[i]), seen - acc, acc))
            _split(table, method, float(edges[i]), float(edges[i + 1]), seen, c, budget, bins, out)
            seen += c
            start, acc = i + 1, 0
            continue
        if acc + c > budget:
            out.append(RankRange(float(edges[start]), float(edges[i]), seen - acc, acc))
            start, acc = i, 0
        acc += c
        seen += c
    if acc:
        out.append(RankRange(float(edges[start]), float(edges[-1]), seen - acc, acc))


def p_value_counts(table: ScoreTable, method: str, pvalues: ConformalPValues) -> np.ndarray:
    """The ok rows per p-value level (``n_heldout + 1`` integers): one scan of ``status`` and ``method``."""
    counts = np.zeros(pvalues.n + 1, np.int64)
    for batch in table.batches([method], OK):
        s = _np(batch.column(0))
        counts += pvalues.counts(s[np.isfinite(s)])
    return counts


def prepare(table: ScoreTable, delta: float, method: str, budget: int = RANK_BUDGET, *,
            heldout: ConformalPValues | None = None, order_statistic_k: int | None = None,
            fdr: float | None = None) -> FlagPlan:
    """Every check and the rank plan, before anything is written.

    ``heldout``: the held-out scores, for the ``p_value`` column and the decision summary (needs
    ``order_statistic_k``, the calibration's k). ``fdr``: flag by Benjamini–Hochberg at that level
    over the ok rows instead of ``score < δ`` — one more scan (the p-value counts come first, BH's
    threshold from them, then the stats pass counts outliers against it).
    """
    if fdr is not None and heldout is None:
        raise ConfigError("flagging at a false-discovery rate needs the held-out scores (conformal p-values)")
    cut = float(delta)
    counts = None
    if fdr is not None:
        table.require([method], "corpus scores")
        counts = p_value_counts(table, method, heldout)
        cut = heldout.cut(bh_index(counts, heldout.levels(), fdr))
    stats = scan_stats(table, cut, method, heldout if counts is None else None)
    if counts is not None:
        stats.p_counts = counts
    decision = None
    if heldout is not None:
        if order_statistic_k is None:
            raise ValueError("p-values need the calibration's order_statistic_k")
        decision = decision_summary(heldout, stats.p_counts, order_statistic_k=int(order_statistic_k), fdr=fdr)
    return FlagPlan(table, float(delta), method, stats, plan_ranks(table, method, stats, budget), cut, heldout,
                    decision)


def flag_schema(score_schema: pa.Schema, delta_types: bool = False) -> pa.Schema:
    """The flag files' schema: the score table's columns, then the flag columns. ``delta_types``: the
    score columns in the types a Delta table stores (``odin_engine.io.delta.delta_type``: a score
    dataset a user wrote, e.g. with pandas' ``timestamp[ns]``, may hold types Delta refuses)."""
    base = pa.schema([f for f in score_schema if f.name not in FLAG_COLUMNS], metadata=score_schema.metadata)
    if delta_types:
        base = delta_schema(base)
    for f in (pa.field("score", pa.float64()), pa.field("is_outlier", pa.bool_()),
              pa.field("margin", pa.float64()), pa.field("rank", pa.int64()), pa.field("p_value", pa.float64())):
        base = base.append(f)
    return base


def flag_batch(batch: pa.RecordBatch, delta: float, method: str, sorted_scores: np.ndarray | None,
               below: int, schema: pa.Schema, cut: float | None = None,
               pvalues: ConformalPValues | None = None) -> pa.RecordBatch:
    """``batch`` with the flag columns (``sorted_scores``: the range's scores; None when tied;
    ``cut``: ``is_outlier = score < cut``, default δ; ``pvalues``: None leaves ``p_value`` null)."""
    ok = _np(pc.equal(batch.column("status"), "ok").fill_null(False), bool)
    s = _np(batch.column(method))
    mask = ~ok
    if sorted_scores is None:
        rank = np.full(len(s), below + 1, np.int64)
    else:
        q = np.where(ok, s, 0.0)
        order = np.argsort(q)  # sorted needles: searchsorted walks the range's scores in order (2-3x faster)
        rank = np.empty(len(q), np.int64)
        rank[order] = below + 1 + np.searchsorted(sorted_scores, q[order], side="left")
    cols = {name: batch.column(name) for name in batch.schema.names if name not in FLAG_COLUMNS}
    cols["score"] = pa.array(s, pa.float64(), mask=mask)
    cols["is_outlier"] = pa.array(s < (delta if cut is None else cut), pa.bool_(), mask=mask)
    cols["margin"] = pa.array(s - delta, pa.float64(), mask=mask)
    cols["rank"] = pa.array(rank, pa.int64(), mask=mask)
    cols["p_value"] = (pa.nulls(len(s), pa.float64()) if pvalues is None else
                       pa.array(pvalues.p_values(np.where(ok, s, 0.0)), pa.float64(), mask=mask))
    # flag_schema(delta_types=True) may have changed a score column's type (a no-op otherwise)
    return pa.RecordBatch.from_arrays([to_delta_types(cols[f.name], f.type) for f in schema], schema=schema)


@dataclass
class FlagResult:
    files: list[str]
    gallery: pa.Table  # the ``gallery`` lowest-scoring ok rows, ascending (GALLERY_COLUMNS)
    errors: list[tuple[str, str]]  # the first ``errors_listed`` error rows: (image_id, error)
    histogram: np.ndarray | None  # ok corpus scores per bin of ``hist_edges``
    schema: pa.Schema | None = None  # the flag files' schema


def _top_k(current: pa.Table | None, batch: pa.RecordBatch, k: int) -> pa.Table | None:
    if k <= 0:
        return current
    part = pa.Table.from_batches([batch]).filter(pc.is_valid(batch.column("score")))
    part = part.select([c for c in GALLERY_COLUMNS if c in part.column_names])
    if part.num_rows > k:
        s = _np(part.column("score"))
        part = part.take(np.argpartition(s, k - 1)[:k])
    merged = part if current is None else pa.concat_tables([current, part])
    return merged.sort_by([("score", "ascending"), ("image_id", "ascending")]).slice(0, k)


def _error_rows(flagged: pa.RecordBatch, limit: int) -> list[tuple[str, str]]:
    err = flagged.filter(pc.is_null(flagged.column("score"))).slice(0, limit)
    if not err.num_rows:
        return []
    msgs = err.column("error").to_pylist() if "error" in err.schema.names else [None] * err.num_rows
    return [(str(i), m or "") for i, m in zip(err.column("image_id").to_pylist(), msgs)]


def write_flags(plan: FlagPlan, out, *, rows_per_file: int = ROWS_PER_FILE, gallery: int = 24,
                errors_listed: int = 200, hist_edges: Sequence[float] | None = None,
                part_prefix: str = "part", delta_types: bool = False) -> FlagResult:
    """Stream the flagged corpus into ``out`` (a :class:`~odin_engine.io.store.Store` for the flags
    folder) as ``<part_prefix>-RRR-KKKKK.parquet`` files; see the module docstring. ``delta_types``:
    the files are a Delta table's (:func:`flag_schema`); ``FlagResult.schema`` is their schema."""
    table, method, delta = plan.table, plan.method, plan.delta
    schema = flag_schema(table.schema, delta_types)
    # dictionary encoding only where values repeat (status, error, model_id, …): trying it on ids and
    # scores costs half the write time for nothing
    dict_cols = [c for c in schema.names if c not in HIGH_CARDINALITY]
    edges = None if hist_edges is None else np.asarray(hist_edges, np.float64)
    hist = None if edges is None else np.zeros(len(edges) - 1, np.int64)
    files: list[str] = []
    errors: list[tuple[str, str]] = []
    top: pa.Table | None = None
    for r, rng in enumerate(plan.ranges):
        sorted_scores = None
        if not rng.tied:
            sorted_scores = np.empty(rng.count, np.float64)
            n = 0
            for batch in table.batches([method], rng.expr(method)):
                v = _np(batch.column(0))
                sorted_scores[n: n + len(v)] = v
                n += len(v)
            sorted_scores = sorted_scores[:n]
            sorted_scores.sort()
            if hist is not None:
                hist += np.histogram(sorted_scores, edges)[0]
        elif hist is not None:
            hist += np.histogram(np.full(1, rng.lo), edges)[0] * rng.count
        where = rng.expr(method) | NOT_OK if r == 0 else rng.expr(method)
        with contextlib.ExitStack() as stack:
            writer, part, rows_in_file = None, 0, 0
            for batch in table.batches(None, where):
                flagged = flag_batch(batch, delta, method, sorted_scores, rng.below, schema, plan.cut, plan.pvalues)
                if len(errors) < errors_listed:
                    errors += _error_rows(flagged, errors_listed - len(errors))
                top = _top_k(top, flagged, gallery)
                while flagged.num_rows:
                    if writer is None or rows_in_file >= rows_per_file:
                        stack.close()  # publishes the previous part
                        name = f"{part_prefix}-{r:03d}-{part:05d}.parquet"
                        writer = stack.enter_context(out.parquet_writer(name, schema, use_dictionary=dict_cols))
                        files.append(out.uri(name))
                        part, rows_in_file = part + 1, 0
                    take = min(flagged.num_rows, rows_per_file - rows_in_file)
                    writer.write_batch(flagged.slice(0, take))
                    flagged, rows_in_file = flagged.slice(take), rows_in_file + take
    if not files:  # an empty corpus still gets a readable (empty) dataset
        name = f"{part_prefix}-000-00000.parquet"
        out.write_parquet(name, schema.empty_table())
        files.append(out.uri(name))
    if top is None:
        top = pa.schema([schema.field(c) for c in GALLERY_COLUMNS if c in schema.names]).empty_table()
    return FlagResult(files, top, errors, hist, schema)


def summarize(stats: CorpusStats, class_names: list[str] | None = None,
              decision: dict[str, Any] | None = None) -> dict[str, Any]:
    """Outlier counts and rates overall and per predicted class (rates over ``ok`` rows).

    ``n_outliers`` are the deciding rule's flags (``rule``: ``tpr`` or ``fdr``); ``n_flagged_tpr`` is
    the TPR rule's count (score < δ, what the drift test models) and, with p-values,
    ``n_flagged_fdr`` BH's at ``fdr_q`` — whichever rule decided.
    """
    tpr_rule = not decision or decision.get("rule", "tpr") == "tpr"
    overall = {
        "n_rows": stats.n_rows,
        "n_ok": stats.n_ok,
        "n_error": stats.n_error,
        "n_outliers": stats.n_outliers,
        "outlier_rate": (stats.n_outliers / stats.n_ok) if stats.n_ok else None,
        "rule": "tpr" if tpr_rule else "fdr",
        "n_flagged_tpr": stats.n_outliers if tpr_rule else int(decision["n_flagged_tpr"]),
        "n_flagged_fdr": (decision or {}).get("n_flagged_fdr"),
        "fdr_q": (decision or {}).get("fdr_q"),
    }
    per_class = []
    for pred in sorted(stats.per_class):
        n, n_o = stats.per_class[pred]
        row = {"pred": pred, "n": n, "n_outliers": n_o, "outlier_rate": n_o / n}
        if class_names and 0 <= pred < len(class_names):
            row["class_name"] = class_names[pred]
        per_class.append(row)
    return {"overall": overall, "per_class": per_class}
