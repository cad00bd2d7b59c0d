"""A fork server for the tests' job commands: one process that has imported what a job driver
imports (torch, Ray, Ray Data, pyarrow, pandas, deltalake, ``jobs.*``, and what the commands load on
use: scipy's statistics, scikit-learn's metrics, matplotlib) and forks a fresh child per
command, so that a test's ``python -m jobs.score …`` costs a fork instead of an interpreter start
and ~2 CPU-seconds of imports.

Each command is still its own process: its own pid and process group (``setsid``, as
``start_new_session=True``), working directory, environment, ``sys.argv``, file descriptors 0/1/2
(the caller's, passed over the socket), exit code and ``atexit`` run; a test can ``killpg`` it with
SIGKILL. Nothing in the server touches Ray, threads or the network before it forks, so the
child starts as ``python -m …`` would after its imports. The caller (``tests/conftest.py``) sends a
command here only when its environment differs from the server's in no variable read at import
time (see ``IMPORT_TIME_ENV``); anything else runs as a plain subprocess.

The same server forks a test Ray head's worker processes (``--ray-workers``; see
:func:`launch_ray_worker`): the head is started with a small launcher as its ``sys.executable``, so
the raylet's "python default_worker.py …" reaches the server, which has imported torch, Ray and
Ray Data once, instead of a fresh interpreter per worker (a 6-image ``score``: ~7.5 → ~2.4 machine
CPU-seconds, ``python -m benchmarks.command_cost --forked-workers``). Each worker is still its own
process with the launcher's fds, cwd, environment and argv; Ray registers and kills it by its pid.

Protocol (one Unix-socket connection per command): the client sends one JSON line
``{"argv": [...], "cwd": ..., "env": {...}}`` with three fds (stdin, stdout, stderr) attached;
the server answers ``{"pid": N}`` when the command's process exists and ``{"rc": R}`` when it
ended (R < 0: killed by signal −R, as ``subprocess`` reports it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

#: modules a job driver imports; imported once here so the children inherit them
PRELOAD = ("torch", "numpy", "pandas", "pyarrow", "pyarrow.dataset", "pyarrow.parquet", "pyarrow.fs", "deltalake",
           "ray", "ray.data", "ray.job_submission", "PIL.Image", "jobs.cli", "jobs.options", "jobs.score",
           "jobs.audit", "jobs.calibrate", "jobs.compact", "jobs.tune", "jobs.fit", "jobs.pipeline",
           "jobs.preflight", "jobs.ray_utils", "jobs.ray_output", "odin_engine.loading", "odin_engine.scorer",
           "odin_engine.io.scores", "odin_engine.io.results", "odin_engine.io.delta", "jobs.table_commit",
           "jobs.gpu_decode",
           # what the commands load on use: the drift test and the report's plots (audit), the AUROC
           # metrics (tune, audit --ood, fit); ~0.5–0.8 CPU-s per command that needs them
           "scipy.special", "scipy.stats", "scipy.integrate", "sklearn.metrics", "odin_engine.decide.drift",
           "odin_engine.metrics", "odin_engine.report.report", "odin_engine.decide.flagging",
           "deltalake.fs", "pyarrow.acero", "pyarrow.json")
#: Ray Data's modules a pipeline loads when it first runs (private: skipped where a Ray version lacks one)
PRELOAD_IF_PRESENT = ("ray.data._internal.execution.streaming_executor", "ray.data._internal.planner.planner",
                      "ray.data._internal.issue_detection.issue_detector_configuration",
                      "ray.data._internal.logical.optimizers", "ray.dag", "ray.util.state", "pydantic.v1")

#: what a Ray worker of a job command imports (libraries only: the job's own modules, ``jobs.*`` and
#: ``odin_engine.*``, are imported by each worker from its job's ``sys.path``, as without the server)
WORKER_PRELOAD = ("torch", "numpy", "pandas", "pyarrow", "pyarrow.dataset", "pyarrow.parquet", "pyarrow.fs",
                  "pyarrow.compute", "deltalake", "ray", "ray.data", "ray.actor", "ray._private.node",
                  "PIL.Image")

#: environment variables (prefixes) that some library reads when it is imported, not when it is used:
#: a command whose value differs from the server's runs as a plain subprocess
IMPORT_TIME_ENV = ("RAY_", "CUDA_", "TORCH", "OMP_", "MKL_", "PYTHON", "ARROW_", "PYARROW", "LD_", "MPL")


def _run_command(argv: list[str]) -> int:
    """What ``python ARGV…`` does after start-up: ``-m module`` or ``-c code`` or a script path."""
    import atexit
    import runpy

    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.modules.pop(argv[1], None)  # as in a fresh interpreter: the module runs as __main__ only
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - the test's own code
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter: traceback on stderr, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    # the interpreter's own ending: non-daemon threads, atexit (Ray's shutdown), flushed streams
    try:
        import threading

        threading._shutdown()  # noqa: SLF001 - what Py_Finalize calls
    except Exception:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    return code


def _child(request: dict, fds: list[int]) -> None:
    """In the command's process: a fresh session, the caller's fds, cwd, env and argv; then run."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at start-up
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    server_path = _pythonpath(os.environ)
    os.environ.clear()
    os.environ.update(request["env"])
    # a fresh interpreter would have fresh random states; forked children would share the server's
    import random
    import tempfile

    import numpy as np
    import torch

    tempfile.tempdir = None  # chosen again from this command's TMPDIR
    random.seed()
    np.random.seed()
    torch.seed()
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    argv0 = request["argv"][0]  # what `python -m`, `-c` and a script put first on sys.path
    first = os.getcwd() if argv0 == "-m" else "" if argv0 == "-c" else os.path.dirname(os.path.abspath(argv0))
    sys.path.insert(0, first)
    # PYTHONPATH entries the server did not start with (a Ray worker's working_dir/py_modules; the
    # server checked that none of them holds a module it imported): where Python puts them, after [0]
    added = [p for p in _pythonpath(request["env"]) if p not in server_path]
    sys.path[1:1] = [p for p in added if p not in sys.path]
    os._exit(_run_command(request["argv"]))


def _pythonpath(env) -> list[str]:
    return [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def _shadowing(env: dict) -> list[str]:
    """Modules the server imported that ``env``'s new PYTHONPATH entries (those not in the server's
    own environment) would provide instead."""
    loaded = {name.split(".")[0] for name in sys.modules}
    own = _pythonpath(os.environ)
    found = []
    for folder in (p for p in _pythonpath(env) if p not in own):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found += [f"{folder}/{n}" for n in names if n.split(".")[0] in loaded and (n.endswith((".py", ".so"))
                                                                                  or "." not in n)]
    return found


def _monitor(conn: socket.socket, request: dict, fds: list[int], tied: bool = False) -> None:
    """Between the server and the command: fork it, report its pid, wait, report its exit code.
    ``tied``: the command is SIGKILLed when the client's connection closes first (a Ray worker's
    launcher killed by its raylet takes the worker with it, as with a plain exec)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _child(request, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    if tied:
        import select

        pidfd = os.pidfd_open(pid)
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd not in ready:  # the launcher went away (or spoke out of turn): the worker goes too
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    try:
        conn.sendall(json.dumps({"rc": rc}).encode() + b"\n")
    except OSError:
        pass
    os._exit(0)


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, got, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
        fds += got
    return json.loads(data), fds


def _preload(names, optional=()) -> None:
    for name in names:
        __import__(name)
    for name in optional:
        try:
            __import__(name)
        except ImportError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: not compared between a worker's environment and the server's: set by the raylet per worker and
#: read by Ray when used, not on import (``ray._private.ray_logging``); PYTHONPATH, which a job's
#: working_dir sets, is added to the forked worker's sys.path unless it would shadow a loaded module
WORKER_RUN_TIME_ENV = ("RAY_JOB_ID", "PYTHONPATH")


def _worker_import_env(env) -> tuple:
    return tuple(kv for kv in import_env(dict(env)) if kv[0] not in WORKER_RUN_TIME_ENV)


def _why_not(env: dict, mine: tuple) -> str | None:
    """Why a worker with ``env`` cannot be forked here (None: it can)."""
    if _worker_import_env(env) != mine:
        return f"import-time variables differ: {sorted({k for k, _ in set(_worker_import_env(env)) ^ set(mine)})}"
    shadowed = _shadowing(env)
    return f"PYTHONPATH would shadow loaded modules: {shadowed[:5]}" if shadowed else None


def serve(path: str, ray_workers: bool = False) -> None:
    """Import, then fork a child per connection. ``ray_workers``: a server for a Ray head's worker
    processes (:func:`launch_ray_worker`): it preloads :data:`WORKER_PRELOAD`, forks only commands
    whose import-time environment equals its own (else it answers ``{"fallback": …}`` and the
    launcher execs Python), ties each worker to its launcher, and exits with the raylet."""
    if ray_workers:
        _preload(WORKER_PRELOAD, PRELOAD_IF_PRESENT)
        watch = int(os.environ.get("RAY_RAYLET_PID", "0") or 0)
        mine = _worker_import_env(os.environ)
    else:
        _preload(PRELOAD, PRELOAD_IF_PRESENT)
        import matplotlib

        matplotlib.use("Agg", force=True)  # the report's plots: as odin_engine.report does before it imports pyplot
        import matplotlib.pyplot  # noqa: F401
        watch = 0
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    server.settimeout(2.0)
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except (TimeoutError, socket.timeout):
            # the test session (or, for workers, the raylet) died without stopping us: go too, and our socket
            if (watch and not _alive(watch)) or (not watch and os.getppid() != parent):
                import shutil

                server.close()
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)
                return
            continue
        conn.settimeout(None)
        try:
            request, fds = _recv_request(conn)
        except (ConnectionError, ValueError, OSError):
            conn.close()
            continue
        why = _why_not(request["env"], mine) if ray_workers else None
        if why:
            print(f"fallback: {why}", file=sys.stderr, flush=True)
            try:
                conn.sendall(json.dumps({"fallback": why}).encode() + b"\n")
            except OSError:
                pass
        elif os.fork() == 0:
            server.close()
            _monitor(conn, request, fds, tied=ray_workers)
        for fd in fds:
            os.close(fd)
        conn.close()


# --------------------------------------------------------------------------- client (the tests' side)
class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a command the fork server started."""

    def __init__(self, sock: socket.socket, args: list[str]):
        self.args = args
        self.stdout = self.stderr = None
        self._sock = sock
        self._buf = b""
        self.pid = int(self._read_message(None)["pid"])
        self.returncode: int | None = None

    def _read_message(self, timeout: float | None) -> dict:
        self._sock.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ConnectionError("the fork server's monitor went away")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int(self._read_message(0.001)["rc"])
            except (TimeoutError, socket.timeout, BlockingIOError):
                return None
            self._sock.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if self.returncode is None:
            try:
                self.returncode = int(self._read_message(timeout)["rc"])
            except (TimeoutError, socket.timeout):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._sock.close()
        return self.returncode

    def communicate(self, timeout: float | None = None):
        """Read the piped streams to their end, then wait: ``(stdout, stderr)`` (None where not piped);
        ``TimeoutExpired`` when that takes longer than ``timeout``."""
        import subprocess
        import threading
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        results: dict[str, object] = {}
        readers = [threading.Thread(target=lambda n=n, s=s: results.__setitem__(n, s.read()), daemon=True)
                   for n, s in (("stdout", self.stdout), ("stderr", self.stderr)) if s is not None]
        for r in readers:
            r.start()
        for r in readers:
            r.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if r.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(1.0, deadline - time.monotonic()))
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _forked(path: str, args, cwd, env: dict, stdout, stderr, text: bool) -> ForkedProcess:
    """Start ``args`` (``[python, -m|-c, …]``; the interpreter itself is dropped) in the server at
    ``path``: stdin ``/dev/null``; ``stdout``/``stderr`` None (the test's), ``subprocess.DEVNULL`` or
    ``subprocess.PIPE`` (then a file object on the returned process, text as UTF-8)."""
    import subprocess

    opened, readers = [os.open(os.devnull, os.O_RDONLY)], {}

    def fd_for(spec, default: int, name: str) -> int:
        if spec is None:
            return default
        if spec == subprocess.DEVNULL:
            fd = os.open(os.devnull, os.O_WRONLY)
        elif spec == subprocess.PIPE:
            r, fd = os.pipe()
            readers[name] = (os.fdopen(r, "r", encoding="utf-8", errors="replace") if text else os.fdopen(r, "rb"))
        else:
            raise ValueError(f"unsupported {name}={spec!r}")
        opened.append(fd)
        return fd

    try:
        fds = [opened[0], fd_for(stdout, 1, "stdout"), fd_for(stderr, 2, "stderr")]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        request = json.dumps({"argv": list(args[1:]), "cwd": str(cwd or os.getcwd()), "env": env}).encode() + b"\n"
        socket.send_fds(sock, [request], fds)
        proc = ForkedProcess(sock, list(args))
    finally:
        for fd in opened:
            os.close(fd)
    proc.stdout, proc.stderr = readers.get("stdout"), readers.get("stderr")
    return proc


# --------------------------------------------------------------------------- routing: fork server or subprocess
_SERVERS: dict[tuple, tuple] = {}  # import-time environment -> (server process, socket path)
_SEEN: dict[tuple, int] = {}  # import-time environment -> commands asked for
MAX_SERVERS = 3


def import_env(env: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)))


def _server_for(env: dict) -> str | None:
    """The socket of a server started with ``env``'s import-time variables (None: run a subprocess)."""
    key = import_env(env)
    if key in _SERVERS:
        return _ready(key)
    _SEEN[key] = _SEEN.get(key, 0) + 1
    # a server pays from an environment's second command on; the test process's own environment
    # (most commands without a cluster) gets one at once
    if len(_SERVERS) >= MAX_SERVERS or (_SEEN[key] < 2 and key != import_env(dict(os.environ))):
        return None
    return _start(env, key)


def prestart(env: dict) -> None:
    """Start a server for ``env`` now, without waiting for it (e.g. beside a Ray head starting)."""
    key = import_env(env)
    if key not in _SERVERS and len(_SERVERS) < MAX_SERVERS:
        _start(env, key, wait=False)


def _start(env: dict, key: tuple, wait: bool = True) -> str | None:
    import subprocess
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="odin-fork-"), "s")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, os.path.join(here, "_forkserver.py"), path], env=dict(env),
                            cwd=os.path.dirname(here), stdout=subprocess.PIPE, start_new_session=True)
    _SERVERS[key] = (proc, path)
    return _ready(key) if wait else None


def _ready(key: tuple) -> str | None:
    """The server's socket once it said ``ready`` (None if it died first)."""
    proc, path = _SERVERS[key]
    if proc.stdout is not None:
        ok = proc.stdout.readline().strip() == b"ready"
        proc.stdout.close()
        proc.stdout = None
        if not ok:
            proc.kill()
    return path if proc.poll() is None else None


def stop_servers() -> None:
    import shutil

    for proc, path in _SERVERS.values():
        proc.kill()
        proc.wait()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    _SERVERS.clear()


def _eligible(args) -> bool:
    return (isinstance(args, (list, tuple)) and len(args) >= 2 and args[0] == sys.executable
            and args[1] in ("-m", "-c") and os.environ.get("ODIN_TEST_FORK", "1") != "0")


def run_command(args, *, cwd=None, env=None, capture_output=False, text=False, timeout=None, check=False):
    """``subprocess.run`` for a test's ``[sys.executable, -m|-c, …]`` command: through a fork server
    when one has (or can start with) this environment's import-time variables, else a subprocess.
    Forked, output is captured as text (the tests' only use); a timeout kills the command's group."""
    import subprocess

    env = dict(os.environ if env is None else env)
    path = _server_for(env) if _eligible(args) and capture_output and text else None
    if path is None:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
                              check=check)
    proc = _forked(path, args, cwd, env, subprocess.PIPE, subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    done = subprocess.CompletedProcess(list(args), proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def start_command(args, *, cwd=None, env=None, stdout=None, stderr=None, text=False, start_new_session=False):
    """``subprocess.Popen`` for a test's ``[sys.executable, -m|-c, …]`` command (see
    :func:`run_command`); the command always runs in its own session, as ``start_new_session=True``.
    ``stdout``/``stderr``: None (the test's), ``subprocess.DEVNULL`` or ``subprocess.PIPE``."""
    import subprocess

    env = dict(os.environ if env is None else env)
    path = _server_for(env) if _eligible(args) else None
    if path is None:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text,
                                start_new_session=start_new_session)
    return _forked(path, args, cwd, env, stdout, stderr, text)


# --------------------------------------------------------------------------- a Ray head's worker launcher
def launch_ray_worker(real_python: str, sock_path: str, argv: list[str]) -> None:
    """What a test head's raylet runs as "python" (``sys.executable`` when the head started; run as
    ``python -S``, so stdlib only). A worker process (``…/default_worker.py ARGS``) is forked by the
    head's worker server at ``sock_path`` with this process's fds, cwd, environment and argv, and
    this launcher stays as its stand-in: it passes SIGTERM, SIGINT, SIGHUP and SIGQUIT on, exits as
    the worker did, and the worker is killed if the launcher is. A worker whose job has a runtime
    environment (``setup_worker.py …``) of environment variables (the product forwards ``AWS_*``
    that way) and at most a working_dir (``cd DIR &&``, a PYTHONPATH entry) gets them here, as
    setup_worker would do them (:func:`_setup_worker`). Anything else — the head's own Python
    processes, any other runtime environment, any worker while the server is not up, or whose
    import-time variables differ from the server's, or whose PYTHONPATH would shadow a module the
    server imported — is a plain ``exec`` of Python. The first worker launch starts the server
    (once: a lock file beside the socket)."""

    def plain() -> None:
        os.execv(real_python, [real_python, *argv])

    if os.environ.get("ODIN_TEST_FORK", "1") == "0" or not argv:
        plain()
    worker_argv = argv
    if argv[0].endswith("/setup_worker.py"):  # a job with a runtime environment: do what setup_worker does
        worker_argv = _setup_worker(argv[1:], real_python)
        if worker_argv is None:
            plain()
    if not worker_argv[0].endswith("/default_worker.py"):
        plain()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sock_path)
    except OSError:
        sock.close()
        _start_worker_server(real_python, sock_path, argv)
        plain()
    request = json.dumps({"argv": worker_argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode() + b"\n"
    try:
        socket.send_fds(sock, [request], [0, 1, 2])
        reader = sock.makefile("rb")
        reply = json.loads(reader.readline() or b"{}")
    except (OSError, ValueError):
        reply = {}
    if "pid" not in reply:
        sock.close()
        plain()
    pid = int(reply["pid"])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda s, _frame: os.kill(pid, s))
    try:
        rc = int(json.loads(reader.readline() or b'{"rc": -9}')["rc"])
    except (OSError, ValueError, KeyError):
        rc = -9
    if rc < 0:  # killed by a signal: end the same way
        if -rc != signal.SIGKILL:
            signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
    os._exit(rc & 0xFF)


def _setup_worker(args: list[str], real_python: str) -> list[str] | None:
    """What Ray's ``setup_worker.py ARGS`` does before it execs the worker, for a runtime environment
    of environment variables and at most a working_dir's ``cd DIR &&`` (``RuntimeEnvContext.exec_worker``:
    ``update_envs``, then ``cd DIR && exec python REMAINING``): do them here and return REMAINING, the
    worker's argv. None for anything else (another command prefix, another Python, another
    language): run setup_worker itself."""
    import re

    context, language, rest, i = None, None, [], 0
    while i < len(args):
        arg = args[i]
        for name in ("--serialized-runtime-env-context", "--language"):
            if arg == name and i + 1 < len(args):
                value, i = args[i + 1], i + 1
                break
            if arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
                break
        else:
            rest.append(arg)
            i += 1
            continue
        if name == "--language":
            language = value
        else:
            context = value
        i += 1
    try:
        ctx = json.loads(context or "{}")
    except ValueError:
        return None
    prefix = ctx.get("command_prefix") or []
    cd = len(prefix) == 3 and prefix[0] == "cd" and prefix[2] == "&&"  # a working_dir: `cd DIR && exec python …`
    if (language != "PYTHON" or not rest or (prefix and not cd) or ctx.get("override_worker_entrypoint")
            or ctx.get("java_jars") or ctx.get("py_executable") not in (None, real_python)):
        return None
    if cd:
        import shlex

        folder = shlex.split(prefix[1])
        if len(folder) != 1 or not os.path.isdir(folder[0]):
            return None
        os.chdir(folder[0])
    for key, value in (ctx.get("env_vars") or {}).items():  # ray._private.utils.update_envs
        os.environ[key] = re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(value))
    return rest


def _start_worker_server(real_python: str, sock_path: str, argv: list[str]) -> None:
    """Start the worker server for ``sock_path`` in the background (double fork, its own session),
    unless one was started already. Its command line names the head's ``--temp-dir``, so the tests'
    head stop finds it."""
    try:
        os.close(os.open(sock_path + ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        return
    temp_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("--temp-dir=")), "")
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDWR)
                log = os.open(sock_path + ".log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
                os.dup2(null, 0), os.dup2(null, 1), os.dup2(log, 2)
                os.execv(real_python, [real_python, os.path.abspath(__file__), "--ray-workers", sock_path,
                                       f"--head-temp-dir={temp_dir}"])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def ray_start_with_launcher(launcher: str, real_python: str = sys.executable) -> list[str]:
    """The command prefix for ``ray start …`` with ``launcher`` as the Python the head starts its
    processes with (``sys.executable`` when Ray builds the raylet's worker command)."""
    code = f"import sys; sys.executable = {launcher!r}; from ray.scripts.scripts import main; main()"
    return [real_python, "-c", code]


def write_worker_launcher(directory: str, real_python: str = sys.executable) -> tuple[str, str]:
    """Write an executable launcher into ``directory`` (its socket gets its own short-named folder):
    start a head with ``sys.executable`` set to it. Returns ``(launcher path, socket path)``. The
    launcher is a ``/bin/sh`` script that execs ``python -S launcher.py`` (a shebang naming the
    virtualenv's Python could pass the kernel's length limit in a deep checkout)."""
    import shlex
    import tempfile

    sock_path = os.path.join(tempfile.mkdtemp(prefix="odin-w-"), "s")  # short: Unix socket paths ≤ 107 bytes
    here = os.path.dirname(os.path.abspath(__file__))
    code = os.path.join(directory, "launcher.py")
    with open(code, "w") as fh:
        fh.write(f"import sys\nsys.path.insert(0, {here!r})\nimport _forkserver\n"
                 f"_forkserver.launch_ray_worker({real_python!r}, {sock_path!r}, sys.argv[1:])\n")
    path = os.path.join(directory, "python")
    with open(path, "w") as fh:
        fh.write(f'#!/bin/sh\nexec {shlex.quote(real_python)} -S {shlex.quote(code)} "$@"\n')
    os.chmod(path, 0o755)
    return path, sock_path


if __name__ == "__main__":
    if sys.argv[1] == "--ray-workers":
        serve(sys.argv[2], ray_workers=True)
    else:
        serve(sys.argv[1])
