"""The score-table contract and the Store: any Parquet dataset in the schema is read (nested folders,
one file, a compacted copy), ``_``/``.`` names are not part of it, columns and filters are pushed into
the scan, duplicates are found exactly in bounded memory, writes are atomic — locally and on real
S3 (moto server) and GCS (emulator) APIs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as cli
from odin_engine import methods
from odin_engine.errors import ConfigError
from odin_engine.io.results import current, open_flags
from odin_engine.io.scores import OK, ScoreTable, output_schema
from odin_engine.io.store import Store


def table(n: int, start: int = 0, prefix: str = "img", errors: int = 0, **settings) -> pa.Table:
    rng = np.random.default_rng(start)
    status = ["ok"] * (n - errors) + ["error"] * errors
    cols = {
        "image_id": [f"{prefix}-{start + i:06d}" for i in range(n)], "uri": [f"/x/{i}.png" for i in range(n)],
        "status": status, "error": [None] * (n - errors) + ["broken"] * errors,
        "width": [32] * n, "height": [32] * n, "pred": list(rng.integers(0, 10, n)),
        **{m: [float(v) if st == "ok" else None for v, st in zip(rng.uniform(size=n), status)]
           for m in methods.TABLE_METHODS},
        "temperature": [settings.get("temperature", 1000.0)] * n, "epsilon": [settings.get("epsilon", 0.0014)] * n,
        "model_id": [settings.get("model_id", "m@sha256:0")] * n, "run_id": ["r"] * n,
        "scored_at": [None] * n, "version": [None] * n,
    }
    return pa.Table.from_pydict(cols, schema=output_schema())


def test_schema_columns_come_from_the_one_method_registry():
    names = output_schema().names
    assert [c for c in names if c in methods.REGISTRY] == list(methods.TABLE_METHODS)
    assert set(methods.TABLE_METHODS) == {"msp", "max_logit", "energy", "odin", "gen", "scale", "ash_s", "react",
                                          "knn", "vim", "nci", "fdbd", "adascale"}


def test_any_parquet_layout_is_one_dataset_and_state_is_ignored(tmp_path):
    job = tmp_path / "job"  # a score job's --output: the table under scores/, state beside and inside
    (job / "scores" / "a" / "b").mkdir(parents=True)
    (job / "_checkpoint").mkdir()
    pq.write_table(table(5), job / "scores" / "part-0.parquet")
    pq.write_table(table(7, 5), job / "scores" / "a" / "b" / "part-1.parquet")  # nested
    pq.write_table(table(3, 100), job / "scores" / "_tmp.parquet")  # state: ignored
    (job / "scores" / ".hidden").mkdir()
    pq.write_table(table(3, 200), job / "scores" / ".hidden" / "x.parquet")  # ignored
    pq.write_table(table(3, 300), job / "_checkpoint" / "c.parquet")  # beside scores/: ignored
    (job / "scores" / "_SUCCESS").write_text("")
    (job / "run.json").write_text("{}")
    t = ScoreTable.open(str(job))
    assert t.count() == 12 and t.files == 2
    assert ScoreTable.open(str(job / "scores")).count() == 12
    one = tmp_path / "compacted.parquet"  # e.g. COPY (SELECT * FROM 'job/scores/**/*.parquet') TO … in DuckDB
    pq.write_table(t.read(), one)
    assert ScoreTable.open(str(one)).count() == 12


def test_projection_filter_and_batches(tmp_path):
    pq.write_table(table(200, errors=20), tmp_path / "p.parquet")
    t = ScoreTable.open(str(tmp_path))
    batches = list(t.batches(["odin"], OK, batch_size=64))
    assert [b.schema.names for b in batches][0] == ["odin"]
    assert sum(b.num_rows for b in batches) == 180 and max(b.num_rows for b in batches) <= 64
    sub = t.where(pa.compute.field("pred") == 3)
    assert sub.count() == int((t.read(["pred"]).column("pred").to_numpy() == 3).sum())


def test_a_file_whose_optional_column_is_all_null_does_not_fix_its_type(tmp_path):
    a = table(4).drop_columns(["error"]).append_column("error", pa.nulls(4))  # as pandas writes all-None
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(table(4, 4, errors=2), tmp_path / "b.parquet")
    t = ScoreTable.open(str(tmp_path))
    assert t.read(["error"]).column("error").null_count == 6


@pytest.mark.parametrize("budget", [1 << 20, 7])
def test_duplicates_are_found_exactly_in_bounded_passes(tmp_path, budget):
    pq.write_table(table(40), tmp_path / "a.parquet")
    pq.write_table(table(40, 40), tmp_path / "b.parquet")
    assert ScoreTable.open(str(tmp_path)).check_unique_ids(budget=budget) == 80
    pq.write_table(table(3, 38), tmp_path / "c.parquet")  # 38, 39 again, and 40 again
    with pytest.raises(ConfigError, match="3 image_ids more than once"):
        ScoreTable.open(str(tmp_path)).check_unique_ids(budget=budget)


def test_open_refuses_what_is_not_a_score_table(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ScoreTable.open(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no Parquet files"):
        ScoreTable.open(str(tmp_path / "empty"))
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ConfigError, match="not a score table"):
        ScoreTable.open(str(tmp_path / "other.parquet"))
    pq.write_table(pa.concat_tables([table(3), table(3, 3, temperature=10.0)]), tmp_path / "mixed.parquet")
    with pytest.raises(ConfigError, match="mix several values of temperature"):
        ScoreTable.open(str(tmp_path / "mixed.parquet")).settings()


def test_store_writes_are_atomic_and_leave_nothing_behind(tmp_path):
    s = Store(str(tmp_path / "o"))
    assert not s.exists()  # constructing a Store creates nothing
    s.write_json("a.json", {"x": np.int64(3), "y": np.float32(0.5)})
    s.join("sub").write_text("r.html", "<p>é</p>")
    s.write_parquet("t/one.parquet", table(3))
    assert s.read_json("a.json") == {"x": 3, "y": 0.5} and s.join("sub").read_text("r.html") == "<p>é</p>"
    assert s.read_text("missing.txt") is None and s.read_json("missing.json") is None
    assert pq.read_table(s.p("t/one.parquet")).num_rows == 3
    with pytest.raises(RuntimeError):
        with s.parquet_writer("t/partial.parquet", output_schema()) as w:
            w.write_table(table(2))
            raise RuntimeError("boom")
    assert not s.exists("t/partial.parquet")
    assert sorted(p.name for p in (tmp_path / "o").rglob("*")) == ["a.json", "one.parquet", "r.html", "sub", "t"]
    s.delete("t")
    assert not s.exists("t")


def _bucket_roundtrip(uri: str, env: dict, tmp_path, monkeypatch, *extra: str) -> None:
    """Store + ScoreTable + `odin-audit calibrate` from and to a bucket (``extra``: calibrate's options)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    root = Store(uri)
    root.join("corpus/scores/x").write_parquet("p0.parquet", table(30, errors=2, prefix="c"))
    root.join("corpus/scores").write_parquet("p1.parquet", table(30, 30, prefix="c"))
    root.join("corpus/_checkpoint").write_parquet("ignored.parquet", table(30, prefix="c"))
    root.join("held/scores").write_parquet("p.parquet", table(150, prefix="h"))
    t = ScoreTable.open(root.uri("corpus"))
    assert t.count() == 60 and t.check_unique_ids() == 60
    monkeypatch.chdir(tmp_path)
    rc = cli(["calibrate", "--scores", root.uri("corpus"), "--heldout-scores", root.uri("held"),
              "--output", root.uri("cal"), *extra])
    assert rc == 0
    assert list(tmp_path.iterdir()) == []  # nothing local
    result = current(root.join("cal"))  # the published result the pointer names (docs/decision-stage.md)
    cal = result.read_json("calibration.json")
    flags = open_flags(root.uri("cal")).to_pandas()  # that result's flags (a Delta version, or its own folder)
    assert len(flags) == 60 and cal["summary"]["n_ok"] == 58
    ok = flags[flags["status"] == "ok"]
    assert (ok["is_outlier"] == (ok["odin"] < cal["delta"])).all()
    # a rerun replaces the flags, it does not add to them
    assert cli(["calibrate", "--scores", root.uri("corpus"), "--heldout-scores", root.uri("held"),
                "--output", root.uri("cal"), *extra]) == 0
    rerun = current(root.join("cal"))
    assert rerun.uri() != result.uri() and open_flags(root.uri("cal")).read().num_rows == 60
    assert open_flags(root.uri("cal")).format == ("buckets" if extra else "delta")
    assert json.loads(rerun.read_bytes("flag_summary.json"))["overall"]["n_rows"] == 60


def test_s3_store_and_calibrate(s3_server, s3_bucket, tmp_path, monkeypatch):
    _bucket_roundtrip(f"s3://{s3_bucket}/runs", s3_server.env, tmp_path, monkeypatch)


def test_an_s3_write_is_one_object_and_one_put(s3_server, s3_bucket, monkeypatch):
    """On S3 a Store write creates the object and nothing else: no folder marker objects (``a/``,
    ``a/b/``), and a small file goes up in one PutObject (a plain MD5 ETag), not a multipart upload
    (an ETag ending ``-1``): one request where create_dir and a multipart upload made seven."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    root = Store(f"s3://{s3_bucket}/w")
    root.write_json("a/b/c.json", {"k": 1})
    with root.parquet_writer("a/d/p.parquet", output_schema()) as w:
        w.write_table(table(3))
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == ["w/a/b/c.json", "w/a/d/p.parquet"]
    assert all("-" not in o["ETag"] for o in listed), [o["ETag"] for o in listed]
    assert root.read_json("a/b/c.json") == {"k": 1} and pq.read_table(root.fs.open_input_file(
        root.p("a/d/p.parquet"))).num_rows == 3


def test_gcs_store_and_calibrate(gcs_server, tmp_path, monkeypatch):
    import uuid

    bucket = f"odin-{uuid.uuid4().hex[:10]}"
    gcs_server.filesystem().create_dir(bucket)
    # the flags in the per-result Parquet layout: delta-rs's GCS client speaks GCS's XML API, which the
    # emulator lacks (the Delta flags table is tested on S3)
    _bucket_roundtrip(f"gs://{bucket}/runs", gcs_server.env, tmp_path, monkeypatch, "--table-format", "buckets")


def test_pandas_reads_the_flags_dataset(tmp_path):
    """The README's recipes: the flags' Delta table is one table for pandas (through deltalake); a
    ``--table-format buckets`` output's folder of part files is one table for pandas itself."""
    from deltalake import DeltaTable

    pq.write_table(table(150, prefix="h"), tmp_path / "h.parquet")
    pq.write_table(table(20, prefix="c"), tmp_path / "c.parquet")
    for fmt in ("delta", "buckets"):
        assert cli(["calibrate", "--scores", str(tmp_path / "c.parquet"), "--heldout-scores",
                    str(tmp_path / "h.parquet"), "--output", str(tmp_path / fmt), "--table-format", fmt]) == 0
    flags = DeltaTable(str(tmp_path / "delta" / "flags")).to_pyarrow_table().to_pandas(
        types_mapper={pa.bool_(): pd.BooleanDtype(), pa.int64(): pd.Int64Dtype()}.get)
    assert len(flags) == 20 and str(flags["is_outlier"].dtype) == "boolean" and str(flags["rank"].dtype) == "Int64"
    flags = pd.read_parquet(tmp_path / "buckets" / "flags", dtype_backend="numpy_nullable")
    assert len(flags) == 20 and str(flags["is_outlier"].dtype) == "boolean" and str(flags["rank"].dtype) == "Int64"
