"""jobs.table_commit: the score job's Delta commit, step by step as the driver runs it, without Ray.

Night 1 stages 40 rows and commits them as version 0. Night 2: one image gone, one new (staged),
one image's carried ``label`` changed (its scores kept, its row rewritten), the rest unchanged:
the range tasks write one new file and record the removals, the touched file is rewritten
without them, one version commits both, and the verification over it finds every listed image
once; version 0 still reads as night 1 left it.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs import shards, table_commit
from odin_engine.io.corpus import listing_schema
from odin_engine.io.delta import DeltaLocation, add_action, commit, remove_action, version_files
from odin_engine.io.scores import ScoreTable, output_schema
from test_shards import CONST, _score_rows

FS = pafs.LocalFileSystem()
CARRIED = pa.schema([pa.field("label", pa.string())])
N_BUCKETS = 8


def _listing(rows):
    """rows: (image_id, uri, version, label)."""
    ids, uris, vers, labels = map(list, zip(*rows))
    return pa.table({"image_id": ids, "uri": uris, "version": vers, "listing_error": [None] * len(ids),
                     "label": labels}, schema=listing_schema(CARRIED))


def _chunks(directory, rows):
    return [c["path"] for c in shards.write_listing_chunks(FS, str(directory), "u", [_listing(rows)], chunk_rows=16)]


def _stage(directory, schema, rows, labels):
    """Staged rows (what the scoring actors write), one file per bucket, with their carried label."""
    directory.mkdir(parents=True, exist_ok=True)
    bk = shards.Buckets(N_BUCKETS)
    by_bucket: dict[int, list] = {}
    for r in rows:
        by_bucket.setdefault(int(bk.of(shards.id_hash([r[0]]))[0]), []).append(r)
    for b, rs in by_bucket.items():
        t = _score_rows(output_schema(), rs, b)
        t = t.add_column(t.schema.get_field_index("bucket"), "label", pa.array([labels[r[0]] for r in rs]))
        pq.write_table(t.select(schema.names).cast(schema), directory / f"{b:06d}-{b:06d}-{b:032x}.parquet")
    return sorted(str(p) for p in directory.iterdir())


def _night(tmp_path, name, loc, schema, listed, staged):
    """The driver's steps of ``jobs.score.commit_delta`` for one range holding every bucket."""
    table = loc.open() if loc.exists() else None
    version = shards.VersionFiles(version_files(loc, table, "bucket"), schema) if table is not None else None
    work = tmp_path / name / "_commit"
    work.mkdir(parents=True)
    FS.create_dir(loc.path)  # as the driver does before the range tasks
    chunks = _chunks(tmp_path / name / "_listing", listed)
    res = table_commit.commit_range(FS, loc.path, listing_schema(CARRIED), chunks, N_BUCKETS, 0, N_BUCKETS, version,
                                    staged, schema, CONST, f"part-{name}-000000.parquet", str(work / "r0.parquet"))
    entries = [res["entry"]] if res["entry"] else []
    removals = res["removals"]
    rows_of = {f.path: f for f in version.files} if version else {}
    for i, path in enumerate(sorted(p for p, n in removals.items() if n < rows_of[p].rows)):
        entries.append(table_commit.rewrite_file(FS, loc.path, path, [res["removals_file"]], schema,
                                                 f"part-{name}-w{i:06d}.parquet"))
    v = table.version() if table is not None else None
    if entries or removals:  # as the driver: a night without change commits nothing
        v = commit(loc, schema, [add_action(e) for e in entries],
                   [remove_action(loc, p, rows_of[p].size) for p in sorted(removals)], base=table,
                   settings={"odin.model_id": "m@sha256:0"}, metadata={"odin.run_id": "r"})
    after = shards.VersionFiles(version_files(loc, loc.open(), "bucket"), schema)
    check = table_commit.verify_range(FS, listing_schema(CARRIED), chunks, N_BUCKETS, 0, N_BUCKETS, after)
    return v, res, check


def test_a_night_commits_one_version_keeps_unchanged_rows_and_rewrites_only_what_changed(tmp_path):
    schema = output_schema(CARRIED).append(pa.field("bucket", pa.int64()))
    loc = DeltaLocation(FS, str(tmp_path / "scores"))
    ids = [f"img_{i:03d}.png" for i in range(40)]
    labels = {i: "cat" for i in ids}
    rows = [(i, f"/c/{i}", "1:1", "ok", None, 0.5) for i in ids]
    staged = _stage(tmp_path / "st1", schema, rows, labels)
    v0, r0, c0 = _night(tmp_path, "n1", loc, schema, [(i, f"/c/{i}", "1:1", "cat") for i in ids], staged)
    assert v0 == 0 and r0["written_rows"] == 40 and r0["removals"] == {}
    assert (c0["rows"], c0["duplicates"], c0["missing"], c0["unexpected"]) == (40, 0, 0, 0)
    night1 = {r["image_id"]: r for r in ScoreTable.open(loc.path).read().to_pylist()}

    gone, relabelled, new = ids[0], ids[1], "new.png"
    listed = [(i, f"/c/{i}", "1:1", "dog" if i == relabelled else "cat") for i in ids if i != gone]
    listed.append((new, f"/c/{new}", "2:2", "cat"))
    staged = _stage(tmp_path / "st2", schema, [(new, f"/c/{new}", "2:2", "ok", None, 0.7)], {new: "cat"})
    v1, r1, c1 = _night(tmp_path, "n2", loc, schema, listed, staged)
    assert v1 == 1
    assert (r1["written_rows"], r1["kept_rows"], r1["from_staging"], r1["dropped"]) == (2, 38, 1, 1)
    assert sum(r1["removals"].values()) == 2  # the gone image's row and the relabelled image's old row
    assert (c1["rows"], c1["duplicates"], c1["missing"], c1["unexpected"]) == (40, 0, 0, 0)
    rows1 = {r["image_id"]: r for r in ScoreTable.open(loc.path).read().to_pylist()}
    assert sorted(rows1) == sorted(i for i, *_ in listed)
    assert rows1[relabelled]["label"] == "dog"  # today's carried value
    for k in ("odin", "scored_at", "run_id"):  # its scores were kept, not recomputed
        assert rows1[relabelled][k] == night1[relabelled][k]
    assert all(rows1[i] == night1[i] for i in ids[2:])  # unchanged rows, as they were
    assert rows1[new]["odin"] == 0.7
    # the night before is still there, whole (time travel), and a night without change commits nothing
    assert {r["image_id"]: r for r in ScoreTable.open(loc.path, as_of=0).read().to_pylist()} == night1
    v2, r2, c2 = _night(tmp_path, "n3", loc, schema, listed, [])
    assert v2 == 1 and r2["written_rows"] == 0 and r2["removals"] == {} and c2["rows"] == 40
    names = {posixpath.basename(u) for u in loc.open().file_uris()}
    assert names and all(n.startswith(("part-n1-", "part-n2-")) for n in names)
