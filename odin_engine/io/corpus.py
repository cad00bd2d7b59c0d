"""Corpus listing: a directory tree or a manifest → listing rows, in independent units (no Ray).

A corpus source is

* a **directory** (local path, ``file://``, ``s3://bucket/prefix``, ``gs://bucket/prefix``):
  every image file below it, walked by :mod:`odin_engine.io.listing` (symlink rules, error
  entries, non-UTF-8 names); ``image_id`` is the path relative to the directory, with ``/``;
* a **manifest**, a ``.parquet`` or ``.csv`` file with a ``uri`` or ``path`` column and
  optional ``image_id``, ``label`` and ``split`` columns (carried to the output), and an
  optional ``version`` or ``etag`` column (the image's version, see below). Relative paths are
  resolved against the manifest's own directory; ``image_id`` defaults to the path relative to
  that directory (or the full URI when it lies elsewhere).

Listing rows have the columns of :func:`listing_schema`: ``image_id``, ``uri``, ``version``
(what identifies the bytes: ``size:mtime_ns``, or the manifest's ``version``/``etag``; null when
unknown), ``listing_error`` (non-null for an entry the walk met but cannot use — dangling or
looping symlinks, directory symlinks, unreadable entries: it becomes an error row without being
read) and the carried columns.

:func:`open_corpus` validates a source cheaply (its metadata, a manifest's schema, a directory's
top level) and cuts it into :class:`ListingUnit`\\ s: row-group ranges of a Parquet manifest,
the whole of a CSV manifest (read as a stream), the top-level files and each sub-prefix of a
directory. :func:`list_unit` streams one unit's rows in batches; the scoring job runs the units
as parallel tasks, so no process holds the whole listing. :func:`count_rows` counts a source
(or a manifest's split) in bounded memory. :func:`load_corpus` lists everything in this process
into one sorted table (small corpora, held-out sets, tuning).

Versions: a directory entry's version is its ``size:mtime_ns`` (pyarrow's ``FileInfo``: the
local stat, or an object's size and last-modified time). A manifest row's version is its
``version``/``etag`` column when it has one; otherwise local files are stat'ed while listing
(``size:mtime_ns``, null when missing) and object-store URIs get a null version (identified by
uri alone: give a ``version``/``etag`` column, or list the prefix as a directory, to detect
overwrites).

Problems the user must fix raise :class:`~odin_engine.errors.ConfigError`: missing source,
empty corpus, duplicate ids (all listed, up to 50), a manifest without a ``uri``/``path``
column or with empty cells. Files that later turn out unreadable are *not* an error here: they
become error rows.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError
from odin_engine.io.delta import delta_schema, to_delta_types
from odin_engine.io.store import is_uri, resolve

from odin_engine.io.failures import os_error_line
from odin_engine.io.listing import IMAGE_EXTENSIONS, Part, plan_split, pseudo_version, walk_part

MANIFEST_EXTENSIONS = (".parquet", ".pq", ".csv")
CARRIED_COLUMNS = ("label", "split")
LISTING_ERROR = "listing_error"  # why a listed entry cannot be read (a directory walk's error entry), else null
VERSION_COLUMNS = ("version", "etag")
BATCH_ROWS = 65536  # rows per listing batch (a listing task's working set)
UNIT_ROWS = 1 << 20  # manifest rows per listing unit (row groups are never split)
_SHOW = 50


def listing_schema(carried: pa.Schema | None = None) -> pa.Schema:
    return pa.schema([pa.field("image_id", pa.string()), pa.field("uri", pa.string()),
                      pa.field("version", pa.string()), pa.field(LISTING_ERROR, pa.string()), *(carried or [])])


@dataclass(frozen=True)
class ListingUnit:
    """One independently listable piece of a corpus source."""

    source: str
    kind: str  # "parquet" | "csv" | "part"
    row_groups: tuple[int, ...] = ()
    row_offset: int = 0  # first data row of this unit in the manifest (for messages)
    part: Part | None = None  # "part": a directory's share (odin_engine.io.listing.Part)


@dataclass
class CorpusSource:
    """A validated source, cut into units; ``carried`` holds the label/split fields."""

    source: str
    kind: str  # "directory" | "manifest"
    units: list[ListingUnit]
    carried: pa.Schema
    rows_hint: int | None = None  # a manifest's row count, when its metadata says it
    csv_types: dict = field(default_factory=dict)

    @property
    def schema(self) -> pa.Schema:
        return listing_schema(self.carried)


@dataclass
class Corpus:
    """The listed corpus: ``table`` (image_id, uri, version, error[, label, split]) sorted by image_id."""

    table: pa.Table
    source: str
    kind: str  # "directory" | "manifest"

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def carried_columns(self) -> list[str]:
        return [c for c in CARRIED_COLUMNS if c in self.table.column_names]


# --------------------------------------------------------------------------- opening a source
def _info(fs: pafs.FileSystem, path: str, source: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise ConfigError(f"cannot read corpus source {source!r}: {exc}") from exc


def _uri_column(names: list[str], source: str) -> str:
    col = "uri" if "uri" in names else "path" if "path" in names else None
    if col is None:
        raise ConfigError(f"manifest {source!r} needs a 'uri' or 'path' column; it has {names}")
    return col


_CSV_STRINGS = ("uri", "path", "image_id", "split", *VERSION_COLUMNS)


def _csv_reader(fs: pafs.FileSystem, path: str, column_types: dict | None = None):
    import pyarrow.csv as pacsv

    # ids, paths, splits and versions stay strings (no "001" → 1); label is inferred from the first block
    types = {c: pa.string() for c in _CSV_STRINGS}
    types.update(column_types or {})
    stream = fs.open_input_stream(path)
    return pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=8 << 20),
                          convert_options=pacsv.ConvertOptions(column_types=types))


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


def _check_types(schema: pa.Schema, source: str) -> None:
    """``uri``/``path``/``image_id`` (and ``version``/``etag``) must be strings: no silent ``1`` → ``'1'``,
    NaN → ``'nan'``, ``True`` → ``'true'``."""
    for name in ("uri", "path", "image_id", *VERSION_COLUMNS):
        if name in schema.names and not _is_text(schema.field(name).type):
            raise ConfigError(f"manifest {source!r}: column {name!r} has type {schema.field(name).type}; it must be "
                              "string (or large_string, or a dictionary of strings). Write it as text, e.g. "
                              f"df[{name!r}] = df[{name!r}].astype(str) after checking its values.")


def _carried(schema: pa.Schema) -> pa.Schema:
    """The carried columns of a manifest, in the types a Delta score table stores
    (``odin_engine.io.delta.delta_type``: a ``uint8`` label becomes ``int16``, not ``int8``)."""
    return delta_schema(pa.schema([schema.field(c) for c in CARRIED_COLUMNS if c in schema.names]))


def _open_manifest(fs: pafs.FileSystem, path: str, source: str) -> CorpusSource:
    try:
        if path.lower().endswith(".csv"):
            reader = _csv_reader(fs, path)
            schema = reader.schema
            reader.close()
            carried = _carried(schema)
            _uri_column(schema.names, source)
            return CorpusSource(source, "manifest", [ListingUnit(source, "csv")], carried,
                                csv_types={f.name: f.type for f in carried})
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot read manifest {source!r}: {exc}") from exc
    _uri_column(schema.names, source)
    _check_types(schema, source)
    carried = _carried(schema)
    units, group, rows, offset = [], [], 0, 0
    for g in range(meta.num_row_groups):
        group.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= UNIT_ROWS or g == meta.num_row_groups - 1:
            units.append(ListingUnit(source, "parquet", tuple(group), offset))
            offset += rows
            group, rows = [], 0
    return CorpusSource(source, "manifest", units or [ListingUnit(source, "parquet")], carried, meta.num_rows)


def open_corpus(source: str) -> CorpusSource:
    """Validate ``source`` and cut it into listing units (reads metadata only; see the module docstring)."""
    if not source or not str(source).strip():
        raise ConfigError("--input is empty: give a directory of images or a .parquet/.csv manifest")
    source = str(source)
    fs, path = resolve(source)
    info = _info(fs, path, source)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"corpus source not found: {source!r}")
    if info.type == pafs.FileType.Directory:
        try:
            parts = plan_split(fs, path, source)
        except OSError as exc:
            raise ConfigError(f"cannot list corpus directory {source!r}: {os_error_line(exc)}") from exc
        return CorpusSource(source, "directory", [ListingUnit(source, "part", part=p) for p in parts], pa.schema([]))
    if path.lower().endswith(MANIFEST_EXTENSIONS):
        return _open_manifest(fs, path, source)
    raise ConfigError(
        f"{source!r} is a file but not a manifest: give a directory, or a manifest ending in "
        f"{', '.join(MANIFEST_EXTENSIONS)}"
    )


# --------------------------------------------------------------------------- listing a unit
def _entry_rows(entries, schema: pa.Schema) -> pa.Table:
    ids, uris, versions, errors = [], [], [], []
    for e in entries:
        ids.append(e.image_id)
        uris.append(e.uri)
        versions.append(e.version or (f"{e.size}:{e.mtime_ns}" if e.size is not None and e.mtime_ns is not None
                                      else None))
        errors.append(e.error)
    return pa.table([pa.array(ids, pa.string()), pa.array(uris, pa.string()), pa.array(versions, pa.string()),
                     pa.array(errors, pa.string())], schema=schema)


def _batched(it, n: int):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stat_versions(uris: list[str]) -> list[str | None]:
    """``size:mtime_ns`` of local files (one vectorised stat call), None for missing ones and URIs,
    ``pseudo:<fstype>`` for files on /proc, /sys, … (whose mtime changes on every stat)."""
    local = [i for i, u in enumerate(uris) if not is_uri(u)]
    out: list[str | None] = [None] * len(uris)
    if local:
        infos = pafs.LocalFileSystem().get_file_info([uris[i] for i in local])
        for i, info in zip(local, infos):
            if info.type == pafs.FileType.File:
                out[i] = pseudo_version(uris[i]) or f"{info.size}:{info.mtime_ns}"
    return out


def _where(fs: pafs.FileSystem, path: str, rows: list[int]) -> str:
    """0-based data rows → what a user finds in the file: CSV lines (header = line 1; the empty
    lines the reader skipped are counted), Parquet rows counted from 1."""
    if not path.lower().endswith(".csv"):
        return "rows " + ", ".join(str(i + 1) for i in rows[:_SHOW])
    with fs.open_input_stream(path) as fh:
        lines = [n for n, line in enumerate(fh.read().splitlines(), 1) if line][1:]
    return "lines " + ", ".join(str(lines[i]) if i < len(lines) else f"data row {i + 1}" for i in rows[:_SHOW])


def _manifest_rows(raw: pa.Table, fs: pafs.FileSystem, path: str, source: str, offset: int,
                   schema: pa.Schema) -> pa.Table:
    """One batch of manifest rows → listing rows. ``offset``: index of the batch's first data row."""
    col = _uri_column(raw.column_names, source)
    _check_types(raw.schema, source)
    values = raw.column(col).cast(pa.string()).to_pylist()
    for name, cells in ((col, values), ("image_id", raw.column("image_id").cast(pa.string()).to_pylist()
                                        if "image_id" in raw.column_names else [])):
        empty = [offset + i for i, v in enumerate(cells) if v is None or not v.strip()]
        if empty:
            raise ConfigError(f"manifest {source!r} has {len(empty)} empty {name!r} cells ({_where(fs, path, empty)}): "
                              f"fill them{' or drop the column (ids then default to the paths)' if name == 'image_id' else ''}")
    base = posixpath.dirname(path)
    manifest_uri_base = source.rsplit("/", 1)[0] if is_uri(source) else None
    local_fs = isinstance(fs, pafs.LocalFileSystem)
    uris, default_ids = [], []
    for v in values:
        v = str(v)
        if is_uri(v):
            uri = v[len("file://"):] if v.startswith("file://") else v
        elif local_fs:
            uri = v if posixpath.isabs(v) else posixpath.normpath(posixpath.join(base, v))
        else:  # relative path inside a manifest that lives in an object store
            uri = f"{manifest_uri_base}/{v.lstrip('/')}" if manifest_uri_base else v
        uris.append(uri)
        local = local_fs and not is_uri(uri)
        if local and (uri + "/").startswith(base.rstrip("/") + "/"):
            default_ids.append(posixpath.relpath(uri, base))
        elif not local and manifest_uri_base and uri.startswith(manifest_uri_base + "/"):
            default_ids.append(uri[len(manifest_uri_base) + 1:])
        else:
            default_ids.append(uri)
    if "image_id" in raw.column_names:
        ids = raw.column("image_id").cast(pa.string()).to_pylist()
    else:
        ids = default_ids
    vcol = next((c for c in VERSION_COLUMNS if c in raw.column_names), None)
    versions = raw.column(vcol).cast(pa.string()) if vcol else pa.array(_stat_versions(uris), pa.string())
    cols = [pa.array(ids, pa.string()), pa.array(uris, pa.string()), versions, pa.nulls(len(ids), pa.string())]
    for f in schema:
        if f.name in CARRIED_COLUMNS:
            cols.append(to_delta_types(raw.column(f.name).combine_chunks(), f.type))
    return pa.Table.from_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols],
                                schema=schema)


def list_unit(unit: ListingUnit, carried: pa.Schema, batch_rows: int = BATCH_ROWS,
              more: list | None = None) -> Iterator[pa.Table]:
    """Stream the listing rows of one unit in batches of at most ``batch_rows`` (unsorted).

    With ``more`` a list, a unit that splits itself (an object-store key range) lists a bounded
    share and appends the rest to ``more`` as new units; with ``more`` None it lists everything.
    """
    schema = listing_schema(carried)
    fs, path = resolve(unit.source)
    if unit.kind == "part":
        parts: list | None = [] if more is not None else None
        try:
            for chunk in _batched(walk_part(fs, path, unit.source, unit.part, parts), batch_rows):
                yield _entry_rows(chunk, schema)
        except OSError as exc:
            raise ConfigError(f"cannot list corpus directory {unit.source!r}: {os_error_line(exc)}") from exc
        if parts:
            more.extend(ListingUnit(unit.source, "part", part=p) for p in parts)
        return
    try:
        if unit.kind == "csv":
            reader = _csv_reader(fs, path, {f.name: f.type for f in carried})
            batches = (pa.Table.from_batches([b]) for b in reader)
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(fs.open_input_file(path))
            batches = (pa.Table.from_batches([b]) for b in pf.iter_batches(batch_size=batch_rows,
                                                                         row_groups=list(unit.row_groups)))
        offset = unit.row_offset
        for raw in batches:
            for start in range(0, raw.num_rows, batch_rows):
                piece = raw.slice(start, batch_rows)
                yield _manifest_rows(piece, fs, path, unit.source, offset, schema)
                offset += piece.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot read manifest {unit.source!r}: {exc}") from exc


def count_rows(source: CorpusSource, split: str | None = None) -> int:
    """Listed rows of ``source`` in bounded memory; with ``split``, only manifest rows whose ``split`` == it.

    A manifest reads one column in batches (a Parquet manifest without ``split`` answers from its
    metadata); a directory streams its walk. Nothing is sorted or kept: this is a size check,
    not a listing (duplicate ids are found by the job's plan stage).
    """
    if split is not None:
        if "split" not in source.carried.names:
            raise ConfigError(f"{source.source!r} has no `split` column (only a manifest can have one)")
        fs, path = resolve(source.source)
        try:
            if path.lower().endswith(".csv"):
                import pyarrow.csv as pacsv

                reader = pacsv.open_csv(fs.open_input_stream(path), read_options=pacsv.ReadOptions(block_size=8 << 20),
                                        convert_options=pacsv.ConvertOptions(column_types={"split": pa.string()},
                                                                             include_columns=["split"]))
                return sum(int(pc.sum(pc.equal(b.column(0), split)).as_py() or 0) for b in reader)
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(fs.open_input_file(path))
            return sum(int(pc.sum(pc.equal(b.column(0).cast(pa.string()), split)).as_py() or 0)
                       for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=["split"]))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"cannot read manifest {source.source!r}: {exc}") from exc
    if source.rows_hint is not None:
        return source.rows_hint
    return sum(t.num_rows for unit in source.units for t in list_unit(unit, source.carried))


# --------------------------------------------------------------------------- checks shared with the job
def duplicate_ids(table: pa.Table) -> tuple[list[tuple[str, int]], int]:
    """``(first 50 (id, count) pairs, number of duplicated ids)`` among ``table``'s image_ids."""
    counts = table.group_by("image_id").aggregate([("image_id", "count")])
    dups = counts.filter(pc.greater(counts.column("image_id_count"), 1))
    shown = sorted(zip(dups.column("image_id").to_pylist(), dups.column("image_id_count").to_pylist()))[:_SHOW]
    return shown, dups.num_rows


def duplicate_error(source: str, shown: list[tuple[str, int]], n_dups: int) -> ConfigError:
    text = ", ".join(f"{v!r}×{n}" for v, n in sorted(shown)[:_SHOW])
    more = f", … ({n_dups} duplicated ids in all)" if n_dups > _SHOW else ""
    return ConfigError(f"duplicate image_id values in {source!r}: {text}{more}. Every image_id must be unique.")


def empty_error(source: str, kind: str) -> ConfigError:
    what = f"no files ending in {', '.join(IMAGE_EXTENSIONS)}" if kind == "directory" else "no rows"
    return ConfigError(f"empty corpus: {source!r} has {what}")


def load_corpus(source: str) -> Corpus:
    """List ``source`` (directory or manifest) in this process → :class:`Corpus`, sorted by image_id."""
    src = open_corpus(source)
    parts = [t for unit in src.units for t in list_unit(unit, src.carried)]
    table = pa.concat_tables(parts) if parts else src.schema.empty_table()
    if table.num_rows == 0:
        raise empty_error(src.source, src.kind)
    shown, n_dups = duplicate_ids(table)
    if n_dups:
        raise duplicate_error(src.source, shown, n_dups)
    return Corpus(table=table.sort_by("image_id"), source=src.source, kind=src.kind)
