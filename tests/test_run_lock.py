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

from jobs.run_lock import LOCK_FILE, RunLock
from odin_engine.errors import ConfigError


def _plant(directory, **record):
    """A lease as another run would leave it."""
    directory.mkdir(parents=True, exist_ok=True)
    base = {"owner": "other", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    (directory / LOCK_FILE).write_text(json.dumps({**base, **record}))


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


@pytest.mark.parametrize("record, live", [
    ({}, True),                                                       # this host, pid alive, fresh
    ({"pid": None}, True),                                            # pid unknown: trust the heartbeat
    ({"host": "elsewhere"}, True),                                    # another host, fresh heartbeat
    ({"host": "elsewhere", "heartbeat": time.time() - 600}, False),   # another host, stale
    ({"pid": "dead"}, False),                                         # this host, holder killed (SIGKILL)
    ({"heartbeat": time.time() - 600}, False),                        # this host, pid alive but silent
])
def test_a_lease_is_live_only_while_its_holder_can_be_writing(tmp_path, record, live):
    if record.get("pid") == "dead":
        record = {**record, "pid": _dead_pid()}
    _plant(tmp_path, **record)
    lock = RunLock(pafs.LocalFileSystem(), str(tmp_path), stale_s=120)
    if live:
        with pytest.raises(ConfigError, match="stop it"):
            lock.acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["owner"] == "other"  # untouched
    else:
        lock.acquire()  # taken over
        assert json.loads((tmp_path / LOCK_FILE).read_text())["owner"] == lock.owner
        lock.release()


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path):
    lock = RunLock(pafs.LocalFileSystem(), str(tmp_path), heartbeat_s=0.1)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.5)
    later = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    lock.release()
    assert later > first


def test_a_half_written_lease_counts_as_held(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")  # the O_EXCL winner has not written its record yet
    with pytest.raises(ConfigError):
        RunLock(pafs.LocalFileSystem(), str(tmp_path)).acquire()


def test_lease_on_a_real_s3_api(s3_server, s3_bucket):
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint, access_key="testing", secret_key="testing",
                           region="us-east-1", scheme="http")
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
    from conftest import make_images
    from jobs.cli import main as cli_main

    make_images(tmp_path / "corpus", 3)
    out = tmp_path / "out"
    _plant(out)  # a live run: this very process, fresh heartbeat
    rc = cli_main(["score", "--input", str(tmp_path / "corpus"), "--output", str(out), *tiny_model.cli,
                   "--temperature", "1000", "--epsilon", "0.0014"])
    assert rc == 2
    assert "being written by another run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
