"""Issue 23, step 3: maintenance of Delta tables (odin_engine/io/maintenance.py, `odin-audit compact`).

Real Delta tables in the score schema, written here with deltalake (one append per "night"), local and
on moto's S3 server: compaction merges the small files and keeps every row; the automatic rule at its
edges; vacuum deletes only files no retained version references, and time travel to the kept versions
still reads them; versions resolved by number, date and run/audit id, with the errors; the `compact`
command in a subprocess (exit 0, the dry run and exit 2 write nothing).
"""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from _forkserver import run_command
from odin_engine.errors import ConfigError
from odin_engine.io import maintenance as m
from odin_engine.io.scores import ScoreTable, _canonical, output_schema
from test_scores import table


def _s3_opts(s3) -> dict:
    return {**{k: v for k, v in s3.env.items() if k.startswith("AWS_")}, "AWS_ALLOW_HTTP": "true"}


def _nights(uri: str, nights: int, rows: int = 25, opts: dict | None = None, ids=None) -> pa.Table:
    """``nights`` appends of ``rows`` new images each (one small file and one version per night; the
    commit of night i carries ``ids[i]`` as its run id); returns every row written."""
    from deltalake import CommitProperties, write_deltalake

    written = []
    for i in range(nights):
        t = table(rows, start=i * rows, prefix="c", errors=1)
        meta = {m.RUN_ID_KEY: ids[i]} if ids else None
        write_deltalake(uri, t, mode="append", storage_options=opts,
                        commit_properties=CommitProperties(custom_metadata=meta) if meta else None)
        written.append(t)
    return pa.concat_tables(written)


def _rows(t: pa.Table) -> list[tuple]:
    """Every value of every row, in the score schema's column order, sorted by image_id."""
    t = t.select(output_schema().names).cast(output_schema())
    return sorted(zip(*(t.column(c).to_pylist() for c in t.column_names)))


def _read(uri: str, as_of=None) -> pa.Table:
    return m.open_delta_version(uri, as_of).dataset.to_table()


def _files_on_disk(fs, path: str) -> set[str]:
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File}


# --------------------------------------------------------------------------- compaction
def _check_compaction(uri: str, nights: int, written: pa.Table, rg_rows: int = m.ROW_GROUP_ROWS) -> None:
    from deltalake import DeltaTable

    from odin_engine.io.delta import storage_options

    loc = m.locate(uri)
    before = m.file_stats(uri)
    assert before.files == nights and m.needs_compaction(uri)  # all small: they hold 100 % of the bytes
    r = m.compact(uri, row_group_rows=rg_rows)
    dt = DeltaTable(loc.uri, storage_options=storage_options(loc.fs))
    assert (r.files_before, r.bytes_before, r.due) == (nights, before.bytes, True)
    assert r.version_after == r.version_before + 1 == dt.version()  # one version
    assert r.files_removed == nights and r.files_added == r.files_after == len(dt.file_uris()) == 1
    assert r.bytes_after == sum(m.file_sizes(dt)) == r.bytes_written
    assert _rows(_read(uri)) == _rows(written)  # every row, every value, unchanged
    assert not m.needs_compaction(uri)
    merged = pq.ParquetFile(loc.fs.open_input_file(posixpath.join(loc.path, dt.get_add_actions().column("path")[0].as_py())))
    assert merged.metadata.num_rows == written.num_rows
    assert max(merged.metadata.row_group(i).num_rows for i in range(merged.metadata.num_row_groups)) <= rg_rows
    assert m.compact(uri).version_after == r.version_after  # nothing left to merge: no new version
    # the replaced files are still on disk (time travel) until a vacuum
    assert sum(1 for f in _files_on_disk(loc.fs, loc.path) if f.endswith(".parquet") and "/" not in f) == nights + 1
    st = ScoreTable.open(uri)  # the score table reader reads the compacted version, filters and all
    assert st.files == 1 and st.check_unique_ids() == written.num_rows
    assert st.count(pc.field("status") == "ok") == pc.sum(pc.equal(written.column("status"), "ok")).as_py()


def test_compaction_merges_the_small_files_and_keeps_every_row(tmp_path):
    uri = str(tmp_path / "out" / "scores")
    _check_compaction(uri, 40, _nights(uri, 40), rg_rows=256)  # 1,000 rows: row groups of at most 256


def test_compaction_writes_row_groups_as_small_as_the_score_jobs():
    from jobs.table_commit import ROW_GROUP_ROWS

    assert m.ROW_GROUP_ROWS == ROW_GROUP_ROWS  # one size: bucket-range reads skip row groups after compaction too


def test_compaction_on_s3(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3_bucket}/out/scores"
    _check_compaction(uri, 6, _nights(uri, 6, opts=_s3_opts(s3_server)))


def test_a_dry_run_writes_nothing(tmp_path):
    uri = str(tmp_path / "scores")
    _nights(uri, 5)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    r = m.compact(uri, dry_run=True)
    assert r.dry_run and r.version_after == r.version_before == 4 and r.candidates == r.files_before == 5
    assert r.candidate_bytes == r.bytes_before == sum(m.file_sizes(uri))
    v = m.vacuum(uri, 0, dry_run=True)
    assert v.files == [] and v.bytes == 0  # nothing replaced, nothing orphaned yet
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


MIB = 1 << 20


@pytest.mark.parametrize("sizes, target, due, why", [
    ([], 128 * MIB, False, "an empty table"),
    ([5 * MIB], 128 * MIB, False, "one file: T = the table, not below T/2"),
    ([5 * MIB, 5 * MIB], 128 * MIB, False, "two halves: each exactly T/2, not below"),
    ([6 * MIB, 4 * MIB], 128 * MIB, False, "one small file alone: nothing to merge it with"),
    ([90, 5, 5], 10**9, True, "two small files holding exactly 10 % of the bytes"),
    ([91, 5, 4], 10**9, False, "two small files holding 9 % of the bytes"),
    ([200 * MIB] + [MIB] * 31, 128 * MIB, True, "31 small files: 13 % of the bytes"),
    ([2000 * MIB] + [MIB] * 31, 128 * MIB, False, "31 small files holding 1.5 %"),
    ([2000 * MIB] + [MIB] * 32, 128 * MIB, True, "32 small files, whatever their share"),
    ([2000 * MIB] + [64 * MIB] * 40, 128 * MIB, False, "files at T/2 are not small"),
    ([2000 * MIB] + [64 * MIB - 1] * 40, 128 * MIB, True, "just below T/2 they are"),
])
def test_the_automatic_rule_at_its_edges(sizes, target, due, why):
    s = m.FileStats.of(sizes, target)
    total = sum(sizes)
    t = min(target, total)
    small = [x for x in sizes if x < t / 2]
    assert (s.files, s.bytes, s.target_bytes, s.small_files, s.small_bytes) == (
        len(sizes), total, t, len(small), sum(small))
    assert s.due is due, why


def test_needs_compaction_reads_the_sizes_from_the_log(tmp_path):
    uri = str(tmp_path / "scores")
    _nights(uri, 3, rows=400)
    sizes = m.file_sizes(uri)
    assert sorted(sizes) == sorted(p.stat().st_size for p in (tmp_path / "scores").glob("*.parquet"))
    assert m.needs_compaction(uri) is m.FileStats.of(sizes).due is True  # three ~equal files: each < T/2
    assert m.needs_compaction(uri, target_bytes=min(sizes)) is m.FileStats.of(sizes, min(sizes)).due


# --------------------------------------------------------------------------- vacuum and time travel
def _versions_then_vacuum(uri: str, fs, path: str, opts: dict | None):
    """v0: 20 rows; v1: +20 (a second file); v2: 5 rows deleted (v0's file rewritten); v3: compacted;
    plus a killed writer's orphan file and the job's `_` state. Returns each version's rows."""
    from deltalake import DeltaTable, write_deltalake

    first, second = table(20, prefix="c"), table(20, 20, prefix="c")
    write_deltalake(uri, first, mode="error", storage_options=opts)
    write_deltalake(uri, second, mode="append", storage_options=opts)
    gone = [f"c-{i:06d}" for i in range(5)]
    DeltaTable(uri, storage_options=opts).delete("image_id IN (" + ", ".join(f"'{g}'" for g in gone) + ")")
    assert m.compact(uri).version_after == 3
    with fs.open_output_stream(f"{path}/part-00000-dead-writer.snappy.parquet") as fh:
        pq.write_table(table(3, 900, prefix="x"), fh)  # no version names it
    with fs.open_output_stream(f"{path}/_odin_job.json") as fh:
        fh.write(b"{}")
    both = pa.concat_tables([first, second])
    kept = both.filter(pc.invert(pc.is_in(both.column("image_id"), pa.array(gone))))
    return {0: first, 1: both, 2: kept, 3: kept}


def _check_vacuum(uri: str, fs, path: str, opts: dict | None) -> None:
    rows = _versions_then_vacuum(uri, fs, path, opts)
    on_disk = _files_on_disk(fs, path)
    data = lambda files: {f for f in files if f.endswith(".parquet") and not f.startswith("_")}  # noqa: E731
    snaps = {v: set(m.open_delta_version(uri, v).dataset.files) for v in range(4)}
    assert snaps[0] < snaps[1] and len(snaps[3]) == 1
    referenced_by_1_or_3 = snaps[1] | snaps[3]
    unreferenced = data(on_disk) - referenced_by_1_or_3  # v2's rewritten file and the orphan
    assert len(unreferenced) == 2 and "part-00000-dead-writer.snappy.parquet" in unreferenced

    assert m.vacuum(uri).files == []  # the default retention (one week): everything is younger
    dry = m.vacuum(uri, 0, keep_versions=[1], dry_run=True)
    assert set(dry.files) == unreferenced and dry.bytes > 0 and _files_on_disk(fs, path) == on_disk
    done = m.vacuum(uri, 0, keep_versions=[1])
    assert set(done.files) == unreferenced and done.bytes == dry.bytes
    left = _files_on_disk(fs, path)
    assert data(left) == referenced_by_1_or_3 and "_odin_job.json" in left  # `_` state untouched
    for v in (1, 3):  # the kept version and the current one read back exactly
        assert _rows(_read(uri, v)) == _rows(rows[v])
    with pytest.raises(ConfigError, match="version 2 .* a vacuum deleted 1 of its 2 files"):
        m.open_delta_version(uri, 2)
    assert _rows(_read(uri)) == _rows(rows[3])


def test_vacuum_deletes_only_unreferenced_files_and_kept_versions_stay_readable(tmp_path):
    from pyarrow import fs as pafs

    path = str(tmp_path / "scores")
    _check_vacuum(path, pafs.LocalFileSystem(), path, None)


def test_vacuum_and_time_travel_on_s3(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    _check_vacuum(f"s3://{s3_bucket}/out/scores", s3_server.filesystem(), f"{s3_bucket}/out/scores",
                  _s3_opts(s3_server))


def test_vacuum_refuses_bad_arguments(tmp_path):
    uri = str(tmp_path / "scores")
    _nights(uri, 2)
    with pytest.raises(ConfigError, match=">= 0 hours"):
        m.vacuum(uri, -1)
    with pytest.raises(ConfigError, match=r"cannot keep versions \[7\].*0\.\.1"):
        m.vacuum(uri, 0, keep_versions=[7])


def _timed_versions(uri: str) -> list[datetime]:
    """Versions 0..3 with ids r-a, r-b, (audit) A-1, r-a again (an output's incremental rerun); their
    commit times, read back from the log."""
    from deltalake import CommitProperties, DeltaTable, write_deltalake

    metas = [{m.RUN_ID_KEY: "r-a"}, {m.RUN_ID_KEY: "r-b"}, {m.AUDIT_ID_KEY: "20261205T031500Z-abc123"},
             {m.RUN_ID_KEY: "r-a"}]
    for i, meta in enumerate(metas):
        write_deltalake(uri, table(10, 10 * i, prefix="c"), mode="append",
                        commit_properties=CommitProperties(custom_metadata=meta))
        time.sleep(0.05)
    history = {c["version"]: c for c in DeltaTable(uri).history()}
    return [datetime.fromtimestamp(history[v]["timestamp"] / 1000, timezone.utc) for v in range(4)]


def test_resolve_version_by_number_date_and_id(tmp_path):
    uri = str(tmp_path / "scores")
    times = _timed_versions(uri)
    assert m.resolve_version(uri, None) == 3
    assert [m.resolve_version(uri, v) for v in (0, 2, "1", " 3 ")] == [0, 2, 1, 3]
    # a time: the version current then
    assert m.resolve_version(uri, times[2]) == 2
    between = times[1] + (times[2] - times[1]) / 2
    assert m.resolve_version(uri, between) == 1
    assert m.resolve_version(uri, between.isoformat()) == 1
    assert m.resolve_version(uri, between.strftime("%Y-%m-%dT%H:%M:%S.%fZ")) == 1
    assert m.resolve_version(uri, between.astimezone(timezone(timedelta(hours=-8))).isoformat()) == 1
    assert m.resolve_version(uri, between.replace(tzinfo=None)) == 1  # naive = UTC
    tomorrow = (times[3] + timedelta(days=1)).date()
    assert m.resolve_version(uri, tomorrow.isoformat()) == m.resolve_version(uri, tomorrow) == 3
    # ids: a run id (the newest version carrying it), an audit id
    assert m.resolve_version(uri, "r-b") == 1
    assert m.resolve_version(uri, "r-a") == 3
    assert m.resolve_version(uri, "20261205T031500Z-abc123") == 2


def test_resolve_version_errors(tmp_path):
    uri = str(tmp_path / "scores")
    times = _timed_versions(uri)
    for bad, msg in [(4, r"has no version 4: its versions are 0\.\.3"), (-1, "has no version -1"),
                     ("r-zzz", r"no version .* run or audit 'r-zzz'.*recent ids: \['r-a', '20261205T031500Z-abc123', "
                               r"'r-b'\]"),
                     ((times[0] - timedelta(days=1)).date().isoformat(), "before .* was created"),
                     (times[0] - timedelta(milliseconds=20), "no version was current then")]:
        with pytest.raises(ConfigError, match=msg):
            m.resolve_version(uri, bad)
    pq.write_table(table(3), tmp_path / "plain.parquet")
    for where, msg in [(tmp_path / "nowhere", "does not exist"), (tmp_path, r"is not a Delta table")]:
        with pytest.raises(ConfigError, match=msg):
            m.resolve_version(str(where), 0)


def test_open_delta_version_reads_that_version_as_a_score_table(tmp_path):
    uri = str(tmp_path / "scores")
    _timed_versions(uri)
    expected = pa.concat_tables([table(10, 10 * i, prefix="c") for i in range(2)])
    snap = m.open_delta_version(uri, "r-b", schema=_canonical)  # the score table's own cast
    assert (snap.version, snap.current_version, len(snap.dataset.files)) == (1, 3, 2)
    assert snap.dataset.schema == _canonical(pa.schema(snap.table.schema().to_arrow()))
    assert _rows(snap.dataset.to_table()) == _rows(expected)
    st = ScoreTable(source=uri, dataset=snap.dataset, files=len(snap.dataset.files), filter_after_cast=True)
    assert st.check_unique_ids() == 20 and st.settings()["model_id"] == "m@sha256:0"
    ok = pc.field("status") == "ok"
    assert st.count(ok) == 20 and sorted(st.read(["image_id"], ok).column(0).to_pylist()) == \
        sorted(expected.column("image_id").to_pylist())
    assert ScoreTable.open(uri).count() == 40  # the current version is unchanged


# --------------------------------------------------------------------------- the `compact` command
def _cli(args: list[str], env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "jobs.cli", "compact", *args]
    return run_command(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _audit_output(root: Path) -> dict[str, pa.Table]:
    """An audit's output with Delta score tables (corpus: 35 nights, heldout: 3) and a Delta history/,
    plus a plain Parquet ood/ score table (today's layout: not a Delta table, left alone)."""
    from deltalake import write_deltalake

    rows = {"corpus/scores": _nights(str(root / "corpus" / "scores"), 35, rows=10),
            "heldout/scores": _nights(str(root / "heldout" / "scores"), 3, rows=10)}
    for i in range(4):
        write_deltalake(str(root / "history"), pa.table({"night": [i]}), mode="append")
    rows["history"] = pa.table({"night": list(range(4))})
    (root / "ood" / "svhn" / "scores").mkdir(parents=True)
    pq.write_table(table(5), root / "ood" / "svhn" / "scores" / "part-0.parquet")
    return rows


def test_compact_command_compacts_every_delta_table_of_an_output(tmp_path):
    from deltalake import DeltaTable

    out = tmp_path / "audit"
    rows = _audit_output(out)
    plain = _tree(out / "ood")
    before = _tree(out)
    p = _cli(["--output", str(out), "--dry-run", "--vacuum-hours", "0"])
    assert p.returncode == 0, p.stderr
    assert _tree(out) == before  # a dry run writes nothing, not even a lease
    assert "corpus/scores: 35 files" in p.stdout and "automatic rule: due" in p.stdout and "would delete 0" in p.stdout

    p = _cli(["--output", str(out), "--target-mib", "64", "--vacuum-hours", "0", "--keep-version", "corpus/scores=10"])
    assert p.returncode == 0, p.stderr
    for name, n in [("corpus/scores", 35), ("heldout/scores", 3), ("history", 4)]:
        dt = DeltaTable(str(out / name))
        assert len(dt.file_uris()) == 1, name
        assert f"{name}: {n} files" in p.stdout and f"{n} files merged into 1" in p.stdout
        got = dt.to_pyarrow_table()
        assert (_rows(got) if name != "history" else sorted(got.column("night").to_pylist())) == \
            (_rows(rows[name]) if name != "history" else list(range(4)))
        kept = set(m.open_delta_version(str(out / name), 10).dataset.files) if name == "corpus/scores" else set()
        assert f"{name}: vacuum (older than 0 h{', keeping versions [10]' if kept else ''}): deleted " \
               f"{n - len(kept)} files" in p.stdout
        assert {f.name for f in (out / name).glob("*.parquet")} == {Path(u).name for u in dt.file_uris()} | kept
        if kept:
            assert len(kept) == 11  # version 10 = the first 11 nights, still readable
    assert _rows(_read(str(out / "corpus" / "scores"), 10)) == _rows(rows["corpus/scores"].slice(0, 110))
    assert "ood/svhn" not in p.stdout and _tree(out / "ood") == plain
    assert "3 Delta table(s)" in p.stdout and "42 files before, now 3" in p.stdout
    assert not list(out.rglob("_odin_lock.json"))  # the leases were released


def test_compact_command_bad_configuration_exits_2_and_writes_nothing(tmp_path, capsys):
    from jobs.cli import main as cli
    from jobs.run_lock import RunLock
    from pyarrow import fs as pafs

    out = tmp_path / "out"
    _nights(str(out / "scores"), 3)
    (tmp_path / "plain" / "scores").mkdir(parents=True)
    pq.write_table(table(5), tmp_path / "plain" / "scores" / "part-0.parquet")
    before = _tree(tmp_path)
    for args, msg in [(["--output", str(tmp_path / "missing")], "missing does not exist"),
                      (["--output", str(tmp_path / "plain")], "holds no Delta table")]:
        p = _cli(args)  # the command as a user runs it
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    for args, msg in [
        (["--output", str(out), "--target-mib", "0"], "--target-mib must be > 0"),
        (["--output", str(out), "--vacuum-hours", "-3"], "--vacuum-hours must be >= 0"),
        (["--output", str(out), "--keep-version", "1"], "--keep-version only applies with --vacuum-hours"),
        (["--output", str(out), "--vacuum-hours", "0", "--keep-version", "9"], "has no version [9]: its versions are 0..2"),
        (["--output", str(out), "--vacuum-hours", "0", "--keep-version", "flags=1"], "no table 'flags'"),
        ([], "--output DIR is required"),
    ]:
        assert cli(["compact", *args]) == 2
        assert msg in capsys.readouterr().err, args
    assert _tree(tmp_path) == before
    # deltalake missing: named with its extra
    code = ("import sys; sys.modules['deltalake'] = None; from jobs.cli import main; "
            "sys.exit(main(['compact'] + sys.argv[1:]))")
    p = _cli(["--output", str(out)], code=code)
    assert p.returncode == 2 and "needs the deltalake package" in p.stderr, p.stderr
    assert _tree(tmp_path) == before
    # a run holds the output's lease (this process, alive): refused before anything is written
    lock = RunLock(pafs.LocalFileSystem(), str(out), display=str(out))
    lock.acquire()
    try:
        held = _tree(tmp_path)
        p = _cli(["--output", str(out), "--vacuum-hours", "0"])
        assert p.returncode == 2 and "is being written by another run" in p.stderr, p.stderr
        assert _tree(tmp_path) == held
    finally:
        lock.release()
    assert {k: v for k, v in _tree(tmp_path).items() if (tmp_path / k).is_file()} == \
        {k: v for k, v in before.items() if (tmp_path / k).is_file()}  # the test's own lease came and went


@pytest.mark.slow
def test_compacting_a_score_jobs_table_between_nights(ray_head, tiny_model, tmp_path):
    """The score job's own Delta table: two nights, `odin-audit compact --vacuum-hours 0`, then a
    third night plans and commits on the compacted files — exactly once, earlier rows unchanged."""
    from conftest import make_images
    from test_score_job import assert_exactly_once, job_cmd, read_scores, run_job

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    ids: set[str] = set()
    cmd = job_cmd(corpus, out, tiny_model, "--shard-rows", "2", "--quiet")

    def night(name: str, n: int) -> pa.Table:
        make_images(corpus / name, n)
        ids.update(f"{name}/img_{i:05d}.png" for i in range(n))
        p = run_job(cmd, ray_head.env)
        assert p.returncode == 0, p.stderr[-3000:]
        return assert_exactly_once(out, ids)

    night("n1", 8)
    before = night("n2", 5)
    scores = str(out / "scores")
    files = m.file_stats(scores).files
    # the rule did not call for it (one small file, nothing to merge it with): the job left two files
    assert files >= 2 and __import__("json").loads((out / "run.json").read_text())["attempts"][-1]["table"][
        "compaction"] is None
    last_night = m.resolve_version(scores, None)
    settings = ScoreTable.open(str(out)).schema.metadata
    assert settings and b"odin.run_id" in settings
    p = _cli(["--output", str(out), "--vacuum-hours", "0"])
    assert p.returncode == 0, p.stderr
    assert f"scores: {files} files" in p.stdout and m.file_stats(scores).files == 1
    assert _rows(read_scores(out)) == _rows(before)  # compaction changed no row
    assert ScoreTable.open(str(out)).schema.metadata == settings  # the job's settings (the table's description) kept
    run_id = __import__("json").loads((out / "run.json").read_text())["run_id"]
    compacted = m.resolve_version(scores, None)  # compaction and vacuum commit versions without a run id
    assert m.resolve_version(scores, run_id) == last_night < compacted

    after = night("n3", 4)  # planned against the compacted file
    kept = after.filter(pc.invert(pc.starts_with(after.column("image_id"), "n3/")))
    assert _rows(kept) == _rows(before)  # reused, not rescored
    assert m.resolve_version(scores, run_id) == m.resolve_version(scores, None) > compacted


def test_compact_and_vacuum_cover_the_flags_table_and_results_stay_readable(tmp_path):
    """`odin-audit compact` lists DIR/flags (a calibrate output's Delta table): compaction merges the
    current result's part files; a vacuum keeps the versions the kept results read (both results
    here), so the earlier result stays readable by its id; the current result — by the pointer or by
    its id — is read from the compaction's version (the same rows)."""
    from deltalake import DeltaTable

    from jobs.cli import main as cli
    from odin_engine.io.results import open_flags

    pq.write_table(table(150, prefix="h"), tmp_path / "h.parquet")
    pq.write_table(table(60, prefix="c"), tmp_path / "c.parquet")
    out = tmp_path / "cal"
    for tpr in ("0.9", "0.95"):
        assert cli(["calibrate", "--scores", str(tmp_path / "c.parquet"), "--heldout-scores", str(tmp_path / "h.parquet"),
                    "--output", str(out), "--tpr", tpr, "--flag-file-rows", "10"]) == 0
    first, now = (open_flags(str(out), v) for v in (0, 1))
    rows = _rows(now.read())
    assert [t.name for t in m.output_tables(str(out))] == ["flags"]
    p = _cli(["--output", str(out), "--vacuum-hours", "0"])
    assert p.returncode == 0, p.stderr
    assert "flags: 6 files" in p.stdout and "6 files merged into 1" in p.stdout
    assert "keeping versions [0, 1] ([0, 1] read by kept results)" in p.stdout and "deleted 0 files" in p.stdout
    assert len(DeltaTable(str(out / "flags")).file_uris()) == 1
    for got in (open_flags(str(out)), open_flags(str(out), now.result_id)):
        assert (got.version, got.result_id) == (2, now.result_id) and _rows(got.read()) == rows
    assert _rows(open_flags(str(out), first.result_id).read()) == _rows(first.read())  # kept: still readable
    assert m.vacuum(str(out / "flags"), 0, dry_run=True).files  # what the kept results' versions keep
