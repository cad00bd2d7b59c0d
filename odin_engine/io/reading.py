"""Reading one object's bytes, with retries for transient failures (no Ray).

:func:`read_object` reads a local path, a percent-encoded ``file://`` URI (as the directory walk
gives for names that are not UTF-8), or an ``s3://`` / ``gs://`` URI. It retries **transient**
failures inside the run — network errors, timeouts, throttling, 5xx answers (see
:func:`is_transient`) — up to ``attempts`` times with exponential backoff and jitter:

    wait before attempt k+1 = min(max_backoff, backoff · 2^(k-1)) · U(0.5, 1.5)

(defaults 4 attempts, 0.25 s: about 1.75 s of waiting at most; pyarrow's S3 and GCS clients
retry underneath as well, for a few seconds per attempt). When the store is down for everyone —
:data:`FAILING_STREAK_LIMIT` objects in a row failed transiently in this process — each object is
tried once until one succeeds: the run finishes quickly with ``read failed`` rows, which the
rerun retries. A missing object, a denied one, or a bad URI is not transient within a run and
fails at once.

The one error it raises is :class:`ReadError`; ``str(exc)`` is the row's error message:

* ``read failed: <Type>: <detail>`` (``… (after N attempts)`` when retried) — the object could not
  be read now (network, throttling, 5xx, timeout, permission denied, missing). **Retryable**: a
  rerun of the same command attempts it again.
* ``bad uri: …`` (unsupported scheme, empty path component), ``unreadable: …`` (EIO, …),
  ``file too large: …`` / ``not a regular file: …`` — deterministic verdicts, final.

The classification and the rerun contract live in :mod:`odin_engine.io.failures` (re-exported
here: :data:`RETRYABLE_PREFIXES`, :func:`is_retryable`, :func:`is_transient`).
"""

from __future__ import annotations

import os
import random
import stat
import time
import urllib.parse

from odin_engine.io.failures import RETRYABLE_PREFIXES, is_retryable, is_transient, path_text, read_failure

__all__ = ["RETRYABLE_PREFIXES", "ReadError", "backoff_s", "is_retryable", "is_transient", "read_object"]

READ_FAILED = "read failed: "
FAILING_STREAK_LIMIT = 8  # after this many objects in a row failed transiently, try each once until one succeeds
_failing_streak = 0  # per process


class ReadError(OSError):
    """Reading an object failed; ``str(exc)`` is the row's error message (see the module docstring)."""

    def __init__(self, message: str, transient: bool = False, attempts: int = 1):
        super().__init__(message)  # one argument: str(exc) is the message, errno None
        self.transient, self.attempts = transient, attempts

    @property
    def retryable(self) -> bool:
        return is_retryable(str(self))


def backoff_s(attempt: int, base: float = 0.25, cap: float = 4.0) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1, 2, …): ``min(cap, base·2^(attempt-1)) · U(0.5, 1.5)``."""
    return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return word
    return "special file"


def _check_size(n: int, max_bytes: int | None) -> None:
    if max_bytes is not None and n > max_bytes:
        raise ReadError(f"file too large: {n} bytes > {max_bytes}")


def _read_local(path: bytes, max_bytes: int | None) -> bytes:
    # O_NONBLOCK: opening a FIFO must not hang the reader; it is refused below
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadError(f"not a regular file: {path_text(path)} is a {_kind(st.st_mode)}")
        _check_size(st.st_size, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb", closefd=True) as fh:
        return fh.read()


def _read_store(uri: str, max_bytes: int | None) -> bytes:
    from odin_engine.io.listing import odd_key
    from odin_engine.io.store import split_uri

    why = odd_key(uri.split("://", 1)[1].partition("/")[2])
    if why:  # the client would normalise the key and read another object, or refuse it
        raise ReadError(f"bad uri: {path_text(uri)} has {why}, which the store client cannot read")
    fs, path = split_uri(uri)
    with fs.open_input_file(path) as fh:
        _check_size(fh.size(), max_bytes)
        return fh.read()


def _read_once(uri: str, max_bytes: int | None) -> bytes:
    if uri.startswith("file://"):  # RFC 8089: percent-encoded (names that are not UTF-8 come this way)
        return _read_local(urllib.parse.unquote_to_bytes(uri[len("file://"):]), max_bytes)
    if "://" not in uri:
        return _read_local(os.fsencode(os.path.expanduser(uri)), max_bytes)
    return _read_store(uri, max_bytes)


def read_object(uri: str, max_bytes: int | None = None, *, attempts: int = 4, backoff: float = 0.25,
                max_backoff: float = 4.0) -> bytes:
    """All bytes of ``uri``, retrying transient failures; raises :class:`ReadError` (see the module docstring)."""
    global _failing_streak
    attempts = 1 if _failing_streak >= FAILING_STREAK_LIMIT else max(1, int(attempts))
    for attempt in range(1, attempts + 1):
        try:
            data = _read_once(uri, max_bytes)
            _failing_streak = 0
            return data
        except ReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below; every failure becomes one ReadError
            transient = is_transient(exc)
            if not transient or attempt == attempts:
                _failing_streak = _failing_streak + 1 if transient else _failing_streak
                raise ReadError(read_failure(exc, attempt), transient, attempt) from None
            time.sleep(backoff_s(attempt, backoff, max_backoff))
    raise AssertionError("unreachable")
