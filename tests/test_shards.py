"""jobs.shards: the score table's per-bucket state — buckets, the diff, the commit and its checks (no Ray)."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs import shards
from odin_engine.io.corpus import listing_schema
from odin_engine.io.scores import output_schema

FS = pafs.LocalFileSystem()
CONST = {"temperature": 1000.0, "epsilon": 0.0014, "model_id": "m@sha256:0", "run_id": "r"}


def test_hash_is_blake2b_of_the_utf8_id_and_buckets_are_contiguous_hash_ranges():
    ids = ["a", "b/ünï.png", "x" * 300]
    h = shards.id_hash(ids)
    for i, v in zip(ids, h):
        assert int(v) == int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big")
    for n in (1, 3, 7, 1000):
        bk = shards.Buckets(n)
        hs = np.array([0, 1, 2**63, 2**64 - 1], np.uint64)
        b = bk.of(hs)
        assert b.min() >= 0 and b.max() == n - 1
        for lo in range(0, n, max(1, n // 3)):
            h_lo, h_hi = bk.h_range(lo, lo + 1)
            assert bk.of(np.array([h_lo], np.uint64))[0] == lo
            assert bk.of(np.array([h_hi - 1], np.uint64))[0] == lo
    many = shards.Buckets(16).of(shards.id_hash([f"img_{i}.png" for i in range(16000)]))
    counts = np.bincount(many, minlength=16)
    assert counts.min() > 800 and counts.max() < 1200  # uniform enough to size buckets by count


def _listing(rows):
    """rows: (image_id, uri, version, error)."""
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.table([pa.array(c, pa.string()) for c in cols], schema=listing_schema())


def _prior(rows):
    """rows: (image_id, uri, version, status, error)."""
    cols = list(zip(*rows))
    return pa.table({k: pa.array(c, pa.string()) for k, c in zip(shards.KEY_COLUMNS, cols)})


def test_classify_new_changed_retried_reused_and_listing_errors():
    listing = _listing([
        ("new.png", "/c/new.png", "1:1", None),
        ("same.png", "/c/same.png", "2:2", None),
        ("changed.png", "/c/changed.png", "3:9", None),
        ("moved.png", "/d/moved.png", "4:4", None),
        ("retry.png", "/c/retry.png", "5:5", None),
        ("final.png", "/c/final.png", "6:6", None),
        ("nover.png", "s3://b/nover.png", None, None),
        ("link.png", "/c/link.png", None, "dangling symlink: x"),
        ("retry2.png", "/c/retry2.png", "8:8", None),
    ])
    prior = _prior([
        ("same.png", "/c/same.png", "2:2", "ok", None),
        ("changed.png", "/c/changed.png", "3:3", "ok", None),
        ("moved.png", "/c/moved.png", "4:4", "ok", None),
        ("retry.png", "/c/retry.png", "5:5", "error", "read failed: FileNotFoundError: …"),
        ("final.png", "/c/final.png", "6:6", "error", "empty file"),
        ("nover.png", "s3://b/nover.png", None, "ok", None),
        ("retry2.png", "/c/retry2.png", "8:8", "error", "scoring failed: RuntimeError: x"),
        ("retry2.png", "/c/retry2.png", "8:8", "error", "scoring failed: RuntimeError: y"),  # staged twice
        ("gone.png", "/c/gone.png", "9:9", "ok", None),
    ])
    m = shards.classify(listing, prior)
    ids = np.array(listing.column("image_id").to_pylist())
    assert set(ids[m["todo"]]) == {"new.png", "changed.png", "moved.png", "retry.png", "retry2.png"}
    assert set(ids[m["new"]]) == {"new.png"}
    assert set(ids[m["changed"]]) == {"changed.png", "moved.png"}
    assert set(ids[m["retried"]]) == {"retry.png", "retry2.png"}
    assert set(ids[m["reused"]]) == {"same.png", "final.png", "nover.png"}
    assert set(ids[m["listing_errors"]]) == {"link.png"}
    assert not (m["todo"] & m["listing_errors"]).any()


def _score_rows(schema, rows, bucket=None, at=None):
    """rows: (image_id, uri, version, status, error, odin)."""
    n = len(rows)
    ids, uris, vers, st, err, odin = map(list, zip(*rows))
    at = at or datetime.now(timezone.utc)
    data = {"image_id": ids, "uri": uris, "status": st, "error": err, "odin": odin, "version": vers,
            "temperature": [1000.0] * n, "epsilon": [0.0014] * n, "model_id": ["m@sha256:0"] * n,
            "run_id": ["r"] * n, "scored_at": [at] * n}
    cols = {f.name: pa.array(data.get(f.name, [None] * n), f.type) for f in schema}
    t = pa.table(cols, schema=schema)
    if bucket is not None:
        t = t.append_column("bucket", pa.array([bucket] * n, pa.int64()))
    return t


def _chunks(tmp_path, rows, batch=2, chunk_rows=3):
    batches = [_listing(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    return [c["path"] for c in shards.write_listing_chunks(FS, str(tmp_path / "_listing"), "u", batches,
                                                             chunk_rows=chunk_rows)]


def test_commit_keeps_staged_and_committed_rows_drops_unlisted_skips_unchanged_and_verifies(tmp_path):
    schema = output_schema()
    scores = tmp_path / "scores"
    scores.mkdir()
    ids = [f"img_{i:03d}.png" for i in range(40)]
    n_buckets = 8
    bk = shards.Buckets(n_buckets)
    bucket = dict(zip(ids, bk.of(shards.id_hash(ids))))
    listed = [(i, f"/c/{i}", "1:1", None) for i in ids]
    # first commit: everything staged
    staged_dir = tmp_path / "_staging"
    staged_dir.mkdir()
    for b in range(n_buckets):
        rows = [(i, f"/c/{i}", "1:1", "ok", None, 0.5) for i in ids if bucket[i] == b]
        if rows:
            pq.write_table(_score_rows(schema, rows, b), staged_dir / f"{b:06d}-{b:06d}-{b:032x}.parquet")
    staged = sorted(str(p) for p in staged_dir.iterdir())
    chunks = _chunks(tmp_path, listed)
    c = shards.commit_partition(FS, str(scores), listing_schema(), chunks, n_buckets, 0, n_buckets, {}, staged,
                                schema, CONST)
    assert (c["rows"], c["ok"], c["duplicates"], c["missing"], c["unexpected"]) == (40, 40, 0, 0, 0)
    files = {shards.parse_bucket_file(p.name): p for p in scores.iterdir()}
    assert c["written"] == len(files) == len(set(bucket.values()))
    table = pq.ParquetDataset(sorted(scores.iterdir())).read()
    assert sorted(table.column("image_id").to_pylist()) == ids
    mtimes = {b: os.stat(p).st_mtime_ns for b, p in files.items()}

    # second commit: one image dropped, one new staged, the rest unchanged
    gone, new = ids[0], "new.png"
    nb = int(bk.of(shards.id_hash([new]))[0])
    listed2 = [r for r in listed if r[0] != gone] + [(new, "/c/new.png", "2:2", None)]
    for p in staged_dir.iterdir():
        p.unlink()
    pq.write_table(_score_rows(schema, [(new, "/c/new.png", "2:2", "ok", None, 0.7)], nb),
                   staged_dir / f"{nb:06d}-{nb:06d}-{0:032x}.parquet")
    chunks = _chunks(tmp_path / "2", listed2)
    committed = {b: str(p) for b, p in files.items()}
    c2 = shards.commit_partition(FS, str(scores), listing_schema(), chunks, n_buckets, 0, n_buckets, committed,
                                 [str(p) for p in staged_dir.iterdir()], schema, CONST)
    assert (c2["rows"], c2["dropped"], c2["missing"], c2["duplicates"], c2["unexpected"]) == (40, 1, 0, 0, 0)
    touched = {bucket[gone], nb}
    assert c2["written"] == len(touched) and c2["unchanged"] == len(files) - len(touched)
    for b, p in files.items():
        if b not in touched:
            assert os.stat(p).st_mtime_ns == mtimes[b], "an unchanged bucket was rewritten"
    table = pq.ParquetDataset(sorted(scores.iterdir())).read()
    assert sorted(table.column("image_id").to_pylist()) == sorted([i for i, *_ in listed2])


def test_commit_prefers_final_rows_then_the_newest_and_reports_what_is_missing(tmp_path):
    schema = output_schema()
    scores = tmp_path / "scores"
    scores.mkdir()
    ids = ["a.png", "b.png", "c.png", "lost.png", "link.png"]
    listed = [(i, f"/c/{i}", "1:1", None) for i in ids[:4]] + [("link.png", "/c/link.png", None, "dangling symlink: t")]
    old = datetime(2020, 1, 1, tzinfo=timezone.utc)
    staged = _score_rows(schema, [
        ("a.png", "/c/a.png", "1:1", "error", "read failed: OSError: timeout", None),   # retryable, newer
        ("a.png", "/c/a.png", "1:1", "ok", None, 0.3),                                  # final: wins
        ("b.png", "/c/b.png", "1:1", "ok", None, 0.1),
        ("c.png", "/c/c.png", "0:0", "ok", None, 0.2),  # an older version of c: does not fit
    ], 0, at=old)
    newer = _score_rows(schema, [("b.png", "/c/b.png", "1:1", "ok", None, 0.9)], 0)
    st = tmp_path / "_staging"
    st.mkdir()
    pq.write_table(pa.concat_tables([staged, newer]), st / f"{0:06d}-{0:06d}-{1:032x}.parquet")
    (st / f"{0:06d}-{0:06d}-{2:032x}.parquet").write_bytes(b"PAR1 torn")  # a torn staging file is ignored
    chunks = _chunks(tmp_path, listed)
    c = shards.commit_partition(FS, str(scores), listing_schema(), chunks, 1, 0, 1, {},
                                sorted(str(p) for p in st.iterdir()), schema, CONST)
    assert c["torn_staging"] == 1
    assert c["missing"] == 2 and c["rows"] == 3  # c.png (only another version staged) and lost.png: no row
    rows = {r["image_id"]: r for r in pq.read_table(scores / shards.bucket_file(0)).to_pylist()}
    assert rows["a.png"]["status"] == "ok" and rows["a.png"]["odin"] == 0.3
    assert rows["b.png"]["odin"] == 0.9
    assert rows["link.png"]["status"] == "error" and rows["link.png"]["error"] == "dangling symlink: t"
    assert rows["link.png"]["model_id"] == CONST["model_id"]


def test_plan_partition_reports_duplicates_and_writes_only_the_rows_to_score(tmp_path):
    rows = [(f"{i}.png", f"/c/{i}.png", "1:1", None) for i in range(10)] + [("3.png", "/c/other.png", "1:1", None)]
    chunks = _chunks(tmp_path, rows)
    res = shards.plan_partition(FS, str(tmp_path), listing_schema(), chunks, 1, 0, 1, {}, [],
                                str(tmp_path / "plan.parquet"))
    assert res["n_duplicates"] == 1 and res["duplicates"] == [("3.png", 2)]
    chunks = _chunks(tmp_path / "ok", rows[:10])
    res = shards.plan_partition(FS, str(tmp_path), listing_schema(), chunks, 4, 0, 4, {}, [],
                                str(tmp_path / "plan.parquet"))
    assert res["todo"] == res["new"] == res["listed"] == 10
    plan = pq.read_table(tmp_path / "plan.parquet")
    assert sorted(plan.column("image_id").to_pylist()) == sorted(r[0] for r in rows[:10])
    assert plan.column("bucket").to_pylist() == sorted(plan.column("bucket").to_pylist())


def test_listing_chunks_are_sorted_by_hash_and_read_back_per_bucket_range(tmp_path):
    rows = [(f"img_{i:04d}.png", f"/c/{i}", f"{i}:0", None) for i in range(1000)]
    chunks = _chunks(tmp_path, rows, batch=100, chunk_rows=300)
    assert [pq.read_metadata(c).num_rows for c in chunks] == [300, 300, 300, 100]
    h = pq.read_table(chunks[0]).column("h").to_pylist()
    assert h == sorted(h)
    bk = shards.Buckets(13)
    seen = []
    for lo, hi in ((0, 4), (4, 9), (9, 13)):
        t = shards.read_listing(FS, chunks, bk, lo, hi, listing_schema())
        assert set(t.column("bucket").to_pylist()) <= set(range(lo, hi))
        seen += t.column("image_id").to_pylist()
    assert sorted(seen) == [r[0] for r in rows]


def test_plan_after_a_kill_counts_staged_rows_as_done(tmp_path):
    """A killed run's staging files: the rerun's plan scores only the rest (the resume path)."""
    schema = output_schema()
    ids = [f"img_{i:03d}.png" for i in range(30)]
    n_buckets = 5
    bucket = dict(zip(ids, shards.Buckets(n_buckets).of(shards.id_hash(ids))))
    chunks = _chunks(tmp_path, [(i, f"/c/{i}", "1:1", None) for i in ids], batch=7, chunk_rows=10)
    st = tmp_path / "_staging"
    st.mkdir()
    done = [i for i in ids if bucket[i] in (1, 3)]
    for b in (1, 3):
        rows = [(i, f"/c/{i}", "1:1", "ok", None, 0.5) for i in done if bucket[i] == b]
        pq.write_table(_score_rows(schema, rows, b).sort_by("bucket"), st / f"{b:06d}-{b:06d}-{b:032x}.parquet")
    res = shards.plan_partition(FS, str(tmp_path), listing_schema(), chunks, n_buckets, 0, n_buckets, {},
                                sorted(str(p) for p in st.iterdir()), str(tmp_path / "plan.parquet"))
    assert (res["reused"], res["todo"], res["new"]) == (len(done), 30 - len(done), 30 - len(done))
    todo = set(pq.read_table(tmp_path / "plan.parquet").column("image_id").to_pylist())
    assert todo == set(ids) - set(done)
