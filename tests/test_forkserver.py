"""The tests' fork server (``tests/_forkserver.py``) gives a command what a fresh ``python -m/-c``
subprocess would: its own process and session, cwd, environment, argv, streams, exit code,
fresh random states, ``atexit``, and SIGKILL as ``-9``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import _forkserver
from _forkserver import run_command, start_command

CODE = """
import atexit, os, random, sys
import numpy as np
atexit.register(lambda: print("atexit ran", flush=True))
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("ODIN_FORK_PROBE"))
print("pid", os.getpid(), "sid", os.getsid(0), "random", random.random(), np.random.random())
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def server_env(monkeypatch):
    monkeypatch.setenv("ODIN_TEST_FORK", "1")
    return dict(os.environ)


def test_a_forked_command_is_its_own_process_like_a_subprocess(server_env, tmp_path):
    env = dict(server_env, ODIN_FORK_PROBE="here")
    runs = [run_command([sys.executable, "-c", CODE, "3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120) for _ in range(2)]
    assert _forkserver.import_env(env) in _forkserver._SERVERS  # the test process's environment: forked
    plain = subprocess.run([sys.executable, "-c", CODE, "3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    for p in (*runs, plain):
        assert p.returncode == 3 and p.stderr == "to stderr\n", p.stderr
        lines = p.stdout.splitlines()
        assert lines[0] == f"argv ['3'] cwd {tmp_path} env here" and lines[-1] == "atexit ran"
        pid, sid = (int(x) for x in lines[1].split()[1:4:2])
        assert pid != os.getpid()
        assert (pid == sid) == (p is not plain)  # a forked command has its own session (start_new_session=True)
    # fresh random states in every command (a forked child would otherwise repeat the server's)
    assert len({p.stdout.splitlines()[1].split("random")[1] for p in runs}) == 2


def test_a_module_runs_as_main_and_a_kill_is_minus_9(server_env, tmp_path):
    (tmp_path / "odin_fork_mod.py").write_text("import sys, time\nif __name__ == '__main__':\n"
                                                "    print('main', sys.argv[1:], flush=True)\n    time.sleep(60)\n")
    proc = start_command([sys.executable, "-m", "odin_fork_mod", "x"], cwd=tmp_path, env=server_env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline() == "main ['x']\n"
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_a_timeout_kills_the_command(server_env, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path, env=server_env,
                    capture_output=True, text=True, timeout=2)
    assert time.monotonic() - t0 < 30


def test_import_time_variables_that_differ_run_as_a_plain_subprocess(server_env, tmp_path):
    env = dict(server_env, RAY_ODIN_FORK_PROBE="1")  # a new import-time environment's first command
    p = run_command([sys.executable, "-c", "print('ok')"], cwd=tmp_path, env=env, capture_output=True, text=True,
                    timeout=120)
    assert p.stdout == "ok\n"
    assert _forkserver.import_env(env) not in _forkserver._SERVERS
