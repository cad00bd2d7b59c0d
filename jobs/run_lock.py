"""One writer per output directory: a lease file with the holder's host, pid and a heartbeat.

``<output>/_odin_lock.json`` is written when a score run starts, rewritten every
``heartbeat_s`` seconds while it runs, and deleted when it ends. Another run on the same
directory is refused (``ConfigError``, exit 2, nothing written) while the lease is *live*:

    live = heartbeat younger than ``stale_s``  and  (another host, or the holder's pid exists)

so a driver killed with SIGKILL does not block a rerun on the same host, and one that died on
another host blocks it for at most ``stale_s``. Best effort on object stores: a lease is taken
by write, short wait, read back (the last writer wins); two drivers starting within that wait of
each other can both proceed, and the job's final exactly-once check reports what they did.
On local disks the lease file is created with O_EXCL.
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

LOCK_FILE = "_odin_lock.json"


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


class RunLock:
    """``with RunLock(fs, directory): …`` holds the lease on ``directory`` for the block."""

    def __init__(self, filesystem: pafs.FileSystem, directory: str, *, stale_s: float = 120.0,
                 heartbeat_s: float = 30.0, settle_s: float = 0.5, display: str | None = None):
        self.fs, self.dir = filesystem, directory.rstrip("/")
        self.path = f"{self.dir}/{LOCK_FILE}"
        self.display = display or self.dir
        self.stale_s, self.heartbeat_s, self.settle_s = stale_s, heartbeat_s, settle_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = isinstance(filesystem, pafs.LocalFileSystem)

    # ------------------------------------------------------------------ lease file
    def _record(self) -> dict:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": now, "heartbeat_utc": datetime.fromtimestamp(now, timezone.utc).isoformat()}

    def read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as fh:
                return json.loads(fh.read().decode())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # unreadable or half-written: treat as held, its writer is alive and rewriting it
            return {"owner": "?", "host": "?", "pid": -1, "heartbeat": time.time()}

    def _write(self) -> None:
        data = (json.dumps(self._record()) + "\n").encode()
        if self._local:
            tmp = f"{self.path}.{self.owner}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as fh:
                fh.write(data)

    def is_live(self, held: dict) -> bool:
        if time.time() - float(held.get("heartbeat", 0)) >= self.stale_s:
            return False
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and held["pid"] > 0:
            return _pid_exists(held["pid"])
        return True

    def check_free(self) -> dict | None:
        """Raise ``ConfigError`` if ``directory`` is a file or another run holds a live lease (writes
        nothing); else the lease record found (a dead holder's), or None."""
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
        age = time.time() - float(held.get("heartbeat", 0))
        return ConfigError(
            f"{self.display!r} is being written by another score run (host {held.get('host')}, pid "
            f"{held.get('pid')}, last heartbeat {age:.0f}s ago). Wait for it to finish, or stop it "
            f"(`ray job stop`); a lease whose holder died expires {self.stale_s:.0f}s after its last "
            f"heartbeat, or delete {self.path} if you are sure no run is writing there."
        )

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        held = self.check_free()
        self.fs.create_dir(self.dir, recursive=True)
        if self._local and held is None:
            try:  # atomic on a local disk: exactly one of two racing drivers creates it
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
            except FileExistsError:
                held = self.read()
                if held is not None and self.is_live(held):
                    raise self._refuse(held) from None
        self._write()
        if not self._local:  # object stores: the last writer wins; read back after a pause
            time.sleep(self.settle_s)
            now_held = self.read()
            if now_held is None or now_held.get("owner") != self.owner:
                raise self._refuse(now_held or {"host": "?", "pid": "?", "heartbeat": time.time()})
        self._thread = threading.Thread(target=self._beat, name="odin-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except OSError:
                pass  # a missed heartbeat only shortens the lease; the next one retries

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
