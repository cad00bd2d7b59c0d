"""Whole results (odin_engine/io/results.py): a reader of an output directory sees the previous complete
decision result or the new one, never a partial or mixed one — on a local disk and on moto's S3 server,
while the writer is killed with SIGKILL at random moments of its decision stage."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError
from odin_engine.io.delta import DeltaLocation
from odin_engine.io.results import (KEEP, LATEST, POINTER, RESULTS_DIR, STABLE_NAMES, Publication, current, open_flags,
                                     read_pointer)
from odin_engine.io.store import Store
from _forkserver import run_command, start_command

REPO = Path(__file__).resolve().parents[1]
CORPUS_ROWS, FILE_ROWS = 6_000, 1_000  # 6 flag parts per result
TPRS = (0.90, 0.95, 0.80, 0.99)  # each run calibrates at another TPR: results differ in δ and outlier count


# --------------------------------------------------------------------------- score tables without a model
def _frame(n: int, prefix: str, seed: int, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    odin = rng.normal(0.5 + shift, 0.1, n)
    return pd.DataFrame({
        "image_id": [f"{prefix}-{i:06d}" for i in range(n)], "uri": [f"/x/{prefix}-{i:06d}.png" for i in range(n)],
        "status": "ok", "error": None, "pred": rng.integers(0, 10, n), "msp": odin, "max_logit": odin,
        "energy": odin, "odin": odin, "temperature": 1000.0, "epsilon": 0.0014, "model_id": "synthetic-model",
        "run_id": "r1",
    })


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    corpus = _frame(CORPUS_ROWS, "c", 1, shift=-0.05)
    (root / "corpus").mkdir()
    for k, lo in enumerate(range(0, CORPUS_ROWS, CORPUS_ROWS // 3)):
        part = corpus.iloc[lo: lo + CORPUS_ROWS // 3]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), root / "corpus" / f"p{k}.parquet")
    (root / "held").mkdir()
    pq.write_table(pa.Table.from_pandas(_frame(2_000, "h", 2), preserve_index=False), root / "held" / "h.parquet")
    return root


def _calibrate_cmd(tables: Path, out: str, tpr: float) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "calibrate", "--scores", str(tables / "corpus"), "--heldout-scores",
            str(tables / "held"), "--output", out, "--tpr", str(tpr), "--flag-file-rows", str(FILE_ROWS)]


# --------------------------------------------------------------------------- what a reader sees
def _flag_files(fs: pafs.FileSystem, root: str, pointer: dict, base: str) -> list[str]:
    """The flag files of the result ``pointer`` names: its flags version of the Delta table ``DIR/flags``
    (the log's file list, never a glob), or a ``buckets`` result's own ``flags/`` folder."""
    if pointer.get("flags_format") == "delta":
        table = DeltaLocation(fs, f"{root}/flags").open(version=pointer["flags_version"])
        return sorted(f"{root}/flags/{p}" for p in pa.table(table.get_add_actions()).column("path").to_pylist())
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{base}/flags")) if i.path.endswith(".parquet"))


def read_current(fs: pafs.FileSystem, root: str, rows: int = CORPUS_ROWS,
                 parts: int = CORPUS_ROWS // FILE_ROWS) -> dict | None:
    """Read DIR through its pointer and check the result is whole; None before the first commit.
    Raises AssertionError on a partial or mixed result."""
    pointer = read_pointer(Store.on(fs, root))  # as open_flags reads it: a read cut by a publication is retried
    if pointer is None:
        return None
    base = f"{root}/{pointer['path']}"
    with fs.open_input_stream(f"{base}/calibration.json") as fh:
        cal = json.loads(fh.read())
    with fs.open_input_stream(f"{base}/flag_summary.json") as fh:
        summary = json.loads(fh.read())["overall"]
    files = _flag_files(fs, root, pointer, base)
    flags = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["odin", "is_outlier"]).to_pandas()
    rid = pointer["result_id"]
    assert cal["result_id"] == rid, "calibration.json of another result"
    assert cal["flags"].get("flags_version") == pointer.get("flags_version"), "calibration.json of another version"
    assert all(os.path.basename(f).startswith(f"part-{rid}-") for f in files), files
    assert len(files) == cal["flags"]["files"] == parts, f"{len(files)} flag files"
    assert len(flags) == summary["n_rows"] == rows, f"{len(flags)} flag rows"
    assert int(flags["is_outlier"].sum()) == summary["n_outliers"] == cal["summary"]["n_outliers"]
    assert ((flags["odin"] < cal["delta"]) == flags["is_outlier"].astype(bool)).all(), "flags of another δ"
    return {"result_id": rid, "n_outliers": summary["n_outliers"], "tpr": cal["target_tpr"]}


def read_stable_paths(root: Path) -> tuple[str, int] | None:
    """A plain reader of the local stable path ``DIR/flags``, a Delta table (``DeltaTable(…).to_pandas()``):
    (the result id its files carry, its outlier count) of the whole flags set it read; None when there
    is no table yet (an output's first run). The table's current version may be a killed run's flags,
    committed but never published: whole all the same."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    try:
        table = DeltaTable(str(root / "flags"))
    except DeltaError:
        return None
    flags = table.to_pandas(columns=["image_id", "odin", "is_outlier"])
    ids = {os.path.basename(f).rsplit("-", 2)[0] for f in table.file_uris()}
    assert len(ids) == 1, f"DIR/flags version {table.version()} holds the files of results {ids}"
    assert len(flags) == CORPUS_ROWS and flags["image_id"].is_unique, f"DeltaTable(DIR/flags): {len(flags)} rows"
    out, inl = flags.loc[flags["is_outlier"], "odin"], flags.loc[~flags["is_outlier"], "odin"]
    assert not len(out) or not len(inl) or out.max() < inl.min(), "DIR/flags: flags of two thresholds"
    return ids.pop().removeprefix("part-"), int(flags["is_outlier"].sum())


class Reader(threading.Thread):
    """Reads DIR in a loop while a writer runs; records every view and every violation."""

    def __init__(self, fs, root: str, local: Path | None):
        super().__init__(daemon=True)
        self.fs, self.root, self.local = fs, root, local
        self.stop = threading.Event()
        self.views: list[dict] = []
        self.stable: list[tuple[str, int]] = []
        self.violations: list[str] = []

    def run(self):
        while not self.stop.is_set():
            try:
                view = read_current(self.fs, self.root)
                if view:
                    self.views.append(view)
                if self.local is not None:
                    n = read_stable_paths(self.local)
                    if n is not None:
                        self.stable.append(n)
            except AssertionError as exc:
                self.violations.append(str(exc))
            except (FileNotFoundError, OSError, ConfigError):
                pass  # pruned under the reader (a result two commits old): a retry, never a partial read
            except Exception as exc:  # noqa: BLE001 - anything else (an unreadable pointer) fails the test
                self.violations.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)


def _new_result_dir(fs, root: str, known: set[str]) -> bool:
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{RESULTS_DIR}", allow_not_found=True))
    return any(os.path.basename(i.path) not in known for i in infos)


def _result_ids(fs, root: str) -> set[str]:
    return {os.path.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(f"{root}/{RESULTS_DIR}",
                                                                                  allow_not_found=True))}


def _publication_window(fs, root: str, known: set[str], proc, previous: float | None) -> float:
    """Wait for ``proc`` to exit; the kill window: 1.2× the time from its first write seen to its
    exit (at least 20 ms), or ``previous`` when the run wrote nothing new. A local publication takes
    ~70 ms: a floor of 0.2 s made two kills in three land after the exit (42 runs for 11 kills)."""
    while not _new_result_dir(fs, root, known) and proc.poll() is None:
        time.sleep(0.005)
    seen = time.monotonic()
    proc.wait(timeout=120)
    if proc.returncode != 0 and previous is not None:
        return previous
    return max(0.02, time.monotonic() - seen) * 1.2


def _kill_loop(fs, root: str, uri: str, tables: Path, env: dict, kills: int, local: Path | None) -> dict:
    """Run calibrate again and again, SIGKILL most runs at a random moment after its decision stage
    began writing, let every 5th finish; a reader checks DIR throughout and after each run."""
    rng = random.Random(20)
    reader = Reader(fs, root, local)
    reader.start()
    committed: dict[str, int] = {}  # result id -> outlier count, for every result seen committed
    done = killed = 0
    # one undisturbed run first: the previous complete result every kill must leave readable, and
    # the decision stage's length (from its first write seen to the exit) for the kill window
    proc = start_command(_calibrate_cmd(tables, uri, TPRS[0]), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    window = _publication_window(fs, root, set(), proc, None)
    assert proc.returncode == 0, proc.stderr.read()
    first = read_current(fs, root)
    committed[first["result_id"]] = first["n_outliers"]
    runs = 0
    while killed < kills:
        runs += 1
        # a kill must land inside the publication: bounded, so a machine whose load changed mid-loop
        # fails with a reason instead of looping (the window is re-measured on every 5th run)
        assert runs <= 12 * kills, f"{killed} of {runs} kills landed inside the publication (window {window:.2f}s)"
        before = read_current(fs, root)
        known = _result_ids(fs, root)
        proc = start_command(_calibrate_cmd(tables, uri, TPRS[runs % len(TPRS)]), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if runs % 5 == 0:  # let it finish, and measure the window again
            window = _publication_window(fs, root, known, proc, window)
        else:
            while not _new_result_dir(fs, root, known) and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, window))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed += 1
        rc = proc.wait(timeout=120)
        after = read_current(fs, root)  # raises on a partial or mixed result
        assert after is not None
        if after["result_id"] != before["result_id"]:
            assert rc in (0, -signal.SIGKILL), proc.stderr.read()
            committed[after["result_id"]] = after["n_outliers"]
        else:
            assert rc == -signal.SIGKILL, f"a finished run did not commit (rc {rc}): {proc.stderr.read()[-2000:]}"
        done += rc == 0
        for view in reader.views:
            if view["result_id"] in committed:
                assert view["n_outliers"] == committed[view["result_id"]]
    # a last undisturbed run cleans up what the killed ones left
    proc = run_command(_calibrate_cmd(tables, uri, 0.95), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    reader.stop.set()
    reader.join(timeout=30)
    last = read_current(fs, root)
    assert not reader.violations, reader.violations[:3]
    assert {v["result_id"] for v in reader.views} <= set(committed) | {last["result_id"]}
    committed[last["result_id"]] = last["n_outliers"]
    wrong = [(rid, n) for rid, n in reader.stable if rid in committed and n != committed[rid]]
    assert not wrong, f"a plain reader of DIR/flags saw other flags than the result's: {wrong[:3]}"
    left = _result_ids(fs, root)
    assert last["result_id"] in left and len(left) <= KEEP, left  # uncommitted and old results are gone
    return {"killed": killed, "finished": done, "views": len(reader.views), "stable_reads": len(reader.stable)}


@pytest.mark.slow
def test_kill_9_during_publication_never_shows_a_partial_result_local(tables, tmp_path):
    out = tmp_path / "out"
    got = _kill_loop(pafs.LocalFileSystem(), str(out), str(out), tables, dict(os.environ), kills=11, local=out)
    assert got["killed"] >= 11 and got["views"] > 0 and got["stable_reads"] > 0, got
    assert os.path.realpath(out / LATEST) == str(out / json.loads((out / POINTER).read_text())["path"])
    assert all((out / n).is_symlink() for n in ("calibration.json", "flag_summary.json"))
    assert (out / "flags" / "_delta_log").is_dir() and not (out / "flags").is_symlink()  # the flags' Delta table
    assert not any(os.path.lexists(out / n) for n in set(STABLE_NAMES) - {"flags", "calibration.json",
                                                                        "flag_summary.json"})  # calibrate writes no report


@pytest.mark.slow
def test_kill_9_during_publication_never_shows_a_partial_result_s3(tables, tmp_path, s3_server, s3_bucket):
    fs = s3_server.filesystem()
    env = dict(os.environ, **s3_server.env)
    got = _kill_loop(fs, f"{s3_bucket}/out", f"s3://{s3_bucket}/out", tables, env, kills=10, local=None)
    assert got["killed"] >= 10 and got["views"] > 0, got


# --------------------------------------------------------------------------- the publication itself
def test_commit_publishes_links_and_prunes(tmp_path):
    out = Store(str(tmp_path / "out"))
    ids = []
    for k in range(KEEP + 2):
        pub = Publication(out, result_id=f"2026010{k}T000000Z-00000{k}")
        pub.store.write_json("audit.json", {"k": k})
        pub.store.join("flags").write_bytes(f"{pub.part_prefix}-000-00000.parquet", b"x")
        ids.append(pub.result_id)
        if k:  # before the commit, readers still see the previous result
            assert current(out).read_json("audit.json") == {"k": k - 1}
        pub.commit()
        assert current(out).read_json("audit.json") == {"k": k}
        assert json.loads((tmp_path / "out" / "audit.json").read_text()) == {"k": k}  # the stable link
    dead = out.join(RESULTS_DIR, "20250101T000000Z-dead00")  # a killed run's uncommitted result
    dead.write_json("audit.json", {"k": -1})
    last = Publication(out, result_id="20270101T000000Z-ffffff")
    last.store.write_json("audit.json", {"k": "last"})
    last.commit()
    left = sorted(p.name for p in (tmp_path / "out" / RESULTS_DIR).iterdir())
    assert left == sorted(ids[-(KEEP - 1):] + ["20270101T000000Z-ffffff"])


def test_an_output_of_the_older_layout_is_converted(tmp_path):
    root = tmp_path / "out"
    (root / "flags").mkdir(parents=True)
    (root / "flags" / "part-000-00000.parquet").write_bytes(b"old")
    (root / "audit.json").write_text('{"old": true}')
    (root / "report.html").write_text("old")  # not part of the new result: removed, not left to look current
    out = Store(str(root))
    assert current(out).path == out.path  # no pointer: the files directly under DIR are the result
    pub = Publication(out)
    pub.store.write_json("audit.json", {"new": True})
    pub.store.join("flags").write_bytes(f"{pub.part_prefix}-000-00000.parquet", b"new")
    pub.commit()
    assert (root / "flags").is_symlink() and (root / "audit.json").is_symlink()
    assert json.loads((root / "audit.json").read_text()) == {"new": True}
    assert [p.name for p in (root / "flags").iterdir()] == [f"{pub.part_prefix}-000-00000.parquet"]
    assert not os.path.lexists(root / "report.html")
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # nothing set aside is left


def test_s3_commit_and_old_layout_on_s3(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    fs = s3_server.filesystem()
    with fs.open_output_stream(f"{s3_bucket}/out/audit.json") as fh:
        fh.write(b'{"old": true}')
    out = Store(f"s3://{s3_bucket}/out")
    pub = Publication(out)
    pub.store.write_json("audit.json", {"new": True})
    pub.commit()
    assert current(out).read_json("audit.json") == {"new": True}
    assert fs.get_file_info(f"{s3_bucket}/out/audit.json").type == pafs.FileType.NotFound  # old, stale: removed


def test_a_pointer_read_racing_a_publication_on_s3_is_whole(s3_server, s3_bucket):
    """pyarrow reads an object with a HEAD (its size), then a ranged GET: a reader of ``current.json``
    while a run publishes can get the new pointer cut to the old one's length. The product's reader
    (``read_pointer``, as ``open_flags`` reads) retries such a read; a plain pyarrow read of the same
    key in the same loop shows that the race happened."""
    fs = s3_server.filesystem()
    out = Store.on(fs, f"{s3_bucket}/out")
    assert out.uri(POINTER) == f"s3://{s3_bucket}/out/{POINTER}"  # what its messages name
    out.write_json(POINTER, {"path": "results/first", "k": -1, "end": -1})
    stop = threading.Event()

    def publish():  # pointers of five lengths, one after another, as fast as the server takes them
        k = 0
        while not stop.is_set():
            out.write_json(POINTER, {"path": f"results/{k}", "k": k, "pad": "x" * (k % 5) * 60, "end": k})
            k += 1

    writer = threading.Thread(target=publish, daemon=True)
    writer.start()
    torn = reads = 0
    deadline = time.monotonic() + 90
    try:
        while (torn < 3 or reads < 100) and time.monotonic() < deadline:
            try:
                with fs.open_input_stream(out.p(POINTER)) as fh:
                    json.loads(fh.read())
            except ValueError:
                torn += 1
            except FileNotFoundError:
                pass  # a store's 404 between the HEAD and the GET (moto has answered one): not a cut read
            pointer = read_pointer(out)
            assert pointer is not None and pointer["end"] == pointer["k"], pointer
            assert pointer["path"] == ("results/first" if pointer["k"] < 0 else f"results/{pointer['k']}")
            reads += 1
    finally:
        stop.set()
        writer.join(timeout=30)
    assert torn >= 3, f"in {reads} reads, {torn} plain reads were cut: the race was not exercised"


def test_a_damaged_pointer_is_an_error_for_readers_and_the_next_commit_replaces_it(tmp_path):
    out = Store(str(tmp_path / "out"))
    first = Publication(out)
    first.store.write_json("audit.json", {"k": 1})
    first.commit()
    (tmp_path / "out" / POINTER).write_text('{"version": 1, "result_id": "x", "pa')  # cut by something else
    with pytest.raises(ValueError, match=r"current\.json is not a result pointer this tool wrote"):
        current(out)  # never DIR's other files taken for the result
    with pytest.raises(ValueError, match="current.json"):
        open_flags(str(tmp_path / "out"))
    again = Publication(out)
    again.store.write_json("audit.json", {"k": 2})
    again.commit()
    assert current(out).read_json("audit.json") == {"k": 2}
    assert read_pointer(out)["result_id"] == again.result_id


@pytest.mark.slow
def test_kill_9_of_audit_in_its_decision_stage_keeps_the_previous_result(ray_head, tmp_path):
    """The same, with `odin-audit audit` itself on a real Ray cluster (a resumed run: nothing to score,
    so the kills land in the decision stage)."""
    from deltalake import DeltaTable
    from PIL import Image

    from _odin_helpers import random_weights, smooth_images

    w = random_weights(tmp_path / "w.pt")
    for name, n, seed in (("held", 10, 1), ("corpus", 12, 2)):
        (tmp_path / name).mkdir()
        for i, a in enumerate(smooth_images(n, seed)):
            Image.fromarray(a).save(tmp_path / name / f"{name}{i:03d}.png")
    out = tmp_path / "out"
    fs, root = pafs.LocalFileSystem(), str(out)

    def cmd(tpr: float) -> list[str]:
        return [sys.executable, "-m", "jobs.cli", "audit", "--corpus", str(tmp_path / "corpus"), "--heldout",
                str(tmp_path / "held"), "--output", root, "--model", "cifar_resnet20", "--weights", str(w),
                "--tpr", str(tpr), "--flag-file-rows", "3", "--gallery", "4", "--quiet"]

    first = run_command(cmd(0.5), cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    previous = read_current(fs, root, rows=12, parts=4)
    rng = random.Random(7)
    kills = 0
    for k in range(6):
        if kills == 3:
            break
        known = _result_ids(fs, root)
        # another δ each time (10 held-out images allow a TPR up to 0.5)
        proc = start_command(cmd((0.3, 0.4, 0.45)[k % 3]), cwd=REPO, env=ray_head.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while not _new_result_dir(fs, root, known) and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.15))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        assert proc.wait(timeout=600) in (0, -signal.SIGKILL), proc.stderr.read()[-3000:]
        now = read_current(fs, root, rows=12, parts=4)  # whole: the previous result, or the new one if committed
        assert now["result_id"] == previous["result_id"] or now["result_id"] not in known
        assert len(open_flags(root).read()) == 12  # the library reader of the current result
        assert len(DeltaTable(str(out / "flags")).to_pandas()) == 12  # the plain reader's stable path
        previous = now
    assert kills >= 1, "every audit finished before its kill"
    last = run_command(cmd(0.5), cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]  # the lease of the killed drivers died with them
    assert read_current(fs, root, rows=12, parts=4)["result_id"] not in known
    assert len(_result_ids(fs, root)) <= KEEP


# --------------------------------------------------------------------------- the flags as a Delta table
def _calibrate(tables: Path, out: Path, tpr: float, table_format: str | None = None) -> dict:
    from jobs.calibrate import calibrate_and_flag
    from odin_engine.settings import CalibrationSettings

    return calibrate_and_flag(str(tables / "corpus"), str(tables / "held"), str(out),
                              CalibrationSettings(tpr, "odin"), rows_per_file=FILE_ROWS, table_format=table_format)


def _sorted(t: pa.Table) -> pd.DataFrame:
    return t.to_pandas().sort_values("image_id").reset_index(drop=True)


def test_flags_are_one_delta_version_per_result_with_time_travel(tables, tmp_path):
    from deltalake import DeltaTable

    out = tmp_path / "out"
    cals = [_calibrate(tables, out, tpr) for tpr in TPRS]  # KEEP + 1 results: the first one's directory is pruned
    nights = [open_flags(str(out), c["result_id"]).read() for c in cals]
    table = DeltaTable(str(out / "flags"))
    history = sorted(table.history(), key=lambda c: c["version"])
    assert [c["version"] for c in history] == [0, 1, 2, 3]  # one version per result
    assert [c["odin.result_id"] for c in history] == [c["result_id"] for c in cals]
    assert [c["odin.command"] for c in history] == ["calibrate"] * 4
    pointer = json.loads((out / POINTER).read_text())
    assert pointer["flags_format"] == "delta" and pointer["flags_version"] == 3 == cals[-1]["flags"]["flags_version"]
    # the plain Delta reader of the current version: exactly one row per corpus item, this result's flags
    now = table.to_pandas()
    assert len(now) == CORPUS_ROWS and now["image_id"].is_unique
    assert int(now["is_outlier"].sum()) == cals[-1]["summary"]["n_outliers"]
    assert all(os.path.basename(f).startswith(f"part-{cals[-1]['result_id']}-") for f in table.file_uris())
    # time travel: by result id, by version, by a time between two commits — the earlier night exactly
    first = _sorted(nights[0])
    assert int(first["is_outlier"].sum()) == cals[0]["summary"]["n_outliers"] != cals[1]["summary"]["n_outliers"]
    pd.testing.assert_frame_equal(_sorted(open_flags(str(out), 0).read()), first)
    pd.testing.assert_frame_equal(_sorted(DeltaTable(str(out / "flags"), version=0).to_pyarrow_table()), first)
    v1 = open_flags(str(out), cals[1]["result_id"])
    assert (v1.version, v1.result_id) == (1, cals[1]["result_id"])
    when = pd.Timestamp(history[1]["timestamp"], unit="ms", tz="UTC").isoformat()
    assert open_flags(str(out), when).version == 1
    cur = open_flags(str(out))
    assert (cur.result_id, cur.version, cur.format) == (cals[-1]["result_id"], 3, "delta")
    # a result pruned from results/ (KEEP) stays readable by its id through the table's history
    assert not (out / RESULTS_DIR / cals[0]["result_id"]).exists() and len(TPRS) > KEEP
    pd.testing.assert_frame_equal(_sorted(open_flags(str(out), cals[0]["result_id"]).read()), first)
    with pytest.raises(ConfigError, match="no version"):
        open_flags(str(out), "20990101T000000Z-nosuch")


def test_a_kill_between_the_flags_commit_and_the_pointer_keeps_the_previous_result(tables, tmp_path):
    """The order is flag files, Delta version, result JSONs, pointer: a run that committed its flags
    version and died leaves the previous result current (its pointer names its own version); the
    next run commits a newer version."""
    from deltalake import DeltaTable

    from odin_engine.decide.flagging import flag_schema
    from odin_engine.io.results import referenced_versions
    from odin_engine.io.store import Store

    out = tmp_path / "out"
    before = _calibrate(tables, out, 0.90)
    dead = Publication(Store(str(out)), flags_format="delta")
    dead.prepare_flags()
    name = f"{dead.part_prefix}-000-00000.parquet"
    rows = open_flags(str(out)).read().slice(0, 10)  # a whole (if small) flags set of another result
    dead.flags_store.write_parquet(name, rows)
    assert dead.commit_flags([name], flag_schema(rows.schema)) == 1  # … and the run dies here
    assert read_current(pafs.LocalFileSystem(), str(out))["result_id"] == before["result_id"]
    cur = open_flags(str(out))
    assert (cur.result_id, cur.version, cur.read().num_rows) == (before["result_id"], 0, CORPUS_ROWS)
    # a vacuum now (retention 0) keeps the current result's version, though the table's newest is the dead one's
    assert referenced_versions(Store(str(out))) == {"flags": [0]}
    from jobs.compact import main as compact

    assert compact(["--output", str(out), "--vacuum-hours", "0", "--quiet"]) == 0
    assert open_flags(str(out)).read().num_rows == CORPUS_ROWS
    after = _calibrate(tables, out, 0.95)
    assert after["flags"]["flags_version"] == 2 and open_flags(str(out)).result_id == after["result_id"]
    assert len(DeltaTable(str(out / "flags")).to_pandas()) == CORPUS_ROWS
    assert not (out / RESULTS_DIR / dead.result_id).exists()  # the dead result's directory: pruned


def test_the_versions_kept_results_read_are_listed_for_the_vacuum(tmp_path):
    """referenced_versions: the current pointer's flags version, each kept result's flags version and
    the score-table versions each kept audit decided on (audit.json's score_runs), by table name."""
    import json

    from odin_engine.io.results import POINTER, referenced_versions
    from odin_engine.io.store import Store

    out = tmp_path / "out"
    assert referenced_versions(Store(str(out))) == {}
    docs = {"a1": {"flags_version": 4, "score_runs": {"corpus": {"table_version": 7}, "heldout": {"table_version": 2},
                                                      "ood/svhn": {"table_version": None}}},
            "a0": {"flags_version": 3, "score_runs": {"corpus": {"table_version": 5}, "heldout": {"table_version": 2}}}}
    for rid, doc in docs.items():
        (out / RESULTS_DIR / rid).mkdir(parents=True)
        (out / RESULTS_DIR / rid / "audit.json").write_text(json.dumps(doc))
    (out / RESULTS_DIR / "c0").mkdir()
    (out / RESULTS_DIR / "c0" / "calibration.json").write_text(json.dumps({"flags": {"flags_version": 1}}))
    (out / POINTER).write_text(json.dumps({"result_id": "a1", "path": "results/a1", "flags_version": 4,
                                           "kept": ["a1", "a0", "c0"]}))
    assert referenced_versions(Store(str(out))) == {"flags": [1, 3, 4], "corpus/scores": [5, 7],
                                                    "heldout/scores": [2]}


def test_buckets_flags_unchanged_then_migrated_to_delta(tables, tmp_path):
    """``--table-format buckets``: each result's own Parquet folder behind the ``DIR/flags`` link, as
    before Delta, kept by later runs that ask for no format. The first Delta run (``--table-format
    delta``) replaces the link with the table; the older results keep their folders, still read by
    their ids; the output cannot go back (exit 2)."""
    from deltalake import DeltaTable

    out = tmp_path / "out"
    old = _calibrate(tables, out, 0.90, "buckets")
    pointer = json.loads((out / POINTER).read_text())
    assert pointer["flags_format"] == "buckets" and "flags_version" not in pointer
    assert (out / "flags").is_symlink() and os.readlink(out / "flags") == f"{LATEST}/flags"
    assert old["flags"] == {"path": "flags", "files": 6, "rank_ranges": 1, "flags_format": "buckets"}
    plain = pd.read_parquet(out / "flags")  # a buckets output's flags are a plain Parquet folder
    assert len(plain) == CORPUS_ROWS and int(plain["is_outlier"].sum()) == old["summary"]["n_outliers"]
    assert open_flags(str(out)).format == "buckets" and open_flags(str(out)).result_id == old["result_id"]
    kept = _calibrate(tables, out, 0.99)  # no format asked: the output keeps its own
    assert kept["flags"]["flags_format"] == "buckets" and (out / "flags").is_symlink()

    new = _calibrate(tables, out, 0.95, "delta")  # migrates
    assert not (out / "flags").is_symlink() and (out / "flags" / "_delta_log").is_dir()
    assert (out / RESULTS_DIR / old["result_id"] / "flags").is_dir()  # kept with its own folder
    assert len(DeltaTable(str(out / "flags")).to_pandas()) == CORPUS_ROWS
    back = open_flags(str(out), old["result_id"])
    assert (back.format, back.result_id) == ("buckets", old["result_id"])
    pd.testing.assert_frame_equal(_sorted(back.read()), plain.sort_values("image_id").reset_index(drop=True))
    assert open_flags(str(out)).result_id == new["result_id"]
    with pytest.raises(ConfigError, match="cannot go back"):
        _calibrate(tables, out, 0.80, "buckets")
    assert open_flags(str(out)).result_id == new["result_id"]


def test_the_flags_format_is_decided_like_the_score_tables(tmp_path):
    """One rule (jobs.score.decided_format) for the score table and the flags: a new output is Delta
    unless buckets is asked; an existing output keeps its own; delta migrates. An audit's flags take
    its corpus score output's format (its job file)."""
    from jobs.score import JOB_FILE, decided_format, output_table_format

    assert [decided_format(None, r) for r in (None, "delta", "buckets")] == ["delta", "delta", "buckets"]
    assert [decided_format("buckets", r) for r in (None, "delta", "buckets")] == ["buckets", "delta", "buckets"]
    assert decided_format("delta", None) == "delta"
    corpus = tmp_path / "audit" / "corpus"
    assert output_table_format(str(corpus), None) == "delta"  # not scored yet: a new output
    corpus.mkdir(parents=True)
    (corpus / JOB_FILE).write_text(json.dumps({"run_id": "r", "config": {}}))  # made before issue 23
    assert output_table_format(str(corpus), None) == "buckets"
    assert output_table_format(str(corpus), "delta") == "delta"
    (corpus / JOB_FILE).write_text(json.dumps({"run_id": "r", "config": {}, "layout": {"format": "delta"}}))
    assert output_table_format(str(corpus), None) == "delta"
