"""Issue 23, step 1: the table-format prototypes of ``benchmarks/table_formats.py`` at 2,000 rows.

Apache Iceberg (pyiceberg, SQLite catalog) and Delta Lake (delta-rs), each on a local disk and on
moto's S3 server: a night of new images adds files and rewrites none; a mixed night (+1 % new,
−0.1 % gone, 0.1 % changed) is one commit that leaves exactly one row per image; a writer SIGKILLed
mid-commit leaves readers the previous snapshot or the next one, whole, and the rerun is exact; of
two writers that commit at once from the same snapshot one wins and the other fails cleanly, then
succeeds on a retry; time travel by version and by timestamp. Needs the ``tables`` extra: skipped
with the reason when it is missing, failed under ``CI=true`` (``scripts/setup`` installs it).
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from benchmarks import table_formats as tf
from conftest import real_part_missing

ROWS = 2_000


@pytest.fixture(autouse=True)
def _tables_extra():
    missing = tf.have_tables_extra()
    if missing:
        real_part_missing("tables extra (pyiceberg, deltalake)", missing)


def _layout(kind: str, tmp_path, s3=None, bucket=None):
    if kind == "iceberg":
        root = f"s3://{bucket}/iceberg" if s3 else str(tmp_path / "warehouse")
        return tf.Iceberg(root, str(tmp_path / "catalog.db"), s3.endpoint if s3 else None)
    root = f"s3://{bucket}/delta/scores" if s3 else str(tmp_path / "scores")
    return tf.Delta(root, s3.endpoint if s3 else None)


def _created(kind, tmp_path, s3=None, bucket=None, seed=0):
    lay = _layout(kind, tmp_path, s3, bucket)
    base = tf.make_rows(ROWS, seed=seed)
    lay.create(base)
    lay.reload()
    return lay, base


@pytest.mark.parametrize("kind", ["iceberg", "delta"])
def test_a_night_of_new_images_adds_files_and_rewrites_none(kind, tmp_path):
    lay, base = _created(kind, tmp_path)
    old_files = dict(lay.data_files())
    new = tf.make_rows(ROWS // 100, seed=1, prefix="added")
    m = tf.measure_night(lay, "append", new)
    files = dict(lay.data_files())
    assert all(files.get(p) == size for p, size in old_files.items()), "a data file of the table was rewritten"
    added = [p for p in files if p not in old_files]
    assert len(added) >= 1
    import pyarrow.parquet as pq

    assert sum(pq.ParquetFile(p).metadata.num_rows for p in added) == new.num_rows
    assert m["written_data_bytes"] == sum(files[p] for p in added) < 0.05 * m["table_bytes"]
    got = lay.read()
    assert got.num_rows == ROWS + new.num_rows and tf.unique_ids(got)


def test_todays_layout_rewrites_every_bucket_a_new_image_lands_in(tmp_path):
    """The baseline the formats are compared with: one file per bucket, each touched bucket rewritten whole."""
    lay = tf.Today(str(tmp_path / "scores"), shard_rows=100)
    base = tf.make_rows(ROWS, seed=0)
    lay.create(base)
    before = tf.snapshot_files(lay.root)
    new = tf.make_rows(ROWS // 100, seed=1, prefix="added")
    lay.append(new)
    from jobs.shards import Buckets, id_hash

    touched = len(set(Buckets(lay.n_buckets).of(id_hash(new.column("image_id").to_pylist())).tolist()))
    written, files = tf.written_bytes(before, tf.snapshot_files(lay.root))
    assert files == touched > 1
    assert tf.same_rows(lay.read(), pa.concat_tables([base, new]))


@pytest.mark.parametrize("kind", ["iceberg", "delta"])
def test_a_mixed_night_is_exact_and_time_travel_reads_the_night_before(kind, tmp_path):
    lay, base = _created(kind, tmp_path)
    night = tf.make_night(base, seed=2)
    assert night.counts == {"new": 20, "gone": 2, "changed": 2}
    m = tf.measure_night(lay, "apply", night)
    # one commit; pyiceberg's overwrite records it as two snapshots (delete, then append), and the
    # first one is the night half applied: time travel to it reads neither the night before nor after
    assert m["snapshots_added"] == {"delta": 1, "iceberg": 2}[kind]
    if kind == "iceberg":
        half = lay.read_version(lay.tbl.snapshots()[-2].snapshot_id)
        assert not tf.same_rows(half, base) and not tf.same_rows(half, night.after)
        assert half.num_rows == ROWS - night.counts["gone"] - night.counts["changed"]
    got = lay.read()
    assert tf.same_rows(got, night.after) and tf.unique_ids(got)
    # the same night again changes nothing (the rerun of a night whose commit did land)
    lay.apply(night)
    lay.reload()
    again = lay.read()
    assert tf.same_rows(again, night.after) and tf.unique_ids(again)
    travel, _ = tf.time_travel(lay, night.after)
    assert travel == {"by_version": True, "by_timestamp": True, "latest": True}


def _check_kills(trials, sqlkill):
    assert all(t["reader_saw"] in ("before", "after") for t in trials), trials
    assert all(t["rerun_exact"] and t["rerun_unique"] for t in trials), trials
    assert any(t["killed"] for t in trials), trials
    if sqlkill:  # killed inside the catalog's transaction: the commit did not land
        first = trials[0]
        assert first["mode"] == "sqlkill" and first["killed"] and first["reader_saw"] == "before", first
        assert not first["version_moved"] and first["files_left_by_killed_writer"] > 0, first


def _check_writers(res):
    firsts = [res[k]["first"] for k in ("A", "B")]
    assert firsts.count("committed") == 1, res  # one wins ...
    loser = next(k for k in ("A", "B") if res[k]["first"] != "committed")
    assert res[loser]["first"].split(":")[0] in ("CommitFailedException", "ValidationException",
                                                  "CommitFailedError"), res  # ... the other fails cleanly ...
    assert res[loser]["retry"] == "committed", res  # ... and succeeds when it retries on the new snapshot
    assert res["final_matches_commit_order"] and res["final_unique"], res


@pytest.mark.parametrize("kind", ["iceberg", "delta"])
def test_kill_mid_commit_and_two_writers_local(kind, tmp_path):
    lay, base = _created(kind, tmp_path)
    trials, cur = tf.kill_trials(lay, base, tmp_path, trials=3, sqlkill=kind == "iceberg")
    _check_kills(trials, kind == "iceberg")
    res, _ = tf.two_writers(lay, cur, tmp_path)
    _check_writers(res)


@pytest.mark.parametrize("kind", ["iceberg", "delta"])
def test_kill_mid_commit_and_two_writers_on_s3(kind, tmp_path, s3_server, s3_bucket):
    """Delta on S3 commits with a conditional PUT (If-None-Match: *), which moto honours; Iceberg's commit
    is the SQL catalog's row update."""
    lay, base = _created(kind, tmp_path, s3_server, s3_bucket)
    night = tf.make_night(base, seed=2)
    m = tf.measure_night(lay, "apply", night, s3_server)
    assert m["files_written"] > 0 and tf.same_rows(lay.read(), night.after)
    trials, cur = tf.kill_trials(lay, night.after, tmp_path, trials=2, s3=s3_server, sqlkill=kind == "iceberg")
    _check_kills(trials, kind == "iceberg")
    res, _ = tf.two_writers(lay, cur, tmp_path, s3=s3_server)
    _check_writers(res)
