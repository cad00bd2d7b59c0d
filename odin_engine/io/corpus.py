"""Corpus listing: a directory tree or a manifest → one sorted table of items (no Ray).

:func:`load_corpus` accepts

* a **directory** (local path, ``file://``, ``s3://bucket/prefix``, ``gs://bucket/prefix``):
  every file below it, recursively, whose extension is one of :data:`IMAGE_EXTENSIONS`
  (case-insensitive), listed by :func:`odin_engine.io.listing.walk` (its rules: directory
  symlinks are not followed, names that are not UTF-8 are escaped); ``image_id`` is the path
  relative to the directory, with ``/``. Entries the walk cannot use (dangling or looping
  symlinks, directory symlinks, unreadable entries) are listed too, with their reason in a
  ``listing_error`` column (present only when some entry has one): the job makes them error rows;
* a **manifest**, a ``.parquet`` or ``.csv`` file with a ``uri`` or ``path`` column and
  optional ``image_id``, ``label`` and ``split`` columns (carried to the output). Relative
  paths are resolved against the manifest's own directory; ``image_id`` defaults to the path
  relative to that directory (or the full URI when it lies elsewhere).

The result has columns ``image_id``, ``uri`` (``label``, ``split`` when present), sorted by
``image_id``. Filesystems come from ``pyarrow.fs.FileSystem.from_uri`` (S3 honours the usual
``AWS_*`` variables, including ``AWS_ENDPOINT_URL``; GCS uses Google's default credentials, or
with ``STORAGE_EMULATOR_HOST`` set — the variable Google's own clients read — that emulator,
anonymously). Problems the user must fix raise
:class:`~odin_engine.errors.ConfigError`: missing source, empty corpus, duplicate ids (all
listed, up to 50), a manifest without a ``uri``/``path`` column or with empty cells.
Files that later turn out unreadable are *not* an error here: they become error rows.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError
from odin_engine.io.listing import IMAGE_EXTENSIONS, walk
from odin_engine.io.store import is_uri, resolve

LISTING_ERROR = "listing_error"  # directory corpora only: why a listed entry cannot be read (else null)
MANIFEST_EXTENSIONS = (".parquet", ".pq", ".csv")
CARRIED_COLUMNS = ("label", "split")
_SHOW = 50


@dataclass
class Corpus:
    """The listed corpus: ``table`` (image_id, uri[, label, split]) sorted by image_id."""

    table: pa.Table
    source: str
    kind: str  # "directory" | "manifest"

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def carried_columns(self) -> list[str]:
        return [c for c in CARRIED_COLUMNS if c in self.table.column_names]


def _info(fs: pafs.FileSystem, path: str, source: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise ConfigError(f"cannot read corpus source {source!r}: {exc}") from exc


def _list_directory(fs: pafs.FileSystem, root: str, source: str) -> pa.Table:
    try:
        entries = list(walk(fs, root, source))
    except OSError as exc:
        raise ConfigError(f"cannot list corpus directory {source!r}: {exc}") from exc
    table = pa.table({"image_id": pa.array([e.image_id for e in entries], pa.string()),
                      "uri": pa.array([e.uri for e in entries], pa.string())})
    if any(e.error for e in entries):  # only then: a clean corpus keeps its listing (and digest) as before
        table = table.append_column(LISTING_ERROR, pa.array([e.error for e in entries], pa.string()))
    return table


def _read_manifest(fs: pafs.FileSystem, path: str, source: str) -> pa.Table:
    lower = path.lower()
    try:
        if lower.endswith(".csv"):
            import pyarrow.csv as pacsv

            with fs.open_input_stream(path) as fh:
                # ids, paths and splits stay strings (no "001" → 1); label is inferred.
                opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in ("uri", "path", "image_id", "split")})
                return pacsv.read_csv(fh, convert_options=opts)
        import pyarrow.parquet as pq

        return pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot read manifest {source!r}: {exc}") from exc


def _where(fs: pafs.FileSystem, path: str, rows: list[int]) -> str:
    """0-based data rows → what a user finds in the file: CSV lines (header = line 1; the empty
    lines the reader skipped are counted), Parquet rows counted from 1."""
    if not path.lower().endswith(".csv"):
        return "rows " + ", ".join(str(i + 1) for i in rows[:_SHOW])
    with fs.open_input_stream(path) as fh:
        lines = [n for n, line in enumerate(fh.read().splitlines(), 1) if line][1:]
    return "lines " + ", ".join(str(lines[i]) if i < len(lines) else f"data row {i + 1}" for i in rows[:_SHOW])


def _manifest_table(fs: pafs.FileSystem, path: str, source: str) -> pa.Table:
    raw = _read_manifest(fs, path, source)
    col = "uri" if "uri" in raw.column_names else "path" if "path" in raw.column_names else None
    if col is None:
        raise ConfigError(f"manifest {source!r} needs a 'uri' or 'path' column; it has {raw.column_names}")
    values = raw.column(col).cast(pa.string()).to_pylist()
    empty = [i for i, v in enumerate(values) if v is None or not str(v).strip()]
    if empty:
        raise ConfigError(f"manifest {source!r} has {len(empty)} empty {col!r} cells ({_where(fs, path, empty)})")
    base = posixpath.dirname(path)
    manifest_uri_base = source.rsplit("/", 1)[0] if is_uri(source) else None
    uris, default_ids = [], []
    for v in values:
        v = str(v)
        if is_uri(v):
            uri = v[len("file://"):] if v.startswith("file://") else v
        elif isinstance(fs, pafs.LocalFileSystem):
            uri = v if posixpath.isabs(v) else posixpath.normpath(posixpath.join(base, v))
        else:  # relative path inside a manifest that lives in an object store
            uri = f"{manifest_uri_base}/{v.lstrip('/')}" if manifest_uri_base else v
        uris.append(uri)
        local = isinstance(fs, pafs.LocalFileSystem) and not is_uri(uri)
        if local and (uri + "/").startswith(base.rstrip("/") + "/"):
            default_ids.append(posixpath.relpath(uri, base))
        elif not local and manifest_uri_base and uri.startswith(manifest_uri_base + "/"):
            default_ids.append(uri[len(manifest_uri_base) + 1:])
        else:
            default_ids.append(uri)
    if "image_id" in raw.column_names:
        given = raw.column("image_id").cast(pa.string()).to_pylist()
        ids = [g if g is not None and str(g) != "" else d for g, d in zip(given, default_ids)]
    else:
        ids = default_ids
    cols = {"image_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string())}
    for c in CARRIED_COLUMNS:
        if c in raw.column_names:
            cols[c] = raw.column(c).combine_chunks()
    return pa.table(cols)


def _check_duplicates(table: pa.Table, source: str) -> None:
    counts = pc.value_counts(table.column("image_id")).to_pylist()
    dups = sorted((d["values"], d["counts"]) for d in counts if d["counts"] > 1)
    if dups:
        shown = ", ".join(f"{v!r}×{n}" for v, n in dups[:_SHOW])
        more = f", … ({len(dups)} duplicated ids in all)" if len(dups) > _SHOW else ""
        raise ConfigError(f"duplicate image_id values in {source!r}: {shown}{more}. Every image_id must be unique.")


def load_corpus(source: str) -> Corpus:
    """List ``source`` (directory or manifest) → :class:`Corpus`; see the module docstring."""
    if not source or not str(source).strip():
        raise ConfigError("--input is empty: give a directory of images or a .parquet/.csv manifest")
    source = str(source)
    fs, path = resolve(source)
    info = _info(fs, path, source)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"corpus source not found: {source!r}")
    if info.type == pafs.FileType.Directory:
        table, kind = _list_directory(fs, path, source), "directory"
    elif path.lower().endswith(MANIFEST_EXTENSIONS):
        table, kind = _manifest_table(fs, path, source), "manifest"
    else:
        raise ConfigError(
            f"{source!r} is a file but not a manifest: give a directory, or a manifest ending in "
            f"{', '.join(MANIFEST_EXTENSIONS)}"
        )
    if table.num_rows == 0:
        what = f"no files ending in {', '.join(IMAGE_EXTENSIONS)}" if kind == "directory" else "no rows"
        raise ConfigError(f"empty corpus: {source!r} has {what}")
    _check_duplicates(table, source)
    table = table.sort_by("image_id")
    return Corpus(table=table, source=source, kind=kind)
