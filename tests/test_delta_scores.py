"""Issue 23, step 2 (readers): a Delta table is a score table — its current version, not its folder.

A score table written as a Delta table, then a second version that replaces some rows (delete +
append: the replaced rows' file stays on disk until vacuumed) and adds new ones: ``ScoreTable.open``
reads exactly the current version's rows, never the stale file, locally and on moto's S3 server;
``odin-audit calibrate`` reads Delta tables through it; an earlier version reads by ``as_of``.
deltalake is a dependency: skipped with the reason if it is missing, failed under ``CI=true``.
"""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import real_part_missing
from jobs.cli import main as cli
from odin_engine.errors import ConfigError
from odin_engine.io.results import current, open_flags
from odin_engine.io.scores import ScoreTable, output_schema
from odin_engine.io.store import Store
from test_scores import table

REPLACED = [f"c-{i:06d}" for i in range(0, 40, 4)]  # 10 of the 40 first-version rows get new scores
GONE = ["c-000001", "c-000002"]


@pytest.fixture(autouse=True)
def _deltalake():
    try:
        import deltalake  # noqa: F401
    except ImportError:
        real_part_missing("deltalake", "deltalake not installed (a dependency of odin-audit: pip install -e .)")


def _s3_opts(s3) -> dict:
    return {**{k: v for k, v in s3.env.items() if k.startswith("AWS_")}, "AWS_ALLOW_HTTP": "true"}


def _two_versions(uri: str, opts: dict | None) -> pa.Table:
    """Version 0: 40 rows; version 1: 10 rows replaced (new odin scores), 2 gone, 5 new; returns
    the rows version 1 must read as, built here independently of Delta."""
    from deltalake import DeltaTable, write_deltalake

    first = table(40, prefix="c", errors=3)
    write_deltalake(uri, first, mode="error", storage_options=opts)
    old = first.filter(pc.is_in(first.column("image_id"), pa.array(REPLACED)))
    new_scores = pc.add(old.column("odin"), 100.0)
    replaced = old.set_column(old.schema.get_field_index("odin"), "odin", new_scores)
    added = table(5, 100, prefix="c")
    dt = DeltaTable(uri, storage_options=opts)
    dt.delete("image_id IN (" + ", ".join(f"'{i}'" for i in REPLACED + GONE) + ")")  # rewrites the file: v1
    write_deltalake(uri, pa.concat_tables([replaced, added]), mode="append", storage_options=opts)  # v2
    kept = first.filter(pc.invert(pc.is_in(first.column("image_id"), pa.array(REPLACED + GONE))))
    return pa.concat_tables([kept, replaced, added])


def _rows(t: pa.Table) -> list[tuple]:
    return sorted(zip(t.column("image_id").to_pylist(), t.column("status").to_pylist(), t.column("odin").to_pylist()))


def _check_current_version(t: ScoreTable, expected: pa.Table, files_on_disk: list[pa.Table]) -> None:
    on_disk = sum(f.num_rows for f in files_on_disk)
    assert on_disk == 40 + expected.num_rows  # the first version's file is still there, whole
    assert t.count() == expected.num_rows == 43
    assert _rows(t.read()) == _rows(expected)
    assert t.check_unique_ids() == 43  # a folder glob would hold the 10 replaced ids twice
    assert t.settings() == {"model_id": "m@sha256:0", "temperature": 1000.0, "epsilon": 0.0014}
    assert t.schema.field("image_id").type == pa.string() and t.schema.field("scored_at").type == \
        output_schema().field("scored_at").type
    assert t.fit_id() is None  # a table written without the score job's description (no odin.* settings)
    ok = pc.field("status") == "ok"
    assert sum(b.num_rows for b in t.batches(["odin"], ok, batch_size=8)) == 40 == t.count(ok)
    high = t.where(ok & (pc.field("odin") > 100.0))  # the replaced rows' new scores, filtered after the cast
    assert sorted(high.read(["image_id"]).column(0).to_pylist()) == REPLACED == sorted(
        r[0] for r in _rows(expected) if r[2] is not None and r[2] > 100)
    assert high.read().schema == t.schema and high.count() == 10


def test_a_local_delta_table_reads_as_its_current_version(tmp_path):
    from deltalake import DeltaTable

    root = tmp_path / "job" / "scores"  # a score job's --output holding its table as Delta
    expected = _two_versions(str(root), None)
    stale = [pq.read_table(p) for p in root.glob("*.parquet")]
    for source in (root, root.parent):
        t = ScoreTable.open(str(source))
        _check_current_version(t, expected, stale)
        assert t.files == len(DeltaTable(str(root)).file_uris()) < len(stale)


def test_an_earlier_version_reads_as_it_was_by_number_and_date_and_a_plain_folder_has_none(tmp_path):
    from datetime import datetime, timezone

    from deltalake import DeltaTable

    root = tmp_path / "scores"
    expected = _two_versions(str(root), None)
    first = table(40, prefix="c", errors=3)  # what version 0 holds (built independently)
    assert _rows(ScoreTable.open(str(root), as_of=0).read()) == _rows(first)
    assert _rows(ScoreTable.open(str(root), as_of=DeltaTable(str(root)).version()).read()) == _rows(expected)
    assert _rows(ScoreTable.open(str(root), as_of=datetime.now(timezone.utc).isoformat()).read()) == _rows(expected)
    with pytest.raises(ConfigError, match="version"):
        ScoreTable.open(str(root), as_of=99)
    pq.write_table(first, tmp_path / "plain.parquet")
    with pytest.raises(ConfigError, match="not a Delta table"):
        ScoreTable.open(str(tmp_path / "plain.parquet"), as_of=0)


def test_a_delta_table_on_s3_reads_as_its_current_version(s3_server, s3_bucket, monkeypatch):
    from deltalake import DeltaTable

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3_bucket}/job/scores"
    expected = _two_versions(uri, _s3_opts(s3_server))
    s3 = s3_server.filesystem()
    keys = [i.path for i in s3.get_file_info(__import__("pyarrow.fs").fs.FileSelector(f"{s3_bucket}/job/scores"))
            if i.path.endswith(".parquet")]
    stale = [pq.read_table(k, filesystem=s3) for k in keys]
    t = ScoreTable.open(f"s3://{s3_bucket}/job")
    _check_current_version(t, expected, stale)
    assert t.files == len(DeltaTable(uri, storage_options=_s3_opts(s3_server)).file_uris()) < len(stale)


def _calibrate_on_delta(corpus: str, held: str, out: str, opts: dict | None, tmp_path, monkeypatch) -> None:
    from deltalake import write_deltalake

    expected = _two_versions(corpus, opts)
    write_deltalake(held, table(150, prefix="h"), mode="error", storage_options=opts)
    monkeypatch.chdir(tmp_path)
    assert cli(["calibrate", "--scores", corpus, "--heldout-scores", held, "--output", out]) == 0
    result = current(Store(out))
    cal = result.read_json("calibration.json")
    flags = open_flags(out).to_pandas()  # the current result's flags: a version of the Delta table out/flags
    assert open_flags(out).version == 0 and open_flags(out).result_id == cal["result_id"]
    assert cal["summary"]["n_ok"] == 40 and sorted(flags["image_id"]) == sorted(expected["image_id"].to_pylist())
    ok = flags[flags["status"] == "ok"]
    assert (ok["is_outlier"] == (ok["odin"] < cal["delta"])).all()
    replaced = ok[ok["image_id"].isin(REPLACED)]
    assert len(replaced) == 10 and (replaced["odin"] > 100).all()  # the current scores, not the replaced ones


def test_calibrate_reads_local_delta_tables(tmp_path, monkeypatch):
    _calibrate_on_delta(str(tmp_path / "corpus"), str(tmp_path / "held"), str(tmp_path / "cal"), None,
                        tmp_path, monkeypatch)


def test_calibrate_reads_delta_tables_on_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    base = f"s3://{s3_bucket}"
    _calibrate_on_delta(f"{base}/corpus", f"{base}/held", f"{base}/cal", _s3_opts(s3_server), tmp_path, monkeypatch)
    assert list(tmp_path.iterdir()) == []  # nothing local


def test_without_deltalake_a_delta_table_is_a_configuration_error(tmp_path, monkeypatch, capsys):
    from deltalake import write_deltalake

    write_deltalake(str(tmp_path / "corpus"), table(10, prefix="c"), mode="error")
    monkeypatch.setitem(sys.modules, "deltalake", None)  # `import deltalake` now raises ImportError
    with pytest.raises(ConfigError, match=r"needs the deltalake package"):
        ScoreTable.open(str(tmp_path / "corpus"))
    pq.write_table(table(150, prefix="h"), tmp_path / "h.parquet")
    assert cli(["calibrate", "--scores", str(tmp_path / "corpus"), "--heldout-scores", str(tmp_path / "h.parquet"),
                "--output", str(tmp_path / "cal")]) == 2
    assert "deltalake" in capsys.readouterr().err and not (tmp_path / "cal").exists()
