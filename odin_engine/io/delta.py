"""Delta Lake tables over ``pyarrow.fs`` filesystems: open one, list a version's files, commit files.

The score job's ``<output>/scores/`` is a Delta table (docs/table-formats.md): its Ray tasks write
plain Parquet files under the table's folder, and the driver commits them with one Delta version
(:func:`commit`: add actions for the new files, remove actions for the replaced ones), so a reader
sees a night whole or not at all. Everything goes through delta-rs (``deltalake``): this module
only turns pyarrow's view (a filesystem, a path, a written file's footer) into delta-rs's (a URI,
storage options, an ``AddAction`` with statistics).

The table's settings (the score files' ``odin.*`` Parquet metadata: model, T, ε, fit digest) are
kept in the table's ``description`` as JSON, since delta-rs rejects custom keys in the table
configuration and a compaction rewrites files without their Arrow metadata.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError

DELTA_LOG = "_delta_log"  # a folder holding it is a Delta Lake table
RUN_ID_KEY = "odin.run_id"  # commit metadata: the score run that wrote a version (time travel by run)
ATTEMPT_KEY = "odin.attempt"
STATS_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_string)  # min/max kept for these


def delta_type(t: pa.DataType) -> pa.DataType:
    """The type a Delta table stores for Arrow type ``t`` without loss or refusal: timestamps in µs
    (a time zone becomes UTC, the instant kept), ``float16`` → ``float32``, unsigned integers → the
    next wider signed type (``uint64`` → ``decimal128(20, 0)``), ``date64`` → ``date32``, times (of
    the day) and durations → ``int64`` microseconds, large/fixed/dictionary forms → their plain type,
    nested types element by element. delta-rs refuses float16, times and durations, and reads an
    unsigned column back as the signed type of the same width (255 → −1)."""
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_unsigned_integer(t):
        return {8: pa.int16(), 16: pa.int32(), 32: pa.int64()}.get(t.bit_width, pa.decimal128(20, 0))
    if pa.types.is_date64(t):
        return pa.date32()
    if pa.types.is_time(t) or pa.types.is_duration(t):
        return pa.int64()
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return pa.binary()
    if pa.types.is_dictionary(t):
        return delta_type(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(delta_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(delta_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(delta_type(t.key_type), t.item_field.with_type(delta_type(t.item_type)))
    return t


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every field's type as :func:`delta_type` maps it (metadata kept)."""
    return pa.schema([f.with_type(delta_type(f.type)) for f in schema], metadata=schema.metadata)


def to_delta_types(column: pa.Array, target: pa.DataType) -> pa.Array:
    """``column`` cast to ``target`` (from :func:`delta_type`): times and durations as integer
    microseconds, timestamps truncated to µs (``safe=False``: Delta keeps no finer unit)."""
    if column.type == target:
        return column
    if pa.types.is_duration(column.type):
        return column.cast(pa.duration("us"), safe=False).view(pa.int64())
    if pa.types.is_time(column.type):
        return column.cast(pa.time64("us"), safe=False).view(pa.int64())
    return column.cast(target, safe=False)


def require_deltalake(what: str, source: str):
    """The ``deltalake`` module, or exit 2 naming the dependency."""
    try:
        import deltalake
    except ImportError as exc:
        raise ConfigError(f"the {what} at {source} are a Delta table: reading or writing it needs the "
                          "deltalake package (pip install 'deltalake>=1.6,<1.7', a dependency of odin-audit)") from exc
    return deltalake


def is_delta_table(fs: pafs.FileSystem, path: str) -> bool:
    """Whether the folder ``path`` is a Delta table: it has a ``_delta_log/`` folder."""
    return fs.get_file_info(posixpath.join(path, DELTA_LOG)).type == pafs.FileType.Directory


def storage_options(fs: pafs.FileSystem) -> dict[str, str] | None:
    """delta-rs's settings for the bucket ``fs`` reaches (it reads and writes the table's log;
    pyarrow reads and writes the data): the endpoint and region pyarrow resolved (from
    ``AWS_ENDPOINT_URL``/``AWS_REGION``…, taken from the filesystem's pickled options), keys only
    where pyarrow was given them; otherwise delta-rs reads the same ``AWS_*`` variables itself."""
    if not isinstance(fs, pafs.S3FileSystem):
        return None
    try:  # pyarrow has no public accessor for these; its pickling carries them as keyword arguments
        kw = dict(fs.__reduce__()[1][0])
    except (TypeError, IndexError, KeyError, ValueError):
        return None  # delta-rs reads the same AWS_* variables pyarrow did
    opts = {"AWS_REGION": fs.region} if fs.region else {}
    endpoint = kw.get("endpoint_override")
    if endpoint:
        if "://" not in endpoint:
            endpoint = f"{kw.get('scheme') or 'https'}://{endpoint}"
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    for key, name in (("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY"),
                      ("session_token", "AWS_SESSION_TOKEN")):
        if kw.get(key):
            opts[name] = kw[key]
    return opts


def table_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI delta-rs opens for ``path`` on ``fs`` (a local path, or ``s3://bucket/key``, ``gs://…``)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    if isinstance(fs, pafs.SubTreeFileSystem):
        return table_uri(fs.base_fs, posixpath.join(fs.base_path, path))
    return f"{fs.type_name.replace('gcs', 'gs')}://{path}"


@dataclass(frozen=True)
class DeltaLocation:
    """A Delta table's folder on a pyarrow filesystem."""

    fs: pafs.FileSystem
    path: str

    @property
    def uri(self) -> str:
        return table_uri(self.fs, self.path)

    def exists(self) -> bool:
        return is_delta_table(self.fs, self.path)

    def check_reachable(self, what: str = "table") -> None:
        """Exit 2 (``ConfigError``) when delta-rs, which writes the table's log with its own client
        and credentials, cannot reach this location on an object store — checked before a run
        writes anything, not at its commit after hours of scoring. Local folders pass."""
        if isinstance(self.fs, pafs.LocalFileSystem) or (
                isinstance(self.fs, pafs.SubTreeFileSystem) and isinstance(self.fs.base_fs, pafs.LocalFileSystem)):
            return
        deltalake = require_deltalake(what, self.uri)
        from deltalake.exceptions import DeltaError

        try:
            deltalake.DeltaTable.is_deltatable(self.uri, storage_options(self.fs))
        except (OSError, DeltaError) as exc:
            reason = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())[:400]  # delta-rs colours its text
            raise ConfigError(
                f"the {what} at {self.uri} is kept as a Delta table, whose log delta-rs writes with its own "
                f"client, and delta-rs cannot reach it: {reason}. Give delta-rs the bucket's credentials the way "
                "it reads them (AWS_* variables for s3://; GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS "
                "for gs://), or write this output with --table-format buckets (plain Parquet, no Delta log)") from None

    def open(self, version: int | None = None, what: str = "table"):
        """The ``DeltaTable`` (its current version, or ``version``); exit 2 when it cannot be read."""
        deltalake = require_deltalake(what, self.uri)
        from deltalake.exceptions import DeltaError

        try:
            return deltalake.DeltaTable(self.uri, version=version, storage_options=storage_options(self.fs))
        except DeltaError as exc:  # DeltaProtocolError (deletion vectors, column mapping…), TableNotFoundError…
            raise ConfigError(f"cannot read the Delta {what} at {self.uri}: {exc}") from exc

    def relative(self, path: str) -> str:
        """``path`` (on ``fs``) relative to the table's folder, as the log names files."""
        return posixpath.relpath(path.lstrip("/"), self.path.lstrip("/"))


def settings_of(table) -> dict[str, str]:
    """The ``odin.*`` settings the score job stored in the table's description ({} if none)."""
    try:
        doc = json.loads(table.metadata().description or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


@dataclass(frozen=True)
class FileRange:
    """A data file of a version with the range of one column's values it holds (None: unknown)."""

    path: str  # on the filesystem (not relative)
    lo: int | None
    hi: int | None
    rows: int | None = None
    size: int | None = None

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether the file may hold values in ``[lo, hi)``."""
        return (self.lo is None or self.lo < hi) and (self.hi is None or self.hi >= lo)


def version_files(loc: DeltaLocation, table, column: str) -> list[FileRange]:
    """The data files of ``table``'s version, each with its ``column`` min/max from the log's
    statistics (files without statistics always overlap)."""
    actions = pa.table(table.get_add_actions(flatten=True))
    names = actions.column_names
    lo = actions.column(f"min.{column}").to_pylist() if f"min.{column}" in names else [None] * actions.num_rows
    hi = actions.column(f"max.{column}").to_pylist() if f"max.{column}" in names else [None] * actions.num_rows
    rows = actions.column("num_records").to_pylist() if "num_records" in names else [None] * actions.num_rows
    return [FileRange(posixpath.join(loc.path, p), a, b, n, s) for p, a, b, n, s in
            zip(actions.column("path").to_pylist(), lo, hi, rows, actions.column("size_bytes").to_pylist())]


def file_entry(loc: DeltaLocation, path: str) -> dict[str, Any]:
    """What the log needs of a Parquet file written under the table (plain data, so a Ray task can
    return it): its path relative to the table, size, and the statistics readers use to skip
    files (``numRecords``; ``nullCount`` of every column; ``minValues``/``maxValues`` of integer,
    float and string columns), from the file's footer."""
    with loc.fs.open_input_file(path) as fh:  # its size from the open (one HEAD on an object store, not two)
        size = fh.size()
        meta = pq.ParquetFile(fh).metadata
    schema = meta.schema.to_arrow_schema()
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for i, field in enumerate(schema):
        stats = [meta.row_group(g).column(i).statistics for g in range(meta.num_row_groups)]
        if stats and all(s is not None and s.has_null_count for s in stats):
            nulls[field.name] = int(sum(s.null_count for s in stats))
        if stats and any(t(field.type) for t in STATS_TYPES) and all(s is not None and s.has_min_max for s in stats):
            mins[field.name] = min(s.min for s in stats)  # (an all-null column has none)
            maxs[field.name] = max(s.max for s in stats)
    stats_json = json.dumps({"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})
    return {"path": loc.relative(path), "size": int(size), "rows": meta.num_rows, "stats": stats_json}


def add_action(entry: Mapping[str, Any], now_ms: int | None = None):
    """The ``AddAction`` of a :func:`file_entry`."""
    from deltalake.transaction import AddAction

    return AddAction(entry["path"], entry["size"], {}, int(now_ms or time.time() * 1000), True, entry["stats"])


def remove_action(loc: DeltaLocation, path: str, size: int | None = None, now_ms: int | None = None):
    """The ``RemoveAction`` of a data file of the current version (``path`` on the filesystem)."""
    from deltalake.transaction import RemoveAction

    return RemoveAction(loc.relative(path), True, int(now_ms or time.time() * 1000), size, {})


def commit(loc: DeltaLocation, schema: pa.Schema, adds: Sequence, removes: Sequence = (),
           metadata: Mapping[str, str] | None = None, settings: Mapping[str, str] | None = None,
           base=None, replace: bool = False) -> int:
    """One Delta version adding ``adds`` and removing ``removes`` (created with its first files
    when the table does not exist yet, its description holding ``settings``); returns the new
    version. ``base``: the ``DeltaTable`` the removes were read from — delta-rs refuses the commit
    (``CommitFailedError``) if another writer removed those files since. ``replace``: the version
    is ``adds`` alone — delta-rs's overwrite writes a remove action for every file of the version it
    read, and the table's schema becomes ``schema`` (``removes`` must be empty)."""
    from deltalake import Schema
    from deltalake.transaction import CommitProperties, create_table_with_add_actions

    props = CommitProperties(custom_metadata=dict(metadata or {}))
    schema = schema.remove_metadata()
    if base is None and not loc.exists():
        if removes:
            raise ValueError("a new table has nothing to remove")
        create_table_with_add_actions(loc.uri, Schema.from_arrow(schema), list(adds), mode="error",
                                      description=json.dumps(dict(settings or {}), sort_keys=True),
                                      storage_options=storage_options(loc.fs), commit_properties=props)
        return 0
    if replace and removes:
        raise ValueError("a replacing commit removes every current file itself")
    table = base if base is not None else loc.open()
    table.create_write_transaction([*adds, *removes], mode="overwrite" if replace else "append", schema=schema,
                                   commit_properties=props)
    table.update_incremental()
    return int(table.version())
