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


# --------------------------------------------------------------------------- the shared head's workers
WORKER_PROBE = """
import json, os, signal, sys, time
import ray

ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=json.loads(sys.argv[1]) or None, logging_level="ERROR")
MODULE = sys.argv[3]  # captured by value into the remote functions


def where():
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
        parent = fh.read().replace(b"\\0", b" ").decode(errors="replace")
    module = None
    if MODULE != "-":  # a module the job's working_dir or PYTHONPATH provides
        module = __import__(MODULE).__file__
    return {"pid": os.getpid(), "parent": parent, "probe": os.environ.get("ODIN_FORK_PROBE"),
            "worker_id": ray.get_runtime_context().get_worker_id(), "cwd": os.getcwd(), "module": module,
            "hash_seed": os.environ.get("PYTHONHASHSEED"), "hash": hash("odin")}


@ray.remote
class Where:
    def where(self):
        return where()


def launcher_of(worker_id):  # the raylet's child for this worker: its command line names the worker id
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"--worker-id={worker_id}" in cmd and "default_worker.py" in cmd:
            return int(pid)


def gone(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


out = {"task": ray.get(ray.remote(where).remote())}
actor = Where.remote()
out["actor"] = ray.get(actor.where.remote())
if sys.argv[2] == "kill":
    # the launcher is the worker's stand-in for the raylet: killing one ends the other
    launcher = launcher_of(out["actor"]["worker_id"])
    os.kill(launcher, signal.SIGKILL)
    out["worker gone after its launcher's kill"] = gone(out["actor"]["pid"])
    second = ray.get(Where.remote().where.remote())
    launcher = launcher_of(second["worker_id"])
    os.kill(second["pid"], signal.SIGKILL)
    out["launcher gone after its worker's kill"] = launcher is not None and gone(launcher)
print(json.dumps(out))
"""


def _probe_workers(ray_head, tmp_path, runtime_env: dict, kill: bool = False, module: str = "-") -> dict:
    import json

    p = run_command([sys.executable, "-c", WORKER_PROBE, json.dumps(runtime_env), "kill" if kill else "-", module],
                    cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.startswith('{"task"')]
    assert lines, (p.stdout + p.stderr)[-3000:]
    return json.loads(lines[-1])


@pytest.fixture
def worker_server(ray_head):
    """The shared head's worker server, up (the head's first worker starts it)."""
    if not ray_head.worker_server_up():
        pytest.skip("ODIN_TEST_FORK=0: the shared head starts its workers as plain Python processes")
    return ray_head


@pytest.mark.slow
def test_the_shared_heads_workers_are_forked_with_the_jobs_environment(worker_server, tmp_path):
    """A task's and an actor's worker process on the shared head is forked by its worker server,
    with the job's runtime-environment variables (as Ray's setup_worker would set them)."""
    seen = _probe_workers(worker_server, tmp_path, {"env_vars": {"ODIN_FORK_PROBE": "job"}})
    for where in (seen["task"], seen["actor"]):
        assert "_forkserver.py --ray-workers" in where["parent"], where
        assert where["probe"] == "job"


@pytest.mark.slow
def test_a_worker_with_other_import_time_variables_starts_as_plain_python(worker_server, tmp_path):
    """PYTHONHASHSEED is read when the interpreter starts: such a worker is Ray's own exec of Python
    (a fork would keep the server's hash seed)."""
    seen = _probe_workers(worker_server, tmp_path, {"env_vars": {"ODIN_FORK_PROBE": "plain", "PYTHONHASHSEED": "7"}})
    for where in (seen["task"], seen["actor"]):
        assert "/raylet " in where["parent"] and where["probe"] == "plain", where
        assert where["hash_seed"] == "7"
    assert seen["task"]["hash"] == seen["actor"]["hash"]  # both processes started with seed 7


@pytest.mark.slow
def test_a_working_dir_job_is_forked_in_its_folder_with_its_pythonpath(worker_server, tmp_path):
    """``ray job submit --working-dir``: setup_worker's ``cd DIR && exec python …`` and the PYTHONPATH
    entry are done by the launcher and the forked worker; a PYTHONPATH folder that would shadow a
    module the server imported (here ``numpy``) makes it Ray's own exec instead."""
    work = tmp_path / "wd"
    work.mkdir()
    (work / "odin_wd_probe.py").write_text("X = 1\n")
    seen = _probe_workers(worker_server, tmp_path, {"working_dir": str(work)}, module="odin_wd_probe")
    for where in (seen["task"], seen["actor"]):
        assert "_forkserver.py --ray-workers" in where["parent"], where
        assert where["module"] == os.path.join(where["cwd"], "odin_wd_probe.py")  # the unpacked working_dir
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "numpy.py").write_text("raise ImportError('the shadowing numpy')\n")
    (shadow / "odin_pp_probe.py").write_text("X = 2\n")
    seen = _probe_workers(worker_server, tmp_path, {"env_vars": {"PYTHONPATH": str(shadow)}}, module="odin_pp_probe")
    for where in (seen["task"], seen["actor"]):
        assert "/raylet " in where["parent"] and where["module"] == str(shadow / "odin_pp_probe.py"), where


@pytest.mark.slow
def test_a_forked_worker_and_its_launcher_end_together(worker_server, tmp_path):
    seen = _probe_workers(worker_server, tmp_path, {}, kill=True)
    assert "_forkserver.py --ray-workers" in seen["actor"]["parent"]
    assert seen["worker gone after its launcher's kill"] and seen["launcher gone after its worker's kill"], seen


def test_setup_worker_is_done_in_the_launcher_only_for_environment_variables():
    py = sys.executable
    ctx = '--serialized-runtime-env-context={"env_vars": {"ODIN_SETUP_PROBE": "a${ODIN_UNSET_VAR}b"}, "command_prefix": []}'
    try:
        assert _forkserver._setup_worker(["/r/default_worker.py", "--x=1", ctx, "--language=PYTHON"], py) == [
            "/r/default_worker.py", "--x=1"]
        assert os.environ["ODIN_SETUP_PROBE"] == "ab"  # ray._private.utils.update_envs: unset ${X} → ""
    finally:
        os.environ.pop("ODIN_SETUP_PROBE", None)
    other_prefix = '--serialized-runtime-env-context={"command_prefix": ["nice", "-n", "5"]}'
    assert _forkserver._setup_worker(["/r/default_worker.py", other_prefix, "--language=PYTHON"], py) is None
    gone = '--serialized-runtime-env-context={"command_prefix": ["cd", "/no/such/odin/dir", "&&"]}'
    assert _forkserver._setup_worker(["/r/default_worker.py", gone, "--language=PYTHON"], py) is None
    assert _forkserver._setup_worker(["/r/default_worker.py", "--language", "JAVA"], py) is None
    other_python = '--serialized-runtime-env-context={"py_executable": "/opt/other/python"}'
    assert _forkserver._setup_worker(["/r/default_worker.py", other_python, "--language=PYTHON"], py) is None
