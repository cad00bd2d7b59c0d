"""Every ending has its exit code and one line: a run-time failure is exit 5 (the traceback goes to a log
file the line names), a full disk at each stage (listing, scoring, commit, decision) ends that way and the
same command resumes once space is freed; a no-data night with --fail-on-drift is exit 6."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jobs.options import EXIT_RUNTIME, run_main
from odin_engine.io.results import open_flags
from _forkserver import run_command

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- run_main's mapping (no Ray)
def _raising(exc: BaseException):
    def run(args):
        raise exc
    return run


def test_a_run_time_failure_is_one_line_exit_5_and_a_traceback_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ODIN_AUDIT_LOG_DIR", str(tmp_path / "logs"))
    full = OSError(errno.ENOSPC, "No space left on device")
    rc = run_main(lambda p: None, _raising(full), [], prog="odin-audit audit")
    err = capsys.readouterr().err
    assert rc == EXIT_RUNTIME == 5
    assert len(err.strip().splitlines()) == 1 and "Traceback (most recent" not in err
    assert "the disk is full: free space, then rerun the same command to resume" in err
    log = Path(re.search(r"Traceback: (\S+)", err).group(1))
    assert log.parent == tmp_path / "logs" and "Traceback (most recent call last)" in log.read_text()
    assert "No space left on device" in log.read_text()


def test_the_cause_inside_a_ray_task_error_is_named(tmp_path, monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    monkeypatch.setenv("ODIN_AUDIT_LOG_DIR", str(tmp_path))
    cause = FileNotFoundError(2, "No such file or directory", "/out/_listing/x")
    wrapped = RayTaskError("list_unit_task", "remote traceback", cause)
    assert run_main(lambda p: None, _raising(wrapped), [], prog="odin-audit score") == 5
    err = capsys.readouterr().err
    assert "FileNotFoundError" in err and "/out/_listing/x" in err and len(err.strip().splitlines()) == 1


def test_an_unwritable_log_directory_still_gives_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("ODIN_AUDIT_LOG_DIR", str(tmp_path / "file" / "logs"))
    assert run_main(lambda p: None, _raising(RuntimeError("boom")), [], prog="odin-audit tune") == 5
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "RuntimeError: boom" in err and "not saved" in err


# --------------------------------------------------------------------------- real Ray, a real full disk
def _images(d: Path, n: int, seed: int, prefix: str = "img") -> None:
    from _odin_helpers import smooth_images

    d.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(smooth_images(n, seed)):
        Image.fromarray(a).save(d / f"{prefix}{i:03d}.png")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from _odin_helpers import random_weights

    root = tmp_path_factory.mktemp("exits")
    w = random_weights(root / "w.pt")
    _images(root / "held", 10, 1)  # --tpr 0.5 needs 10 held-out images
    _images(root / "corpus", 6, 2)
    return root, w


class FullDisk:
    """A tmpfs with no free inode mounted on a directory: every file or folder created in it fails
    with ENOSPC ("No space left on device"), as on a full disk; unmounting frees the space."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=1", "tmpfs", str(path)], check=True,
                       capture_output=True)

    def free(self) -> None:
        subprocess.run(["umount", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def full_disk(can_mount):
    """``full_disk(path)`` mounts a FullDisk there; every one still mounted is freed after the test."""
    mounted: list[FullDisk] = []

    def make(path: Path) -> FullDisk:
        mounted.append(FullDisk(path))
        return mounted[-1]

    yield make
    for disk in mounted:
        subprocess.run(["umount", str(disk.path)], capture_output=True)


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a full disk is made by mounting a tmpfs with no free inode: needs root (not root here)")
    probe = tmp_path_factory.mktemp("mnt") / "probe"
    try:
        disk = FullDisk(probe)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the full-disk tests need `mount -t tmpfs`")
    try:
        with pytest.raises(OSError) as info:
            (probe / "x").write_text("x")
        assert info.value.errno == errno.ENOSPC
    finally:
        disk.free()


def _audit(small, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    root, w = small
    args = [sys.executable, "-m", "jobs.cli", "audit", "--corpus", str(root / "corpus"), "--heldout",
            str(root / "held"), "--output", str(out), "--model", "cifar_resnet20", "--weights", str(w),
            "--tpr", "0.5", "--quiet", *extra]
    return run_command(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _failed_on_full_disk(proc: subprocess.CompletedProcess, logs: Path) -> None:
    assert proc.returncode == 5, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "the run failed at run time" in lines[0] and "the disk is full: free space" in lines[0]
    assert "rerun the same command to resume" in lines[0]
    log = Path(re.search(r"Traceback: (\S+)", lines[0]).group(1))
    assert log.parent == logs and "Traceback (most recent call last)" in log.read_text()


def _current(out: Path) -> dict:
    return json.loads((out / "latest" / "audit.json").read_text())


@pytest.mark.slow
def test_full_disk_at_each_stage_is_exit_5_and_the_same_command_resumes(ray_head, small, full_disk, tmp_path):
    root, _ = small
    logs = tmp_path / "logs"
    env = dict(ray_head.env, ODIN_AUDIT_LOG_DIR=str(logs))
    out = tmp_path / "out"

    # listing: the corpus listing cannot be written
    disk = full_disk(out / "corpus" / "_listing")
    _failed_on_full_disk(_audit(small, out, env), logs)
    disk.free()
    first = _audit(small, out, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _current(out)["summary"]["n_rows"] == 6

    # scoring: four new images, and the staged blocks cannot be written (inside Ray tasks)
    _images(root / "corpus", 4, 3, prefix="new")
    disk = full_disk(out / "corpus" / "_staging")
    _failed_on_full_disk(_audit(small, out, env), logs)
    disk.free()

    # commit: the score table's folder is full
    disk = full_disk(out / "corpus" / "scores")
    _failed_on_full_disk(_audit(small, out, env), logs)
    disk.free()

    # decision: the new result cannot be written; the previous complete result stays current
    disk = full_disk(out / "results")
    _failed_on_full_disk(_audit(small, out, env), logs)
    disk.free()
    assert _current(out)["summary"]["n_rows"] == 6

    again = _audit(small, out, env)  # space freed: the same command resumes and publishes
    assert again.returncode == 0, again.stderr[-3000:]
    doc = _current(out)
    assert doc["summary"]["n_rows"] == 10 and doc["score_runs"]["corpus"]["exactly_once"]
    from deltalake import DeltaTable

    scores = DeltaTable(str(out / "corpus" / "scores")).to_pandas()
    assert len(scores) == 10 and scores["image_id"].is_unique
    assert len(open_flags(str(out)).read()) == 10


@pytest.mark.slow
def test_a_no_data_night_with_fail_on_drift_exits_6_and_history_records_it(ray_head, small, tmp_path):
    root, _ = small
    night = tmp_path / "night"
    night.mkdir()
    for i in range(3):
        (night / f"broken{i}.png").write_bytes(b"not an image at all")
    out, history = tmp_path / "out", tmp_path / "history"
    args = [sys.executable, "-m", "jobs.cli", "audit", "--corpus", str(night), "--heldout", str(root / "held"),
            "--output", str(out), "--model", "cifar_resnet20", "--weights", str(small[1]), "--tpr", "0.5",
            "--fail-on-drift", "0.01", "--history", str(history), "--quiet"]
    proc = run_command(args, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 6, proc.stderr[-3000:]
    assert "NO DATA: 0 corpus images scored ok" in proc.stderr and "Traceback" not in proc.stderr
    doc = _current(out)  # every output is written first
    assert doc["drift"]["no_data"] is True and doc["summary"]["n_error"] == 3
    from odin_engine.decide.history import read_history
    from odin_engine.io.store import Store

    rows = read_history(Store(str(history)))  # a Delta table: read through its log, never as a Parquet folder
    assert len(rows) == 1 and bool(rows["no_data"].iloc[0]) and rows["n_ok"].iloc[0] == 0
