"""What a run prints, read as an operator reads a nightly log (no TTY).

A healthy ``score``/``audit`` run prints no ERROR or WARNING line on stdout or stderr; its log is
the tool's own lines — one per stage, a progress line at most every 30 s while scoring, the
result — with Ray's own output in the Ray session's log files (``jobs/ray_output.py``).
Real parts: the session's Ray head, the CLI as a subprocess with pipes (not a TTY).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import ALARM, REPO, VENV_BIN, make_images

TOOL = ("odin score", "odin audit")

SLOW_MODEL = textwrap.dedent('''
    """A tiny classifier whose forward pass sleeps: a slow model, without the CPU cost of one."""
    import time

    import torch
    from torch import nn


    class SlowNet(nn.Module):
        mean, std, input_size = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32

        def __init__(self, sleep_s: float):
            super().__init__()
            self.sleep_s = sleep_s
            self.head = nn.Linear(3 * 4 * 4, 10)

        def forward(self, x):
            if self.sleep_s and x.shape[0] > 1:  # the preflight probe's one image is not slowed
                time.sleep(self.sleep_s)
            return self.head(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


    def build():
        torch.manual_seed(0)  # the same weights in every process: the driver checks the model id
        return SlowNet(SLEEP_S)
''')


def _manifest(path: Path, files: list[Path], n: int, heldout: int) -> Path:
    """A CSV manifest of ``n`` rows (distinct ids) over a few image files, the first ``heldout``
    of split ``heldout``: a big corpus and its held-out set, cheaply, scored in one run."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "uri", "split"])
        for i in range(n):
            w.writerow([f"img{i:05d}", str(files[i % len(files)]), "heldout" if i < heldout else "corpus"])
    return path


def _run_logged(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, list[tuple[float, str, str]]]:
    """Run with stdout and stderr on pipes (no TTY); every line with its arrival time and stream."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    lines: list[tuple[float, str, str]] = []
    t0 = time.monotonic()

    def read(stream, name):
        for line in stream:
            lines.append((time.monotonic() - t0, name, line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(proc.stdout, "stdout")),
               threading.Thread(target=read, args=(proc.stderr, "stderr"))]
    for r in readers:
        r.start()
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        for r in readers:
            r.join(timeout=30)
    lines.append((time.monotonic() - t0, "exit", ""))
    return rc, sorted(lines)


def _alarming(lines) -> list[str]:
    return [f"{stream}: {text}" for _, stream, text in lines if ALARM.search(text)]


@pytest.mark.slow
def test_a_10000_image_audit_logs_its_own_progress_in_under_30_lines(ray_head, tmp_path):
    """``odin-audit audit`` on 10,000 images with a slow model (about 40 s of scoring), no TTY:
    ≤ 30 lines, all the tool's own, none alarming, progress at least every 30 s, and the Ray
    session's log path printed once (Ray's lines are there)."""
    # 0.9 s per forward pass: 40 batches of 256 × 2 passes ÷ 2 actors ≈ 36 s of scoring. In the file, not
    # in the environment: the shared head's workers do not get the test's environment
    (tmp_path / "odin_slow_model.py").write_text(SLOW_MODEL + "\nSLEEP_S = 0.9\n")
    files = make_images(tmp_path / "files", 20)
    corpus = _manifest(tmp_path / "corpus.csv", files, 10_100, heldout=100)  # 10,000 audited + 100 held out
    env = dict(ray_head.env,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(tmp_path), os.environ.get("PYTHONPATH")])))
    cmd = [str(VENV_BIN / "odin-audit"), "audit", "--corpus", str(corpus), "--heldout-split", "heldout",
           "--output", str(tmp_path / "out"), "--model", "odin_slow_model:build"]
    rc, lines = _run_logged(cmd, tmp_path, env, timeout=600)  # cwd: Ray puts it on the workers' path
    log = "\n".join(f"{t:6.1f}s {stream}: {text}" for t, stream, text in lines)
    assert rc == 0, log
    shown = [(t, s, text) for t, s, text in lines if s != "exit"]
    assert len(shown) <= 30, log
    assert not _alarming(shown), log
    assert all(text.startswith(TOOL) for _, _, text in shown), log
    assert shown[-1][2].startswith("odin audit: δ="), log  # the one-line result ends the log
    # progress at least every 30 s (a timer thread: 5 s of slack for a loaded machine)
    times = [t for t, _, _ in lines]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) <= 35, log
    progress = [text for _, _, text in shown if re.search(r"scored \d+/10100 \(\d+%\), [\d.]+ images/s", text)]
    assert progress and all("[corpus]" in p for p in progress), log
    # Ray's own output went to the session's logs, whose path is printed once
    where = [text for _, _, text in shown if "Ray's own output is in" in text]
    assert len(where) == 1, log
    logs = Path(re.search(r"is in (\S+)", where[0]).group(1))
    assert (logs / "ray-data").is_dir() and any(logs.glob("odin-driver-*.log")), log


# --------------------------------------------------------------------------- the parts, without Ray running
ROUTING = textwrap.dedent('''
    import os, sys
    from jobs import ray_output
    ray_output.route(sys.argv[1])
    if ray_output._log is not None:  # opened in the Ray session's logs/ after ray.init; here a plain directory
        ray_output._log.open(sys.argv[2])
    cpp = "[2026-12-04 22:18:28,780 {} 10021 10021] core_worker.cc:2465: {}\\n"
    with ray_output.routed_stderr():
        os.write(2, cpp.format("E", "Actor with class name: 'X' has constructor arguments in the object store and "
                                    "max_restarts > 0. If the arguments ...").encode())
        os.write(2, cpp.format("W", "a C++ warning").encode())
        os.write(2, cpp.format("E", "a real C++ error").encode())
        os.write(2, b"Traceback (most recent call last): a Python line\\n")
        import logging
        logging.getLogger("ray.data").info("a Ray Data INFO line")
        logging.getLogger("ray").warning("a Ray WARNING line")
    print("driver log:", ray_output.driver_log())
''')


@pytest.mark.parametrize("mode", ["normal", "quiet", "verbose"])
def test_ray_lines_go_to_the_session_log_by_mode(tmp_path, mode):
    p = subprocess.run([sys.executable, "-c", ROUTING, mode, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    err = p.stderr
    assert "a Python line" in err  # never swallowed
    logged = "".join(f.read_text() for f in tmp_path.glob("odin-driver-*.log"))
    if mode == "verbose":
        assert "constructor arguments" in err and "a C++ warning" in err and "a Ray WARNING line" in err
        return
    for line in ("constructor arguments", "a C++ warning", "a Ray WARNING line"):
        assert line not in err and line in logged, (line, err, logged)
    assert "a Ray Data INFO line" not in err
    assert ("a real C++ error" in err) == (mode == "normal"), err  # a real error stays on the console


def test_progress_line_counts_rate_and_time_left():
    from jobs.progress import ScoringProgress, duration

    now = [100.0]
    p = ScoringProgress(10_000, emit=None, every_s=0, clock=lambda: now[0])
    with p:
        now[0] += 30
        assert p.line() == "scored 0/10000 (0%), 0.0 images/s, no block done yet after 30 s"
        p.add(3000)
        now[0] += 30
        assert p.line() == "scored 3000/10000 (30%), 50.0 images/s, about 2 min left"
    assert (duration(42), duration(600), duration(7500)) == ("42 s", "10 min", "2 h 05 min")
    lines = []
    with ScoringProgress(10, emit=lines.append, every_s=0.05):
        time.sleep(0.3)
    assert 2 <= len(lines) <= 7 and lines[0].startswith("scored 0/10 (0%)"), lines
