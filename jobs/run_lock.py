"""One writer per output directory: a lease file whose liveness never depends on another host's clock.

``<output>/_odin_lock.json`` is written when a run starts (score, audit, calibrate), rewritten
every ``heartbeat_s`` seconds while it runs, and deleted when it ends. Another run on the same
directory is refused (``ConfigError``, exit 2, nothing written) while the lease is *live*:

* **same host, holder's pid given**: live while that process exists (and, where ``/proc`` tells,
  is the same process: its start time is recorded). Its heartbeat is not looked at: a live run
  whose clock jumped or whose heartbeat thread was paused is never taken over;
* **otherwise** (another host, or an empty or unreadable lease): live while the lease file's
  *modification time as stamped by the store* is younger than ``stale_s`` — measured against a
  probe file the reader writes next to it and deletes again, so both times come from one clock
  (the object store's or the NFS server's; the local kernel's on a local disk). The timestamp
  written inside the lease is for people only. A lease written by a host whose clock runs an
  hour ahead therefore stops blocking ``stale_s`` after its holder's last write, and a 0-byte
  lease left by a full disk expires like a dead holder's.

Ownership: each run has a random ``owner`` id. A heartbeat first reads the lease and writes only
if it is still its own; if another run took it over, the heartbeat stops and :meth:`RunLock.check_held`
raises :class:`LeaseLost`, which the commands call before each stage that writes. ``release``
deletes the lease only when it is its own.

Object stores have no exclusive create: a lease is taken by write, short wait, read back (the last
writer wins); two drivers starting within that wait can both proceed, and the score job's final
exactly-once check reports what they did. On local disks the lease file is created with O_EXCL.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from pyarrow import fs as pafs

from odin_engine.errors import ConfigError
from odin_engine.io.store import ensure_folder

LOCK_FILE = "_odin_lock.json"


class LeaseLost(RuntimeError):
    """Another run took over this run's lease: it must stop before its next write."""


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class RunLock:
    """``with RunLock(fs, directory): …`` holds the lease on ``directory`` for the block."""

    def __init__(self, filesystem: pafs.FileSystem, directory: str, *, stale_s: float = 120.0,
                 heartbeat_s: float = 30.0, settle_s: float = 0.5, display: str | None = None):
        self.fs, self.dir = filesystem, directory.rstrip("/")
        self.path = f"{self.dir}/{LOCK_FILE}"
        self.display = display or self.dir
        self.stale_s, self.heartbeat_s, self.settle_s = stale_s, heartbeat_s, settle_s
        self.owner = uuid.uuid4().hex
        self.beats = 0
        self.lost_to: dict | None = None  # the lease found in our place, once taken over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = isinstance(filesystem, pafs.LocalFileSystem)

    # ------------------------------------------------------------------ lease file
    def _record(self) -> dict:
        now = time.time()
        pid = os.getpid()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid),
                "beat": self.beats, "heartbeat": now,
                "heartbeat_utc": datetime.fromtimestamp(now, timezone.utc).isoformat()}

    def read(self) -> dict | None:
        """The lease record; ``{}`` for an empty or unreadable lease; None when there is none."""
        try:
            with self.fs.open_input_stream(self.path) as fh:
                doc = json.loads(fh.read().decode())
            return doc if isinstance(doc, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written, or left empty by a full disk: live or stale by its mtime

    def _write(self) -> None:
        data = (json.dumps(self._record()) + "\n").encode()
        if self._local:
            tmp = f"{self.path}.{self.owner}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            with self.fs.open_output_stream(self.path) as fh:
                fh.write(data)

    def age(self) -> float | None:
        """Seconds since the lease file was last written, by the store's clock (None: no lease)."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound or info.mtime is None:
            return None
        probe = f"{self.dir}/.{LOCK_FILE}.clock-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(probe) as fh:
                fh.write(b"")
            now = self.fs.get_file_info(probe).mtime
        except OSError:  # cannot write a probe (full disk, read-only): fall back to this host's clock
            now = None
        finally:
            try:
                self.fs.delete_file(probe)
            except OSError:
                pass
        if now is None:
            return time.time() - info.mtime.timestamp()
        return (now - info.mtime).total_seconds()

    def is_live(self, held: dict) -> bool:
        """See the module docstring: a live pid on this host, else the lease file's age by the store's clock."""
        pid = held.get("pid")
        if held.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
            if not _pid_exists(pid):
                return False
            start = held.get("pid_start")
            return start is None or _pid_start(pid) in (None, start)  # a reused pid is another process
        age = self.age()
        return age is not None and age < self.stale_s

    def check_free(self) -> dict | None:
        """Raise ``ConfigError`` if ``directory`` is a file or another run holds a live lease (writes
        nothing but the clock probe next to a lease of another host); else the lease record found
        (a dead holder's), or None."""
        in_the_way = self._file_in_the_way()
        if in_the_way is not None:
            what = "is a file" if in_the_way == self.dir else f"cannot be a directory: {in_the_way!r} is a file"
            raise ConfigError(f"{self.display!r} {what}, not a directory: --output needs a directory "
                              "(a new one, or an earlier run's to resume it)")
        held = self.read()
        if held is not None and held.get("owner") != self.owner and self.is_live(held):
            raise self._refuse(held)
        return held

    def _file_in_the_way(self) -> str | None:
        """The directory itself or its nearest existing ancestor, when that is a file (else None)."""
        path = self.dir
        while path and path not in ("/", "."):
            kind = self.fs.get_file_info(path).type
            if kind != pafs.FileType.NotFound:
                return path if kind == pafs.FileType.File else None
            path = posixpath.dirname(path)
        return None

    def _refuse(self, held: dict) -> ConfigError:
        same_host = held.get("host") == socket.gethostname()
        why = (f"host {held.get('host')}, pid {held.get('pid')}, which is running" if same_host and held.get("pid")
               else f"host {held.get('host', '?')}, pid {held.get('pid', '?')}; lease written "
                    f"{self.age() or 0:.0f}s ago by the store's clock")
        return ConfigError(
            f"{self.display!r} is being written by another run ({why}). Wait for it to finish, or stop it "
            f"(`ray job stop`, or kill its driver); a lease of a holder that died expires when its pid is gone "
            f"(same host) or {self.stale_s:.0f}s after its last heartbeat by the store's clock, or delete "
            f"{self.path} if you are sure no run is writing there."
        )

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        held = self.check_free()
        ensure_folder(self.fs, self.dir)
        if self._local and held is None:
            try:  # atomic on a local disk: exactly one of two racing drivers creates it
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
            except FileExistsError:
                held = self.read()
                if held is not None and self.is_live(held):
                    raise self._refuse(held) from None
        try:
            self._write()
        except OSError:
            self._drop_if_empty()
            raise
        if not self._local:  # object stores: the last writer wins; read back after a pause
            time.sleep(self.settle_s)
            now_held = self.read()
            if now_held is None or now_held.get("owner") != self.owner:
                raise self._refuse(now_held or {})
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="odin-run-lock", daemon=True)
        self._thread.start()

    def _drop_if_empty(self) -> None:
        """A lease this run created but could not write (full disk) must not lock the directory."""
        try:
            if self.fs.get_file_info(self.path).size == 0:
                self.fs.delete_file(self.path)
        except OSError:
            pass

    def heartbeat(self) -> bool:
        """Rewrite the lease if it is still ours; False (and :attr:`lost_to` set) if another run holds it."""
        held = self.read()
        if held is not None and held.get("owner") not in (self.owner, None):
            self.lost_to = held
            return False
        self.beats += 1
        self._write()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.heartbeat():
                    return
            except OSError:
                pass  # a missed heartbeat only shortens the lease; the next one retries

    def check_held(self) -> None:
        """Raise :class:`LeaseLost` if another run took this run's lease over (call before a write)."""
        if self.lost_to is None and self._thread is not None:
            held = self.read()
            if held is not None and held.get("owner") not in (self.owner, None):
                self.lost_to = held
        if self.lost_to is not None:
            h = self.lost_to
            raise LeaseLost(f"{self.display!r}: another run (host {h.get('host')}, pid {h.get('pid')}) took over "
                            "this run's lease; this run stopped before its next write (the other run resumes "
                            "what this one left)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        held = self.read()
        if held is not None and held.get("owner") == self.owner:
            try:
                self.fs.delete_file(self.path)
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
