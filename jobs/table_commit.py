"""The score job's commit on a Delta table (no Ray): what its Ray tasks run, and the driver's one version.

``<output>/scores/`` is a Delta table (docs/table-formats.md) whose rows carry their ``bucket``
(the hash bucket of ``jobs.shards``; buckets stay the unit of work, not of storage). A night is
committed in three steps, every one of them idempotent until the last:

1. :func:`commit_range` — one task per bucket range: today's listing of the range against the
   version's rows of the range (files picked by the log's ``bucket`` statistics), the staged rows
   and the listing-error rows → the one row per listed image (``shards._pick``). A committed row
   that is still today's row is **kept** (no write); every other chosen row goes to one new file
   of the range; every committed row not kept (gone, replaced, re-scored) is recorded as a
   **removal** ``(file, image_id)``. Returns the file's log entry and counts.
2. :func:`rewrite_file` — one task per committed file that lost rows: the file without them
   (copy-on-write of the touched files only; a file that lost every row is just removed).
3. the driver's :func:`odin_engine.io.delta.commit`: one version = the new and rewritten files
   added, the touched files removed, with the run id in the commit's metadata. A night that
   changes nothing commits nothing.

Then :func:`verify_range` checks the new version, range by range: one row per listed image.
Files written by an attempt killed before step 3 belong to no version (readers never see them);
``odin-audit compact`` vacuums them.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from odin_engine.io.corpus import LISTING_ERROR
from odin_engine.io.delta import DeltaLocation, file_entry

from jobs.shards import (KEY_COLUMNS, Buckets, VersionFiles, _error_rows, _pick, _same, _verify_ids, id_hash, read_committed,
                         read_listing, read_staged, write_parquet_atomic)

ROW_GROUP_ROWS = 32_768  # a bucket-range read skips the row groups outside its range
FILE = "__filename"  # pyarrow's dataset field naming the file a row was read from


def _chosen_rows(listing: pa.Table, cand: pa.Table, n_cur: int, carried: list[str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(choice, found, keep): each listed row's candidate, and whether it is a committed row that
    stays as it is (same uri, version and carried values as today's listing)."""
    choice, found = _pick(listing, cand)
    keep = found & (choice < n_cur)
    idx = np.nonzero(keep)[0]
    if len(idx):
        ok = np.ones(len(idx), bool)
        for c in ("uri", "version", *carried):
            ok &= _same(cand.column(c).take(pa.array(choice[idx])),
                        listing.column(c).take(pa.array(idx)).cast(cand.schema.field(c).type))
        keep[idx] = ok
    return choice, found, keep


def _today(rows: pa.Table, listed: pa.Table, schema: pa.Schema, carried: list[str]) -> pa.Table:
    """``rows`` (one per row of ``listed``) with today's uri, version, carried values and bucket."""
    for c in ("uri", "version", *carried, "bucket"):
        rows = rows.set_column(rows.schema.get_field_index(c), schema.field(c), listed.column(c).cast(schema.field(c).type))
    return rows


def commit_range(fs: pafs.FileSystem, table_path: str, listing_schema: pa.Schema, chunks: list[str],
                 n_buckets: int, lo: int, hi: int, committed: VersionFiles | None, staged: list[str],
                 schema: pa.Schema, constants: dict[str, Any], new_file: str, removals_file: str,
                 legacy: dict[int, str] | None = None) -> dict[str, Any]:
    """Buckets ``[lo, hi)``: write the range's new rows to ``new_file`` and its removals to
    ``removals_file`` (both only when there are any); return the new file's log entry and counts.
    ``legacy``: the range's bucket files of an output migrating to Delta (their rows are candidates
    like staged rows, so they are written into the table, not rescored)."""
    listing = read_listing(fs, chunks, Buckets(n_buckets), lo, hi, listing_schema)
    st, torn = read_staged(fs, staged, lo, hi)
    carried = [f.name for f in listing_schema if f.name not in ("image_id", "uri", "version", LISTING_ERROR)]
    # choosing needs only these columns of the committed rows, and kept rows are not rewritten: the
    # version's rows are read whole only where a kept image's carried values changed (rare)
    keys = [*KEY_COLUMNS, "scored_at", *carried, "bucket"]
    narrow = pa.schema([schema.field(k) for k in keys])
    cur = read_committed(fs, committed, lo, hi, keys, with_file=True) if committed else None
    parts, files, n_cur, n_st = [], None, 0, 0
    if cur is not None:
        files = cur.column(FILE)
        cur = cur.drop_columns([FILE]).cast(narrow)
        n_cur = cur.num_rows
    if st is not None:
        parts.append(st.select(schema.names).cast(schema))
        n_st = st.num_rows
    old = read_committed(fs, legacy, lo, hi, [n for n in schema.names if n != "bucket"]) if legacy else None
    if old is not None:
        old = old.append_column("bucket", pa.array(Buckets(n_buckets).of(id_hash(old.column("image_id").to_pylist())),
                                                   pa.int64()))
        parts.append(old.select(schema.names).cast(schema))
    listed_err = ~pc.is_null(listing.column(LISTING_ERROR)).to_numpy(zero_copy_only=False)
    if listed_err.any():
        parts.append(_error_rows(listing.filter(pa.array(listed_err)), schema, constants))
    rest = pa.concat_tables(parts) if parts else schema.empty_table()  # staged, migrated and error rows
    cand = pa.concat_tables([t for t in (cur, rest.select(keys).cast(narrow)) if t is not None])
    choice, found, keep = _chosen_rows(listing, cand, n_cur, carried)

    write = np.nonzero(found & ~keep)[0]  # listed rows whose row is written now
    src = choice[write]
    new_parts = []
    if (src >= n_cur).any():
        new_parts.append(_today(rest.take(pa.array(src[src >= n_cur] - n_cur)),
                                listing.take(pa.array(write[src >= n_cur])), schema, carried))
    if (src < n_cur).any():  # committed rows whose carried values changed: their whole rows
        whole = read_committed(fs, committed, lo, hi, schema.names).cast(schema)
        if not whole.column("image_id").equals(cur.column("image_id")):
            raise RuntimeError(f"the committed rows of buckets [{lo}, {hi}) read differently twice")
        new_parts.append(_today(whole.take(pa.array(src[src < n_cur])), listing.take(pa.array(write[src < n_cur])),
                                schema, carried))
    new = pa.concat_tables(new_parts) if new_parts else schema.empty_table()
    counts: dict[str, Any] = {"listed": listing.num_rows, "written_rows": new.num_rows,
                              "kept_rows": int(keep.sum()), "torn_staging": torn, "entry": None, "removals": {}}
    if new.num_rows:
        new = new.replace_schema_metadata(schema.metadata).sort_by([("bucket", "ascending"), ("image_id", "ascending")])
        path = posixpath.join(table_path, new_file)
        write_parquet_atomic(fs, path, new, row_group_size=ROW_GROUP_ROWS)
        counts["entry"] = file_entry(DeltaLocation(fs, table_path), path)
    chosen = cand.take(pa.array(choice[found]))
    counts["from_staging"] = int((found & (choice >= n_cur) & (choice < n_cur + n_st)).sum())
    counts["dropped"] = 0
    if n_cur:
        removed = np.ones(n_cur, bool)
        removed[choice[keep]] = False
        if removed.any():
            gone = pa.table({"file": files.filter(pa.array(removed)),
                             "image_id": cur.column("image_id").filter(pa.array(removed))})
            write_parquet_atomic(fs, removals_file, gone)
            counts["removals_file"] = removals_file
            per_file = pc.value_counts(gone.column("file")).to_pylist()
            counts["removals"] = {d["values"]: int(d["counts"]) for d in per_file}
        counts["dropped"] = int(n_cur - pc.sum(pc.is_in(cur.column("image_id"),
                                                        value_set=listing.column("image_id"))).as_py())
    counts["planned"] = _verify_ids(chosen.column("image_id"), listing.column("image_id"))
    return counts


def rewrite_file(fs: pafs.FileSystem, table_path: str, path: str, removals: list[str], schema: pa.Schema,
                 new_file: str) -> dict[str, Any]:
    """``path`` without the rows the removal files name for it, as ``new_file``; its log entry."""
    gone = [pq.read_table(r, filesystem=fs, filters=pc.field("file") == path, columns=["image_id"]) for r in removals]
    ids = pa.concat_tables(gone).column("image_id") if gone else pa.chunked_array([], pa.string())
    table = pq.read_table(path, filesystem=fs).cast(schema)
    table = table.filter(pc.invert(pc.is_in(table.column("image_id"), value_set=ids)))
    target = posixpath.join(table_path, new_file)
    write_parquet_atomic(fs, target, table.replace_schema_metadata(schema.metadata), row_group_size=ROW_GROUP_ROWS)
    return file_entry(DeltaLocation(fs, table_path), target)


def verify_range(fs: pafs.FileSystem, listing_schema: pa.Schema, chunks: list[str], n_buckets: int, lo: int, hi: int,
                 committed: VersionFiles) -> dict[str, int]:
    """The committed version's rows of buckets ``[lo, hi)`` against today's listing: one row per
    listed image (duplicates, missing, unexpected), and the rows' ok/error counts."""
    listing = read_listing(fs, chunks, Buckets(n_buckets), lo, hi, listing_schema)
    rows = read_committed(fs, committed, lo, hi, ["image_id", "status"])
    if rows is None:
        rows = pa.table({"image_id": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    n_ok = int(pc.sum(pc.equal(rows.column("status"), "ok")).as_py() or 0)
    return {"rows": rows.num_rows, "ok": n_ok, "error": rows.num_rows - n_ok,
            **_verify_ids(rows.column("image_id"), listing.column("image_id"))}
