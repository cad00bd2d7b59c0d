"""Where outputs live: one location (local path, ``file://``, ``s3://``, ``gs://``) over ``pyarrow.fs``.

Every command reads and writes its outputs through a :class:`Store`: join, exists, list, read,
and atomic writes (write-then-rename on local disks; a single PUT on object stores, which is
atomic there). Filesystems come from ``pyarrow.fs.FileSystem.from_uri`` (S3 honours the usual
``AWS_*`` variables, including ``AWS_ENDPOINT_URL``; GCS uses Google's default credentials, or
with ``STORAGE_EMULATOR_HOST`` set — the variable Google's own clients read — that emulator,
anonymously).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import time
import uuid
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError


#: reads of a JSON file on an object store that was cut by a concurrent overwrite (see ``Store.read_json``)
TORN_READ_ATTEMPTS = 6


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
    # S3: a file opens when its first bytes go out (allow_delayed_open), so a file smaller than a
    # part is one PutObject instead of a multipart upload's three requests; an error shows at the
    # write or the close, inside the same `with` block
    query = "?allow_delayed_open=true" if scheme == "s3" else ""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}{query}")[0]


def ensure_folder(fs: pafs.FileSystem, path: str) -> None:
    """Create the folder ``path`` and its parents before a file is written there, except on S3, whose
    "folders" are key prefixes (creating one writes marker objects: a HEAD and a PUT per level).
    pyarrow's GCS filesystem keeps its folders as marker objects and fails to delete a folder that
    has none, so GCS (like a local disk) gets them."""
    if fs.type_name != "s3":
        fs.create_dir(path, recursive=True)


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
    """One output location (local path, ``file://``, ``s3://``, ``gs://``) over ``pyarrow.fs``.

    ``p(*parts)`` is a path inside ``fs``, ``uri(*parts)`` its user-facing form, ``join(*parts)``
    a Store for a sub-folder. Writes are atomic per file: write-then-rename on local disks; a
    single PUT (or a multipart upload, which becomes visible only when complete) on object stores.
    Nothing is created locally for an object-store root.
    """

    def __init__(self, root: str):
        root = str(root)
        self.root_uri = root.rstrip("/") if root != "/" else root
        self.fs, self.path = resolve(self.root_uri)

    def __repr__(self) -> str:
        return f"Store({self.root_uri!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def uri(self, *parts: str) -> str:
        if self.is_local:
            return self.p(*parts)
        return f"{self.root_uri.split('://', 1)[0]}://{self.p(*parts)}"

    @classmethod
    def on(cls, fs: pafs.FileSystem, path: str, root_uri: str | None = None) -> "Store":
        """A Store for ``path`` inside an already open ``fs`` (``root_uri``: its user-facing form;
        by default the path on a local disk, ``<fs.type_name>://<path>`` elsewhere, e.g. ``s3://…``)."""
        store = object.__new__(cls)
        local = isinstance(fs, pafs.LocalFileSystem)
        store.root_uri, store.fs, store.path = root_uri or (path if local else f"{fs.type_name}://{path}"), fs, path
        return store

    def join(self, *parts: str) -> "Store":
        """A Store for ``<root>/<parts…>`` on the same filesystem."""
        return Store.on(self.fs, self.p(*parts), self.uri(*parts))

    # ---------------------------------------------------------------- look
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.p(*parts)).type != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.p(*parts)).type == pafs.FileType.File

    def listdir(self, *parts: str, recursive: bool = False) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.p(*parts), recursive=recursive, allow_not_found=True)
        return [i for i in self.fs.get_file_info(sel)]

    # ---------------------------------------------------------------- read
    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.p(name)) as fh:
            return fh.read()

    def read_text(self, name: str) -> str | None:
        return self.read_bytes(name).decode("utf-8") if self.is_file(name) else None

    def read_json(self, name: str) -> dict | None:
        """``<root>/<name>`` parsed; None when there is no such file.

        On an object store a read can race an overwrite of the same key (``current.json`` while a
        run publishes): pyarrow reads with a HEAD (the size) then a ranged GET, so the reader can get
        the *newer* object cut to the older one's length (a store may also answer 404 in between;
        moto has). A cut JSON object never parses (its closing brace is gone), so such a read is
        retried, up to :data:`TORN_READ_ATTEMPTS` times; a file that still does not parse raises
        ``ValueError``. Local files are replaced by rename and are read once. The file is read first
        and looked for only when that fails: a HEAD less per read of a file that is there.
        """
        from odin_engine.io.reading import backoff_s

        attempt = 1
        while True:
            try:
                return json.loads(self.read_bytes(name).decode())
            except (ValueError, FileNotFoundError) as exc:
                if isinstance(exc, FileNotFoundError) and not self.exists(name):
                    return None
                if self.is_local or attempt >= TORN_READ_ATTEMPTS:
                    raise
            time.sleep(backoff_s(attempt, base=0.1))  # ~0.1 s, 0.2 s, … (jittered): the overwrite's PUT completes
            attempt += 1

    # ---------------------------------------------------------------- write (atomic per file)
    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``data`` to ``<root>/<name>`` atomically; returns its URI."""
        target = self.p(name)
        ensure_folder(self.fs, posixpath.dirname(target))
        if self.is_local:
            tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
            try:
                with self.fs.open_output_stream(tmp) as fh:
                    fh.write(data)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            with self.fs.open_output_stream(target) as fh:
                fh.write(data)
        return self.uri(name)

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: dict) -> str:
        return self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())

    def write_parquet(self, name: str, table: pa.Table, **kwargs) -> str:
        """One Parquet file, atomically (``kwargs`` go to ``pyarrow.parquet.write_table``)."""
        import pyarrow.parquet as pq

        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, **kwargs)
        return self.write_bytes(name, buf.getvalue().to_pybytes())

    @contextlib.contextmanager
    def parquet_writer(self, name: str, schema: pa.Schema, **kwargs):
        """A ``pyarrow.parquet.ParquetWriter`` for ``<root>/<name>``, streamed batch by batch and
        published atomically when the block ends without error (local: temp file + rename; object
        stores: the upload completes on close). On error the partial file is removed."""
        import pyarrow.parquet as pq

        target = self.p(name)
        ensure_folder(self.fs, posixpath.dirname(target))
        tmp = (posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
               if self.is_local else target)
        sink = self.fs.open_output_stream(tmp)
        writer = pq.ParquetWriter(sink, schema, **kwargs)
        try:
            yield writer
        except BaseException:
            writer.close()
            sink.close()
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise
        writer.close()
        sink.close()
        if self.is_local:
            os.replace(tmp, target)

    def delete(self, *parts: str) -> None:
        """Remove a file or a folder (recursively); a missing one is fine."""
        info = self.fs.get_file_info(self.p(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)


def _json_default(o):
    """numpy scalars and arrays as plain JSON; anything else as its ``str``."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
