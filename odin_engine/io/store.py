"""Where outputs live: one location (local path, ``file://``, ``s3://``, ``gs://``) over ``pyarrow.fs``.

Every command reads and writes its outputs through a :class:`Store`: join, exists, list, read,
and atomic writes (write-then-rename on local disks; a single PUT on object stores, which is
atomic there). Filesystems come from ``pyarrow.fs.FileSystem.from_uri`` (S3 honours the usual
``AWS_*`` variables, including ``AWS_ENDPOINT_URL``; GCS uses Google's default credentials, or
with ``STORAGE_EMULATOR_HOST`` set — the variable Google's own clients read — that emulator,
anonymously).
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError


def is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") if scheme in ("gs", "gcs") else None
    return _cached_filesystem(scheme, bucket, emulator)


@functools.lru_cache(maxsize=64)
def _cached_filesystem(scheme: str, bucket: str, gcs_emulator: str | None) -> pafs.FileSystem:
    if gcs_emulator:
        # pyarrow would still ask the (unreachable) metadata server for credentials: go anonymous
        emu_scheme, _, host = gcs_emulator.rpartition("://")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=emu_scheme or "http")
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a ``scheme://`` URI.

    Only ``scheme://bucket`` goes through ``FileSystem.from_uri`` (which rejects spaces and
    other characters that are legal in object keys); the key is used verbatim. Filesystems
    are cached per (scheme, bucket).
    """
    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    bucket = rest.split("/", 1)[0]
    return _filesystem(scheme, bucket), rest.rstrip("/") if rest != bucket + "/" else bucket


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """:func:`split_uri` with failures turned into ``ConfigError``."""
    try:
        return split_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot open {path!r}: {exc}") from exc


def to_uri(fs: pafs.FileSystem, path: str, like: str) -> str:
    """The user-facing form of ``path`` inside ``fs``: keep the scheme of ``like``."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = like.split("://", 1)[0]
    return f"{scheme}://{path}"


def read_bytes(uri: str) -> bytes:
    """All bytes of one file (local path or URI), transient failures retried. Raises ``OSError`` on failure."""
    from odin_engine.io.reading import read_object

    return read_object(uri)



class Store:
    """One output location (local path, ``file://``, ``s3://``, ``gs://``) over ``pyarrow.fs``."""

    def __init__(self, root: str):
        self.root_uri = root.rstrip("/") if root != "/" else root
        self.fs, self.path = resolve(self.root_uri)

    def p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def uri(self, *parts: str) -> str:
        if isinstance(self.fs, pafs.LocalFileSystem):
            return self.p(*parts)
        return f"{self.root_uri.split('://', 1)[0]}://{self.p(*parts)}"

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.p(*parts)).type != pafs.FileType.NotFound

    def listdir(self, *parts: str, recursive: bool = False) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.p(*parts), recursive=recursive, allow_not_found=True)
        return [i for i in self.fs.get_file_info(sel)]

    def read_json(self, name: str) -> dict | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self.p(name)) as fh:
            return json.loads(fh.read().decode())

    def write_json(self, name: str, obj: dict) -> None:
        """Write-then-rename (atomic on local disks; a single PUT on object stores)."""
        data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()
        self.fs.create_dir(self.path, recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = self.p(f".{name}.{uuid.uuid4().hex}.tmp")
            with self.fs.open_output_stream(tmp) as fh:
                fh.write(data)
            os.replace(tmp, self.p(name))
        else:
            with self.fs.open_output_stream(self.p(name)) as fh:
                fh.write(data)
