"""The score table's per-bucket state: listing chunks, the per-bucket diff, the per-bucket commit (no Ray).

Every image belongs to one **bucket**: ``h = blake2b-64(image_id)`` (big-endian, the id as
UTF-8) and ``bucket = h // ceil(2⁶⁴ / B)``, with ``B`` fixed when the output directory is
created (``_odin_job.json``). A bucket is a contiguous range of ``h``, so a range of buckets is a
range of ``h``: listing chunks sorted by ``h`` are read per bucket range with Parquet row-group
statistics, without a global sort or shuffle.

The committed table is one file per non-empty bucket, ``scores/part-<bucket>.parquet``,
replaced atomically (write-then-rename on a local disk; one object PUT on an object store,
which replaces the key atomically), so a reader never sees two files of one bucket. The
functions here are what the job's Ray tasks run:

* :func:`write_listing_chunks` — a listing task's rows → chunk files sorted by ``h``;
* :func:`plan_partition` — for a bucket range: today's listing vs the committed and staged rows
  → the rows to score (new images, changed versions, retryable errors) and counts;
* :func:`commit_partition` — for a bucket range: each bucket's new file = one row per listed
  image (kept, staged or listing-error rows), written only if it differs from the committed one,
  verified from the file as written; returns counts only.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from odin_engine.io.corpus import LISTING_ERROR
from odin_engine.io.delta import FileRange
from odin_engine.io.failures import RETRYABLE_PREFIXES  # error rows attempted again on a rerun
from odin_engine.io.store import ensure_folder

SCORES_DIR = "scores"
LISTING_DIR = "_listing"  # this attempt's listing chunks (deleted at the end)
PLAN_DIR = "_plan"  # this attempt's rows to score (deleted at the end)
COMMIT_DIR = "_commit"  # a Delta commit's removal lists (deleted once the version is verified)
STAGING_DIR = "_staging"  # scored rows not yet committed (kept across attempts until committed)
HASH = "blake2b-64(image_id utf-8), big-endian; bucket = h // ceil(2**64 / buckets)"
CHUNK_ROWS = 262144  # listing rows per chunk file
CHUNK_ROW_GROUP = 4096  # rows per row group in a chunk: the granularity of a bucket-range read
KEY_COLUMNS = ("image_id", "uri", "version", "status", "error")
_BUCKET_FILE = re.compile(r"^part-(\d+)\.parquet$")
_STAGING_FILE = re.compile(r"^(\d+)-(\d+)-[0-9a-f]+\.parquet$")


# --------------------------------------------------------------------------- buckets
def id_hash(ids: Iterable[str]) -> np.ndarray:
    """``blake2b`` 64-bit digests of the ids (uint64): stable across processes, versions and machines."""
    digest = b"".join(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=8).digest() for i in ids)
    return np.frombuffer(digest, dtype=">u8").astype(np.uint64)


@dataclass(frozen=True)
class Buckets:
    """``n`` buckets over the 64-bit hash space, each a contiguous range of ``h``."""

    n: int

    @property
    def step(self) -> int:
        return -(-(1 << 64) // self.n)

    def of(self, h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, np.uint64)
        if self.n == 1:  # step 2**64 does not fit a uint64
            return np.zeros(len(h), np.int64)
        return (h // np.uint64(self.step)).astype(np.int64)

    def h_range(self, lo: int, hi: int) -> tuple[int, int]:
        """``[h_lo, h_hi)`` of buckets ``[lo, hi)``; ``h_hi`` may be 2⁶⁴."""
        return lo * self.step, min(hi * self.step, 1 << 64)


def bucket_file(bucket: int) -> str:
    return f"part-{bucket:06d}.parquet"


def parse_bucket_file(name: str) -> int | None:
    m = _BUCKET_FILE.match(name)
    return int(m.group(1)) if m else None


def parse_staging_file(name: str) -> tuple[int, int] | None:
    m = _STAGING_FILE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_retryable(status: pa.ChunkedArray | pa.Array, error: pa.ChunkedArray | pa.Array) -> np.ndarray:
    err = pc.fill_null(error, "")
    hit = pc.equal(status, "error")
    retry = pc.or_(*(pc.starts_with(err, p) for p in RETRYABLE_PREFIXES))
    return pc.fill_null(pc.and_(hit, retry), False).to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------- atomic files
def write_parquet_atomic(fs: pafs.FileSystem, path: str, table: pa.Table, **kwargs: Any) -> None:
    """Write-then-rename on a local disk; a single object (PUT/multipart completion) on an object store."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        pq.write_table(table, tmp, filesystem=fs, **kwargs)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs, **kwargs)


# --------------------------------------------------------------------------- listing chunks
def write_listing_chunks(fs: pafs.FileSystem, directory: str, name: str, batches: Iterable[pa.Table],
                         chunk_rows: int = CHUNK_ROWS) -> list[dict[str, Any]]:
    """Write a listing task's rows as chunk files sorted by ``h``; returns ``[{path, rows, errors}]``."""
    out, pending, n_pending = [], [], 0

    def flush():
        table = pa.concat_tables(pending)
        table = table.append_column("h", pa.array(id_hash(table.column("image_id").to_pylist()), pa.uint64()))
        table = table.sort_by("h")
        path = posixpath.join(directory, f"{name}-{len(out):05d}.parquet")
        pq.write_table(table, path, filesystem=fs, row_group_size=CHUNK_ROW_GROUP)
        out.append({"path": path, "rows": table.num_rows,
                    "errors": table.num_rows - table.column(LISTING_ERROR).null_count})

    ensure_folder(fs, directory)
    for batch in batches:
        if batch.num_rows:
            pending.append(batch)
            n_pending += batch.num_rows
        if n_pending >= chunk_rows:
            flush()
            pending, n_pending = [], 0
    if n_pending:
        flush()
    return out


def list_unit_task(unit, carried_bytes: bytes, fs: pafs.FileSystem, directory: str, name: str) -> dict[str, Any]:
    """A listing task: one corpus unit → chunk files, and ``more``: the units it handed off (the rest of
    an object-store key range); a configuration problem comes back as ``{"config_error": msg}``."""
    from odin_engine.errors import ConfigError
    from odin_engine.io.corpus import list_unit

    carried = pa.ipc.read_schema(pa.py_buffer(carried_bytes))
    more: list = []
    try:
        return {"chunks": write_listing_chunks(fs, directory, name, list_unit(unit, carried, more=more)),
                "more": more}
    except ConfigError as exc:
        return {"config_error": str(exc)}


def read_listing(fs: pafs.FileSystem, chunks: list[str], buckets: Buckets, lo: int, hi: int,
                 schema: pa.Schema) -> pa.Table:
    """Today's listing rows of buckets ``[lo, hi)``, with ``bucket``, sorted by (bucket, image_id)."""
    h_lo, h_hi = buckets.h_range(lo, hi)
    filt = pc.field("h") >= pa.scalar(h_lo, pa.uint64())
    if h_hi < (1 << 64):
        filt = filt & (pc.field("h") < pa.scalar(h_hi, pa.uint64()))
    if chunks:
        table = pads.dataset(chunks, schema=schema.append(pa.field("h", pa.uint64())), filesystem=fs,
                             format="parquet").to_table(filter=filt)
    else:
        table = schema.append(pa.field("h", pa.uint64())).empty_table()
    table = table.append_column("bucket", pa.array(buckets.of(table.column("h").to_numpy()), pa.int64()))
    return table.drop_columns(["h"]).sort_by([("bucket", "ascending"), ("image_id", "ascending")])


def _bounds(sorted_buckets: pa.ChunkedArray | np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Row offsets of buckets ``lo..hi`` in a column sorted by bucket (``len = hi - lo + 1``)."""
    arr = np.asarray(sorted_buckets.to_numpy() if hasattr(sorted_buckets, "to_numpy") else sorted_buckets)
    return np.searchsorted(arr, np.arange(lo, hi + 1), side="left")


# --------------------------------------------------------------------------- prior rows
def read_staged(fs: pafs.FileSystem, files: list[str], lo: int, hi: int, columns: list[str] | None = None
                ) -> tuple[pa.Table | None, int]:
    """Staged rows of buckets ``[lo, hi)`` sorted by bucket, and the number of unreadable (torn) files."""
    parts, torn = [], 0
    columns = None if columns is None else [*columns, "bucket"]
    filt = (pc.field("bucket") >= lo) & (pc.field("bucket") < hi)
    for path in files:
        try:
            parts.append(pq.read_table(path, filesystem=fs, columns=columns, filters=filt))
        except (pa.ArrowInvalid, OSError):
            torn += 1
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return None, torn
    table = pa.concat_tables(parts, promote_options="permissive")
    return table.sort_by("bucket"), torn


@dataclass(frozen=True)
class VersionFiles:
    """The data files of the Delta version a run reads (each with its ``bucket`` range), and the
    table's schema."""

    files: list[FileRange]
    schema: pa.Schema


def read_committed(fs: pafs.FileSystem, committed: "dict[int, str] | VersionFiles | None", lo: int, hi: int,
                   columns: list[str], with_file: bool = False) -> pa.Table | None:
    """The committed rows of buckets ``[lo, hi)`` (``columns``; ``with_file`` adds ``__filename``):
    from the bucket files (``{bucket: file}``), or from a Delta version's files (their ``bucket``
    column's range from the log's statistics picks the files, row-group statistics the row groups)."""
    if committed is None:  # a Delta table before its first version
        return None
    if isinstance(committed, tuple):  # a migration: the bucket files and the Delta table beside them
        parts = [t for t in (read_committed(fs, c, lo, hi, columns) for c in committed) if t is not None]
        return pa.concat_tables(parts, promote_options="permissive") if parts else None
    if isinstance(committed, dict):
        parts = [pq.read_table(committed[b], filesystem=fs, columns=columns) for b in range(lo, hi) if b in committed]
        return pa.concat_tables(parts, promote_options="permissive") if parts else None
    files = [f.path for f in committed.files if f.overlaps(lo, hi)]
    if not files:
        return None
    # the table's schema: files that delta-rs rewrote (compaction) hold string_view columns
    dataset = pads.dataset(files, filesystem=fs, format="parquet", schema=committed.schema)
    names = [*columns, "__filename"] if with_file else columns
    table = dataset.to_table(columns=names, filter=(pc.field("bucket") >= lo) & (pc.field("bucket") < hi))
    return table if table.num_rows else None


def _read_keys(fs: pafs.FileSystem, path: str, extra: list[str]) -> pa.Table:
    return pq.read_table(path, filesystem=fs, columns=[*KEY_COLUMNS, *extra])


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """Element-wise equality with null == null."""
    eq = pc.fill_null(pc.equal(a, b), False)
    return pc.or_(eq, pc.and_(pc.is_null(a), pc.is_null(b))).to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------- plan: what to score
def classify(listing: pa.Table, prior: pa.Table | None) -> dict[str, np.ndarray]:
    """Per listed row: ``todo``/``new``/``changed``/``retried``/``reused`` masks.

    A row is done when a prior row (committed or staged) has its image_id, uri and version and
    is not a retryable error; otherwise it is new (no prior row), changed (a prior row with
    another uri/version) or retried (same version, retryable error). Listing-error rows are
    never scored.
    """
    n = listing.num_rows
    is_err = ~pc.is_null(listing.column(LISTING_ERROR)).to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    has_prior = np.zeros(n, bool)
    same_any = np.zeros(n, bool)
    done_any = np.zeros(n, bool)
    if prior is not None and prior.num_rows and n:
        keys = pa.table({"image_id": listing.column("image_id"), "l_uri": listing.column("uri"),
                         "l_version": listing.column("version"), "idx": pa.array(np.arange(n), pa.int64())})
        p = pa.table({"image_id": prior.column("image_id"), "p_uri": prior.column("uri"),
                      "p_version": prior.column("version"),
                      "p_retry": pa.array(is_retryable(prior.column("status"), prior.column("error")))})
        j = keys.join(p, "image_id", join_type="inner")
        if j.num_rows:
            idx = j.column("idx").to_numpy()
            same = _same(j.column("l_uri"), j.column("p_uri")) & _same(j.column("l_version"), j.column("p_version"))
            done = same & ~j.column("p_retry").to_numpy(zero_copy_only=False)
            has_prior[idx] = True
            np.logical_or.at(same_any, idx, same)
            np.logical_or.at(done_any, idx, done)
    todo = ~is_err & ~done_any
    return {"todo": todo, "new": todo & ~has_prior, "changed": todo & has_prior & ~same_any,
            "retried": todo & same_any, "reused": ~is_err & done_any, "listing_errors": is_err}


def plan_partition(fs: pafs.FileSystem, root: str, listing_schema: pa.Schema, chunks: list[str], n_buckets: int,
                   lo: int, hi: int, committed: "dict[int, str] | VersionFiles | None", staged: list[str], plan_path: str,
                   block_rows: int = 1 << 20) -> dict[str, Any]:
    """Buckets ``[lo, hi)``: write the rows to score to ``plan_path`` (row groups of ``block_rows``:
    the scoring pipeline's blocks); return counts (and duplicate ids)."""
    from odin_engine.io.corpus import duplicate_ids

    listing = read_listing(fs, chunks, Buckets(n_buckets), lo, hi, listing_schema)
    shown, n_dups = duplicate_ids(listing.select(["image_id"]))
    if n_dups:
        return {"duplicates": shown, "n_duplicates": n_dups}
    priors = []
    cur = read_committed(fs, committed, lo, hi, list(KEY_COLUMNS))
    if cur is not None:
        priors.append(cur.select(list(KEY_COLUMNS)))
    st, torn = read_staged(fs, staged, lo, hi, list(KEY_COLUMNS))
    if st is not None:
        priors.append(st.select(list(KEY_COLUMNS)))
    prior = pa.concat_tables(priors, promote_options="permissive") if priors else None
    masks = classify(listing, prior)
    todo = listing.filter(pa.array(masks["todo"])).drop_columns([LISTING_ERROR])
    if todo.num_rows:
        pq.write_table(todo, plan_path, filesystem=fs, row_group_size=block_rows)
    counts = {k: int(v.sum()) for k, v in masks.items()}
    counts.update(listed=listing.num_rows, torn_staging=torn, plan=plan_path if todo.num_rows else None)
    return counts


# --------------------------------------------------------------------------- commit: one file per bucket
def _pick(listing: pa.Table, candidates: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """For each listed row, the index of its best candidate row (or -1).

    A candidate fits when image_id, uri and version match — and, for a listing-error row, when it
    is that same error. Among fitting rows: not retryable first, then the latest ``scored_at``.
    """
    n = listing.num_rows
    choice = np.full(n, -1, np.int64)
    if not candidates.num_rows or not n:
        return choice, np.zeros(n, bool)
    keys = pa.table({"image_id": listing.column("image_id"), "l_uri": listing.column("uri"),
                     "l_version": listing.column("version"), "l_error": listing.column(LISTING_ERROR),
                     "idx": pa.array(np.arange(n), pa.int64())})
    c = pa.table({"image_id": candidates.column("image_id"), "c_uri": candidates.column("uri"),
                  "c_version": candidates.column("version"), "c_status": candidates.column("status"),
                  "c_error": candidates.column("error"), "c_at": candidates.column("scored_at"),
                  "cidx": pa.array(np.arange(candidates.num_rows), pa.int64())})
    j = keys.join(c, "image_id", join_type="inner")
    if not j.num_rows:
        return choice, np.zeros(n, bool)
    listed_err = ~pc.is_null(j.column("l_error")).to_numpy(zero_copy_only=False)
    fits = _same(j.column("l_uri"), j.column("c_uri")) & _same(j.column("l_version"), j.column("c_version"))
    same_err = pc.fill_null(pc.and_(pc.equal(j.column("c_status"), "error"),
                                    pc.equal(j.column("c_error"), j.column("l_error"))), False)
    fits &= ~listed_err | same_err.to_numpy(zero_copy_only=False)
    j = j.filter(pa.array(fits))
    if not j.num_rows:
        return choice, np.zeros(n, bool)
    retry = is_retryable(j.column("c_status"), j.column("c_error"))
    at = pc.fill_null(j.column("c_at").cast(pa.int64()), -(1 << 62)).to_numpy()
    idx = j.column("idx").to_numpy()
    order = np.lexsort((-at, retry, idx))  # by listed row, then final before retryable, then newest
    first = order[np.r_[True, idx[order][1:] != idx[order][:-1]]]
    choice[idx[first]] = j.column("cidx").to_numpy()[first]
    return choice, choice >= 0


def _error_rows(listing: pa.Table, schema: pa.Schema, constants: dict[str, Any]) -> pa.Table:
    """Rows for listing-error entries: status 'error', the listing's message, no scores."""
    from datetime import datetime, timezone

    n = listing.num_rows
    now = datetime.now(timezone.utc)
    data = {}
    for f in schema:
        if f.name == "error":
            data[f.name] = listing.column(LISTING_ERROR)
        elif f.name == "status":
            data[f.name] = pa.array(["error"] * n, pa.string())
        elif f.name in listing.column_names:  # image_id, uri, version, carried columns
            data[f.name] = listing.column(f.name).cast(f.type)
        elif f.name in constants:
            data[f.name] = pa.array([constants[f.name]] * n, f.type)
        elif f.name == "scored_at":
            data[f.name] = pa.array([now] * n, f.type)
        else:
            data[f.name] = pa.nulls(n, f.type)
    return pa.table(data, schema=schema)


def _unchanged(listing: pa.Table, old: pa.Table, carried: list[str]) -> bool:
    """The committed keys are exactly today's listing (ids, uris, versions, carried values, listing errors)."""
    if old.num_rows != listing.num_rows:
        return False
    old = old.sort_by("image_id")
    for c in ("image_id", "uri", "version", *carried):
        if c not in old.column_names or not old.column(c).cast(listing.schema.field(c).type).equals(listing.column(c)):
            return False
    errs = ~pc.is_null(listing.column(LISTING_ERROR)).to_numpy(zero_copy_only=False)
    if errs.any():
        mask = pa.array(errs)
        if not (old.column("status").filter(mask).equals(pa.chunked_array([pa.array(["error"] * int(errs.sum()))]))
                and old.column("error").filter(mask).equals(listing.column(LISTING_ERROR).filter(mask))):
            return False
    return True


def _verify_ids(ids: pa.ChunkedArray | pa.Array, listed: pa.ChunkedArray) -> dict[str, int]:
    ids_sorted = pc.sort_indices(ids)
    ids = pc.take(ids, ids_sorted)
    unique = pc.unique(ids)
    missing = len(listed) - int(pc.sum(pc.is_in(listed, value_set=unique)).as_py() or 0)
    unexpected = len(unique) - int(pc.sum(pc.is_in(unique, value_set=listed)).as_py() or 0)
    return {"duplicates": len(ids) - len(unique), "missing": missing, "unexpected": unexpected}


def commit_partition(fs: pafs.FileSystem, scores_dir: str, listing_schema: pa.Schema, chunks: list[str],
                     n_buckets: int, lo: int, hi: int, committed: dict[int, str], staged: list[str],
                     schema: pa.Schema, constants: dict[str, Any]) -> dict[str, int]:
    """Buckets ``[lo, hi)``: write each bucket's new file where it changed, verify, return counts."""
    buckets = Buckets(n_buckets)
    listing = read_listing(fs, chunks, buckets, lo, hi, listing_schema)
    st, torn = read_staged(fs, staged, lo, hi)
    carried = [f.name for f in listing_schema if f.name not in ("image_id", "uri", "version", LISTING_ERROR)]
    lb = _bounds(listing.column("bucket"), lo, hi)
    sb = _bounds(st.column("bucket"), lo, hi) if st is not None else None
    counts = dict.fromkeys(("listed", "rows", "ok", "error", "written", "unchanged", "deleted", "dropped",
                            "duplicates", "missing", "unexpected", "from_staging"), 0)
    counts["listed"] = listing.num_rows
    for b in range(lo, hi):
        lrows = listing.slice(lb[b - lo], lb[b - lo + 1] - lb[b - lo]).drop_columns(["bucket"])
        srows = st.slice(sb[b - lo], sb[b - lo + 1] - sb[b - lo]) if st is not None else None
        srows = srows if srows is not None and srows.num_rows else None
        path = committed.get(b)
        target = posixpath.join(scores_dir, bucket_file(b))
        if not lrows.num_rows:
            if path:
                counts["dropped"] += pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
                fs.delete_file(path)
                counts["deleted"] += 1
            continue
        old_keys = _read_keys(fs, path, carried) if path else None
        if srows is None and old_keys is not None and _unchanged(lrows, old_keys, carried):
            counts["unchanged"] += 1
            status = old_keys.column("status")
            check = _verify_ids(old_keys.column("image_id"), lrows.column("image_id"))
        else:
            parts = []
            if path:
                parts.append(pq.read_table(path, filesystem=fs).cast(schema))
            if srows is not None:
                parts.append(srows.select(schema.names).cast(schema))
            listed_err = ~pc.is_null(lrows.column(LISTING_ERROR)).to_numpy(zero_copy_only=False)
            if listed_err.any():
                parts.append(_error_rows(lrows.filter(pa.array(listed_err)), schema, constants))
            cand = pa.concat_tables(parts) if parts else schema.empty_table()
            choice, found = _pick(lrows, cand)
            new = cand.take(pa.array(choice[found]))
            # today's uri, version and carried values for every row
            for c in ("uri", "version", *carried):
                new = new.set_column(new.schema.get_field_index(c), schema.field(c),
                                     lrows.column(c).filter(pa.array(found)).cast(schema.field(c).type))
            if old_keys is not None:
                old_ids = old_keys.column("image_id")
                counts["dropped"] += int(len(old_ids) - pc.sum(pc.is_in(old_ids, value_set=lrows.column("image_id"))).as_py())
            if srows is not None:
                counts["from_staging"] += int(pc.sum(pc.is_in(new.column("image_id"),
                                                              value_set=srows.column("image_id"))).as_py() or 0)
            new = new.replace_schema_metadata(schema.metadata).sort_by("image_id")
            write_parquet_atomic(fs, target, new)
            if path and path != target:
                fs.delete_file(path)
            counts["written"] += 1
            written = pq.read_table(target, filesystem=fs, columns=["image_id", "status"])
            status = written.column("status")
            check = _verify_ids(written.column("image_id"), lrows.column("image_id"))
        counts["rows"] += len(status)
        n_ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
        counts["ok"] += n_ok
        counts["error"] += len(status) - n_ok
        for k, v in check.items():
            counts[k] += v
    counts["torn_staging"] = torn
    # staging files wholly inside this range are committed now; the driver deletes the others
    for path in staged:
        rng = parse_staging_file(posixpath.basename(path))
        if rng and lo <= rng[0] and rng[1] < hi:
            fs.delete_file(path)
    return counts
