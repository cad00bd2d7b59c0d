"""Where Ray's own output goes: the console, or the Ray session's log files.

Three console modes (``--quiet``, default, ``--verbose``), chosen once per process by
:func:`route` before ``ray.init``:

=============  =====================================================================================
``verbose``    everything Ray prints, as Ray prints it: its INFO/WARNING lines, Ray Data's progress
               (bars on a TTY, periodic blocks without one), worker output, C++ log lines
``normal``     the tool's own lines (one per stage, a scoring progress line at most every 30 s
               without a TTY) and the result. Ray's INFO and WARNING lines, Ray Data's progress
               blocks, Python warnings raised inside Ray and the core worker's notices go to the
               session's log files (:data:`DRIVER_LOG` and Ray Data's own ``ray-data/``); Ray's
               ERROR lines stay on the console. On a TTY Ray Data's progress bars stay.
``quiet``      only the one-line result and the tool's errors; every Ray line goes to the logs
=============  =====================================================================================

Nothing is dropped: what leaves the console is written to ``<session>/logs/odin-driver-<pid>.log``
(the driver's Ray lines; Ray Data keeps ``logs/ray-data/``, the C++ core worker
``python-core-driver-*.log``, workers ``worker-*.out|err``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings

MODES = ("quiet", "normal", "verbose")
DRIVER_LOG = "odin-driver-{pid}.log"

# A line of Ray's C++ logger: "[2026-12-04 22:18:28,780 E 10021 10021] core_worker.cc:2465: ..."
_CPP_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([DIWEF]) \d+ \d+\] \S+:\d+: ")
# C++ ERROR lines that ask nothing of the user, with why each one is harmless here:
BENIGN_CPP_ERRORS = (
    # Ray Data creates every pool actor with two driver-owned ObjectRefs (its DataContext and the
    # fused map function with our constructor kwargs, jobs.pipeline). The executor holds both refs
    # for the whole run and their primary copies live in the driver's node, so a restart after a
    # worker node's loss can always fetch them; Ray prints this line for any by-reference argument.
    "has constructor arguments in the object store and max_restarts > 0",
)

_mode = "normal"
_log: "_SessionLog | None" = None


def mode() -> str:
    """The console mode :func:`route` set for this process (``normal`` before any call)."""
    return _mode


def console_mode(quiet: bool = False, verbose: bool = False) -> str:
    """``--quiet`` / ``--verbose`` flags → a mode (``--verbose`` wins: it is the debugging switch)."""
    return "verbose" if verbose else "quiet" if quiet else "normal"


def progress_bars() -> bool:
    """Ray Data's progress output on: bars on a TTY (not under ``--quiet``); without a TTY its
    periodic blocks, which go to Ray Data's log file (to the console too under ``--verbose``)."""
    return _mode != "quiet" or not sys.stdout.isatty()


class _SessionLog(logging.Handler):
    """The driver's Ray lines, written to ``<session>/logs/odin-driver-<pid>.log`` once the Ray
    session exists (:meth:`open`); buffered until then (e.g. lines logged while ``ray.init`` runs)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        from ray._private import ray_constants

        self.setFormatter(logging.Formatter(ray_constants.LOGGER_FORMAT))
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._file = None
        self.path: str | None = None

    def open(self, logs_dir: str) -> str:
        path = os.path.join(logs_dir, DRIVER_LOG.format(pid=os.getpid()))
        with self._lock:
            if self._file is None:
                os.makedirs(logs_dir, exist_ok=True)
                self._file = open(path, "a", buffering=1, encoding="utf-8")
                self._file.writelines(line + "\n" for line in self._pending)
                self._pending.clear()
                self.path = path
        return self.path

    def write(self, text: str) -> None:
        with self._lock:
            if self._file is None:
                self._pending.append(text)
            else:
                self._file.write(text + "\n")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def route(mode_: str) -> None:
    """Send Ray's console output where ``mode_`` says (see the module docstring); call before ``ray.init``.

    Idempotent. ``verbose`` changes nothing. The others lower Ray's console handlers (``ray`` and
    ``ray.data`` loggers) to ERROR (``normal``) or nothing (``quiet``), add the session-log
    handler, and send Python warnings raised inside Ray there.
    """
    global _mode, _log
    if mode_ not in MODES:
        raise ValueError(f"console mode must be one of {MODES}; got {mode_!r}")
    _mode = mode_
    if mode_ == "verbose" or _log is not None:
        return
    import ray.data  # noqa: F401 - configures the "ray.data" logger: console handler + session log file

    _log = _SessionLog()
    console_level = logging.ERROR if mode_ == "normal" else logging.CRITICAL + 1
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(console_level)  # the console; Ray Data's SessionFileHandler keeps INFO
    logging.getLogger("ray").addHandler(_log)  # ray.data keeps its own file (logs/ray-data/)
    _route_warnings()
    if mode_ == "quiet":
        _route_cluster_errors()


def _route_warnings() -> None:
    """Python warnings raised inside Ray's package go to the session log, others to stderr as usual."""
    import ray

    ray_dir = os.path.dirname(ray.__file__) + os.sep
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(ray_dir) and _log is not None:
            _log.write(f"{category.__name__} {filename}:{lineno}: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _route_cluster_errors() -> None:
    """``--quiet``: the cluster's error messages for this job (e.g. a worker that died, traceback
    included), which the driver prints to stdout itself whatever ``log_to_driver`` says, go to
    the session log. The tool reports what fails the command in its own line."""
    from ray._private import worker as ray_worker

    def to_log(data, ignore_prefix):  # noqa: ARG001 - the signature Ray calls
        if _log is not None:
            _log.write(f"(ray {data.get('pid')}) " + "\n".join(data.get("lines", [])))

    ray_worker.print_to_stdstream = to_log


def open_session_log() -> str | None:
    """After ``ray.init``: open the driver log in the session's ``logs/`` directory; return the directory."""
    logs = session_logs_dir()
    if logs and _log is not None:
        try:
            _log.open(logs)
        except OSError:
            return logs
    return logs


def session_logs_dir() -> str | None:
    """``<session>/logs`` of the Ray session this process joined (on this node), or None."""
    try:
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - Ray Client sessions have no local node
        return None


def driver_log() -> str | None:
    return _log.path if _log is not None else None


@contextlib.contextmanager
def routed_stderr():
    """While the block runs, C++ log lines on file descriptor 2 that ask nothing of the user go to
    the session log (``normal``: INFO/WARNING lines and :data:`BENIGN_CPP_ERRORS`; ``quiet``: every
    C++ line); every other byte reaches stderr unchanged. No-op under ``verbose``.

    The core worker writes those lines to fd 2 itself (its copy in ``python-core-driver-*.log``
    stays); Python's ``sys.stderr`` is not involved. Scoped to the Ray Data run: after it, fd 2
    is the original again (a traceback at exit must never wait on a pipe).
    """
    if _mode == "verbose" or _log is None:
        yield
        return
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    saved = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    thread = threading.Thread(target=_forward, args=(read_fd, saved), name="odin-stderr-router", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end held by fd 2: the reader sees EOF
        thread.join(timeout=10)
        if not thread.is_alive():  # else a process started meanwhile holds the pipe: the reader keeps `saved`
            os.close(saved)


def _keep_on_console(line: str) -> bool:
    m = _CPP_LINE.match(line)
    if not m:
        return True
    if _mode == "quiet" or m.group(1) in "DIW":
        return False
    return not any(text in line for text in BENIGN_CPP_ERRORS)


def _forward(read_fd: int, out_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                _route_line(raw + b"\n", out_fd)
        if pending:
            _route_line(pending, out_fd)


def _route_line(raw: bytes, out_fd: int) -> None:
    text = raw.decode("utf-8", "replace").rstrip("\n")
    if _keep_on_console(text):
        try:
            os.write(out_fd, raw)
        except OSError:  # the console is gone: nothing else to do with the line
            pass
    elif _log is not None:
        _log.write(text)
