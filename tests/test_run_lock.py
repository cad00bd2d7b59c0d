"""One score run per output directory: the lease file, on a local disk and on a real S3 API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from pyarrow import fs as pafs

from jobs.run_lock import LOCK_FILE, LeaseLost, RunLock
from odin_engine.errors import ConfigError


def _plant(directory, mtime_age: float = 0.0, **record):
    """A lease as another run would leave it; ``mtime_age``: how long ago the store last saw it written."""
    directory.mkdir(parents=True, exist_ok=True)
    base = {"owner": "other", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    path = directory / LOCK_FILE
    path.write_text(json.dumps({**base, **record}))
    if mtime_age:
        t = time.time() - mtime_age
        os.utime(path, (t, t))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_is_refused_while_the_first_holds_the_lease(tmp_path):
    fs = pafs.LocalFileSystem()
    first = RunLock(fs, str(tmp_path / "out"))
    first.acquire()
    held = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match="being written by another run"):
        RunLock(fs, str(tmp_path / "out")).acquire()
    first.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    with RunLock(fs, str(tmp_path / "out")):  # free again
        assert (tmp_path / "out" / LOCK_FILE).exists()
    assert not (tmp_path / "out" / LOCK_FILE).exists()


DAY = 86400.0


@pytest.mark.parametrize("record, mtime_age, live", [
    ({}, 0, True),                                                     # this host, pid alive, fresh
    ({"heartbeat": time.time() - DAY}, DAY, True),                     # this host, pid alive: its clock is not asked
    ({"heartbeat": time.time() + 3600}, DAY, True),                    # … nor a heartbeat from the future
    ({"pid": None}, 0, True),                                          # pid unknown: the store's mtime decides
    ({"pid": None}, 600, False),
    ({"host": "elsewhere"}, 0, True),                                  # another host, written just now
    ({"host": "elsewhere", "heartbeat": time.time() + 3600}, 600, False),  # future-dated, but stale by the store
    ({"host": "elsewhere", "heartbeat": time.time() - 600}, 0, True),  # old-looking, but the store saw it now
    ({"pid": "dead"}, 0, False),                                       # this host, holder killed (SIGKILL)
])
def test_a_lease_is_live_only_while_its_holder_can_be_writing(tmp_path, record, mtime_age, live):
    if record.get("pid") == "dead":
        record = {**record, "pid": _dead_pid()}
    _plant(tmp_path, mtime_age, **record)
    lock = RunLock(pafs.LocalFileSystem(), str(tmp_path), stale_s=120)
    if live:
        with pytest.raises(ConfigError, match="stop it"):
            lock.acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["owner"] == "other"  # untouched
    else:
        lock.acquire()  # taken over
        assert json.loads((tmp_path / LOCK_FILE).read_text())["owner"] == lock.owner
        lock.release()
    assert not list(tmp_path.glob(".*clock*"))  # the clock probe is removed again


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """Same host, the pid exists, but it is another process (start time differs): not live."""
    _plant(tmp_path, pid=os.getpid(), pid_start="1")
    with RunLock(pafs.LocalFileSystem(), str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["owner"] == lock.owner


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path):
    lock = RunLock(pafs.LocalFileSystem(), str(tmp_path), heartbeat_s=0.1)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.5)
    later = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    lock.release()
    assert later > first


def test_an_empty_lease_counts_as_held_until_it_expires_by_the_store_clock(tmp_path):
    """A 0-byte lease (an O_EXCL winner that has not written yet, or a write that hit a full disk)
    blocks while fresh and expires like a dead holder's: it never locks the directory for good."""
    (tmp_path / LOCK_FILE).write_text("")
    with pytest.raises(ConfigError, match="stop it"):
        RunLock(pafs.LocalFileSystem(), str(tmp_path), stale_s=120).acquire()
    old = time.time() - 600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with RunLock(pafs.LocalFileSystem(), str(tmp_path), stale_s=120) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["owner"] == lock.owner


def test_heartbeat_and_release_never_touch_another_owners_lease(tmp_path):
    lock = RunLock(pafs.LocalFileSystem(), str(tmp_path), heartbeat_s=0.05)
    lock.acquire()
    lock.check_held()  # still ours
    other = {"owner": "usurper", "host": "elsewhere", "pid": 1, "heartbeat": 0}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))  # a run that (wrongly or not) took it over
    time.sleep(0.4)
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == other  # not overwritten by our heartbeats
    with pytest.raises(LeaseLost, match="took over this run's lease"):
        lock.check_held()
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == other  # not deleted either


def _s3fs(s3_server):
    return pafs.S3FileSystem(endpoint_override=s3_server.endpoint, access_key="testing", secret_key="testing",
                             region="us-east-1", scheme="http")


def test_future_dated_lease_from_another_host_expires_by_the_store_clock_on_s3(s3_server, s3_bucket):
    """The holder's clock ran an hour ahead and it died: the lease stops blocking ``stale_s`` after the
    store last saw it written (S3's LastModified against a probe object), not an hour later."""
    fs = _s3fs(s3_server)
    directory = f"{s3_bucket}/runs/skewed"
    record = {"owner": "other", "host": "elsewhere", "pid": 4242, "heartbeat": time.time() + 3600}
    with fs.open_output_stream(f"{directory}/{LOCK_FILE}") as fh:
        fh.write(json.dumps(record).encode())
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="by the store's clock"):
        RunLock(fs, directory, stale_s=3, settle_s=0.1).acquire()
    while True:
        try:
            lock = RunLock(fs, directory, stale_s=3, settle_s=0.1)
            lock.acquire()
            break
        except ConfigError:
            assert time.monotonic() - t0 < 3 + 5, "the lease kept blocking well past its stale period"
            time.sleep(0.5)
    waited = time.monotonic() - t0
    lock.release()
    assert 1.0 <= waited < 3 + 5  # S3 stamps whole seconds: within the stale period, give or take that
    assert [i for i in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))] == []


def test_lease_on_a_real_s3_api(s3_server, s3_bucket):
    fs = _s3fs(s3_server)
    directory = f"{s3_bucket}/runs/r1"
    first = RunLock(fs, directory, settle_s=0.1)
    first.acquire()
    with pytest.raises(ConfigError, match="being written by another run"):
        RunLock(fs, directory, settle_s=0.1).acquire()
    first.release()
    assert fs.get_file_info(f"{directory}/{LOCK_FILE}").type == pafs.FileType.NotFound
    second = RunLock(fs, directory, settle_s=0.1)
    second.acquire()
    second.release()


def test_score_refuses_a_directory_another_run_is_writing_and_writes_nothing(tmp_path, tiny_model, capsys):
    """A live run on this host whose heartbeat looks a day old (a paused or skewed clock) keeps its
    lease: the second run exits 2 and touches none of the first run's files."""
    from conftest import make_images
    from jobs.cli import main as cli_main

    make_images(tmp_path / "corpus", 3)
    out = tmp_path / "out"
    _plant(out, DAY, heartbeat=time.time() - DAY)  # a live run: this very process, old-looking heartbeat
    listing = out / "_listing" / "20260101T000000-abcdef" / "chunk.parquet"  # the live run's work in progress
    listing.parent.mkdir(parents=True)
    listing.write_bytes(b"in progress")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rc = cli_main(["score", "--input", str(tmp_path / "corpus"), "--output", str(out), *tiny_model.cli,
                   "--temperature", "1000", "--epsilon", "0.0014"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "being written by another run" in err and "which is running" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
