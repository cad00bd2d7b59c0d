"""Maintenance of a Delta table given its location: compaction, vacuum, and time travel (issue 23, step 3).

Any Delta table (the score table ``<output>/scores/``, a ``--history`` table, …), local or
``s3://``: a :class:`odin_engine.io.delta.DeltaLocation` (delta-rs reads the log with the storage
options derived from the same ``pyarrow`` filesystem every other input uses; pyarrow reads the
data). No Ray here.

* **Compaction** (:func:`compact`) is delta-rs's ``optimize.compact(target_size)``: it bin-packs
  the files below the target into files of about the target and commits one version that removes
  the small files and adds the merged ones (rows unchanged; the removed files stay on disk, and
  readable by time travel, until a vacuum). :func:`needs_compaction` is the automatic rule of
  docs/table-formats.md.
* **Vacuum** (:func:`vacuum`) deletes the files no retained version references: files that a
  version older than ``retention_hours`` removed, and (``full``) files no version ever named —
  a killed writer's. Run it only where no writer is writing (the ``compact`` command holds the
  output's lease): a file a running writer has written but not yet committed is unreferenced.
* **Time travel** (:func:`resolve_version`, :func:`open_delta_version`): a version number, a date
  or time (the version current then), or a score run / audit id (the newest version whose commit
  carries it in its metadata, :data:`ID_KEYS`).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError
from odin_engine.io.delta import RUN_ID_KEY, DeltaLocation, is_delta_table
from odin_engine.io.store import resolve, to_uri

MIB = 1 << 20
DEFAULT_TARGET_BYTES = 128 * MIB  # compaction's target file size (delta-rs's own default is 100 MiB)
SMALL_FILES_MAX = 32  # the automatic rule: this many small files …
SMALL_BYTES_SHARE = 0.10  # … or small files holding this share of the table's bytes
#: rows per row group of the files compaction writes: the score job's (jobs/table_commit.ROW_GROUP_ROWS,
#: a test holds them equal), so that a bucket-range read still skips row groups and a streaming
#: reader holds one small row group at a time; delta-rs's own default writes one row group per file
ROW_GROUP_ROWS = 32_768
#: the codec of the files compaction writes (delta-rs's own compaction default; a WriterProperties
#: without one would write them uncompressed); the score job's own files are pyarrow's snappy
COMPRESSION = "ZSTD"
AUDIT_ID_KEY = "odin.audit_id"  # commit metadata of an audit's version (history, flags)
RESULT_ID_KEY = "odin.result_id"  # commit metadata of a flags version: the decision result (audit or calibrate)
ID_KEYS = (RUN_ID_KEY, AUDIT_ID_KEY, RESULT_ID_KEY)  # the commit metadata that time travel by id looks up


def locate(source: str, *, must_exist: bool = True) -> DeltaLocation:
    """The :class:`DeltaLocation` of ``source`` (a local path or URI); with ``must_exist``, a folder
    that is not a Delta table (no ``_delta_log/``) is a ``ConfigError``."""
    fs, path = resolve(str(source))
    if must_exist:
        try:
            kind = fs.get_file_info(path).type
            delta = kind == pafs.FileType.Directory and is_delta_table(fs, path)
        except OSError as exc:
            raise ConfigError(f"cannot read {source}: {exc}") from exc
        if not delta:
            what = "does not exist" if kind == pafs.FileType.NotFound else "is not a Delta table (no _delta_log/)"
            raise ConfigError(f"{source} {what}")
    return DeltaLocation(fs, path)


def _table(table: Any):
    """A ``DeltaTable`` from a ``DeltaTable``, a :class:`DeltaLocation` or a location string."""
    if isinstance(table, DeltaLocation):
        return table.open()
    if isinstance(table, str):
        return locate(table).open()
    return table


# --------------------------------------------------------------------------- compaction
@dataclass(frozen=True)
class FileStats:
    """A version's data files against a compaction target (see :func:`needs_compaction`)."""

    files: int
    bytes: int
    target_bytes: int  # min(target, the table's bytes)
    small_files: int  # files below target_bytes / 2
    small_bytes: int

    @classmethod
    def of(cls, sizes: Sequence[int], target_bytes: int = DEFAULT_TARGET_BYTES) -> "FileStats":
        """The statistics of files of these ``sizes`` (bytes) against ``target_bytes``."""
        total = int(sum(sizes))
        target = min(int(target_bytes), total)
        small = [int(s) for s in sizes if s < target / 2]
        return cls(len(sizes), total, target, len(small), sum(small))

    @property
    def due(self) -> bool:
        """:func:`needs_compaction`'s rule."""
        return self.small_files >= 2 and (self.small_files >= SMALL_FILES_MAX or
                                          self.small_bytes >= SMALL_BYTES_SHARE * self.bytes)


def file_sizes(table: Any) -> list[int]:
    """The sizes in bytes of the data files of ``table``'s loaded version (from its log)."""
    actions = pa.table(_table(table).get_add_actions())
    return [int(s) for s in actions.column("size_bytes").to_pylist()] if actions.num_rows else []


def file_stats(table: Any, target_bytes: int = DEFAULT_TARGET_BYTES) -> FileStats:
    return FileStats.of(file_sizes(table), target_bytes)


def needs_compaction(table: Any, target_bytes: int = DEFAULT_TARGET_BYTES) -> bool:
    """The automatic rule (docs/table-formats.md, step 3): with ``T = min(target_bytes, B)``, ``B``
    the table's bytes, a file is *small* when its size ``< T / 2``; compaction is due when

        n_small ≥ 32   or   Σ small sizes ≥ 0.10 · B

    and ``n_small ≥ 2`` (one file alone has nothing to merge with). ``table``: a ``DeltaTable`` (its
    loaded version), a :class:`DeltaLocation` or a location string."""
    return file_stats(table, target_bytes).due


@dataclass(frozen=True)
class CompactionResult:
    source: str
    version_before: int
    version_after: int  # = version_before when nothing was merged (or a dry run)
    files_before: int
    bytes_before: int
    files_after: int
    bytes_after: int
    files_removed: int  # small files replaced by the merged ones (still on disk until vacuumed)
    files_added: int
    bytes_written: int
    due: bool  # needs_compaction's verdict before compacting
    dry_run: bool = False
    candidates: int = 0  # files below the target: what delta-rs may merge (dry run: what it would consider)
    candidate_bytes: int = 0


def compact(table_uri: str, target_bytes: int = DEFAULT_TARGET_BYTES, *, dry_run: bool = False,
            row_group_rows: int | None = ROW_GROUP_ROWS, compression: str = COMPRESSION,
            max_concurrent_tasks: int | None = None,
            custom_metadata: dict[str, Any] | None = None) -> CompactionResult:
    """Merge the table's files below ``target_bytes`` into files of about ``target_bytes``: delta-rs's
    ``optimize.compact`` (one new version; rows unchanged; files at or above the target untouched),
    in row groups of at most ``row_group_rows`` rows, compressed with ``compression``
    (``row_group_rows=None``: delta-rs's own writer defaults, for comparison).
    ``dry_run``: write nothing; report what the table holds and the candidate files (below the target;
    delta-rs merges them when at least two fit a bin). ``custom_metadata`` goes into the commit."""
    if target_bytes < 1:
        raise ConfigError(f"the compaction target must be at least 1 byte; got {target_bytes}")
    loc = table_uri if isinstance(table_uri, DeltaLocation) else locate(table_uri)
    dt = loc.open()
    sizes = file_sizes(dt)
    before = FileStats.of(sizes, target_bytes)
    cand = [s for s in sizes if s < target_bytes]
    version = dt.version()
    if dry_run:
        return CompactionResult(loc.uri, version, version, before.files, before.bytes, before.files, before.bytes,
                                0, 0, 0, before.due, True, len(cand), sum(cand))
    from deltalake import CommitProperties, WriterProperties

    # a failure here (a concurrent commit, the store) is a run-time failure, not the caller's to fix:
    # it propagates (exit 5); files written by a failed compaction belong to no version
    metrics = dt.optimize.compact(
        target_size=int(target_bytes), max_concurrent_tasks=max_concurrent_tasks,
        writer_properties=None if row_group_rows is None else WriterProperties(
            max_row_group_size=int(row_group_rows), compression=compression),
        commit_properties=CommitProperties(custom_metadata=custom_metadata) if custom_metadata else None)
    after = file_sizes(dt)
    added = metrics.get("filesAdded")
    added = json.loads(added) if isinstance(added, str) else (added or {})
    return CompactionResult(loc.uri, version, dt.version(), before.files, before.bytes, len(after), sum(after),
                            int(metrics.get("numFilesRemoved", 0)), int(metrics.get("numFilesAdded", 0)),
                            int(added.get("totalSize", 0)), before.due, False, len(cand), sum(cand))


# --------------------------------------------------------------------------- vacuum
@dataclass(frozen=True)
class VacuumResult:
    source: str
    files: list[str]  # removed (or, in a dry run, to be removed), relative to the table's folder
    bytes: int
    retention_hours: int | None
    keep_versions: list[int]
    dry_run: bool


def vacuum(table_uri: str, retention_hours: int | None = None, keep_versions: Sequence[int] | None = None, *,
           dry_run: bool = False, full: bool = True) -> VacuumResult:
    """Delete the files that no retained version references (delta-rs's ``vacuum``).

    A file goes when a version committed more than ``retention_hours`` ago removed it (compaction,
    a rewrite), unless one of ``keep_versions`` still names it; with ``full`` (the default) also
    any file no version ever named and older than ``retention_hours`` — a killed writer's files.
    Files and folders starting with ``_`` or ``.`` are never touched (``_delta_log/``, a lease).
    ``retention_hours=None`` takes the table's ``delta.deletedFileRetentionDuration`` (default one
    week); a number given is used as given, even below that (delta-rs's check is turned off: the
    caller chose it). Versions older than the retention cannot be read afterwards unless kept.
    ``dry_run``: list, delete nothing."""
    if retention_hours is not None and retention_hours < 0:
        raise ConfigError(f"the vacuum retention must be >= 0 hours; got {retention_hours}")
    loc = table_uri if isinstance(table_uri, DeltaLocation) else locate(table_uri)
    dt = loc.open()
    keep = sorted({int(v) for v in keep_versions or ()})
    bad = [v for v in keep if not 0 <= v <= dt.version()]
    if bad:
        raise ConfigError(f"cannot keep versions {bad} of {loc.uri}: its versions are 0..{dt.version()}")
    kw = dict(retention_hours=None if retention_hours is None else int(retention_hours),
              enforce_retention_duration=retention_hours is None, full=full, keep_versions=keep or None)
    listed = dt.vacuum(dry_run=True, **kw)  # a failure (the store) propagates: a run-time failure
    sizes = _sizes(loc, listed)
    removed = listed if dry_run or not listed else dt.vacuum(dry_run=False, **kw)
    return VacuumResult(loc.uri, sorted(removed), sum(sizes.get(f, 0) for f in removed), retention_hours, keep,
                        dry_run)


def _rel(loc: DeltaLocation, name: str) -> str:
    """The path inside ``loc.fs`` of a file delta-rs names (relative to the table, or a full URI)."""
    if "://" in name:
        return name.split("://", 1)[1]
    return posixpath.join(loc.path, name)


def _sizes(loc: DeltaLocation, names: Sequence[str]) -> dict[str, int]:
    if not names:
        return {}
    infos = loc.fs.get_file_info([_rel(loc, n) for n in names])
    return {n: int(i.size or 0) for n, i in zip(names, infos) if i.type == pafs.FileType.File}


# --------------------------------------------------------------------------- time travel
def _commit_time(commit: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(int(commit["timestamp"]) / 1000.0, timezone.utc)


def _as_datetime(text: str) -> datetime | None:
    """An ISO date (its 00:00 UTC, as Spark's ``TIMESTAMP AS OF 'date'``) or date-time (naive = UTC)."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def resolve_version(table_uri: Any, as_of: int | str | datetime | date | None) -> int:
    """The version of the Delta table at ``table_uri`` (a location string, a :class:`DeltaLocation`
    or a ``DeltaTable``) that ``as_of`` names:

    * ``None``: the current version;
    * an ``int`` (or a string of digits): that version, which must be in ``0..current``;
    * a string some commit carries under :data:`ID_KEYS` (``odin.run_id``: the score run that
      committed it; ``odin.audit_id``: the audit's result id; ``odin.result_id``: the decision
      result, audit or calibrate, whose flags it is): the **newest** such version (an
      output's incremental runs share one run id: the id then names its latest night);
    * a ``datetime``/``date`` or an ISO string (``2026-12-05`` = 00:00 UTC that day;
      ``2026-12-05T03:00:00Z``; naive = UTC): the version current at that time — the newest
      committed at or before it, by the commit times ``history()`` shows.

    Ids are looked up before dates (an id that happens to parse as a date still names its commit).
    ``ConfigError`` for a version out of range, a time before the oldest version still in the log,
    and a string that is neither a known id nor a date."""
    if isinstance(table_uri, (str, DeltaLocation)):
        loc = locate(table_uri) if isinstance(table_uri, str) else table_uri
        return _resolve(loc.open(), loc.uri, as_of)
    return _resolve(table_uri, str(getattr(table_uri, "table_uri", "the Delta table")), as_of)


def _resolve(dt: Any, source: str, as_of: Any) -> int:
    current = dt.version()
    if as_of is None:
        return current
    if isinstance(as_of, bool):
        raise ConfigError(f"as-of must be a version, a date or a run/audit id; got {as_of!r}")
    if isinstance(as_of, int) or (isinstance(as_of, str) and as_of.strip().isdigit()):
        v = int(as_of)
        if not 0 <= v <= current:
            raise ConfigError(f"{source} has no version {v}: its versions are 0..{current}")
        return v
    history = dt.history()  # newest first; each commit's custom metadata are top-level keys
    if isinstance(as_of, str):
        for commit in history:
            if any(commit.get(k) == as_of.strip() for k in ID_KEYS):
                return int(commit["version"])
        when = _as_datetime(as_of)
        if when is None:
            ids = list(dict.fromkeys(c[k] for c in history for k in ID_KEYS if c.get(k)))[:5]
            raise ConfigError(f"no version of {source} was committed by run or audit {as_of!r}, and it is not an ISO "
                              f"date or time (e.g. 2026-12-05 or 2026-12-05T03:00:00Z); recent ids: {ids or 'none'}")
    elif isinstance(as_of, datetime):
        when = as_of.replace(tzinfo=timezone.utc) if as_of.tzinfo is None else as_of.astimezone(timezone.utc)
    elif isinstance(as_of, date):
        when = datetime(as_of.year, as_of.month, as_of.day, tzinfo=timezone.utc)
    else:
        raise ConfigError(f"as-of must be a version, a date or a run/audit id; got {as_of!r}")
    oldest = min(history, key=lambda c: int(c["version"]))
    if when < _commit_time(oldest):
        first = ("was created" if int(oldest["version"]) == 0
                 else f"'s oldest version still in its log ({oldest['version']}) was committed")
        raise ConfigError(f"{when.isoformat()} is before {source} {first} ({_commit_time(oldest).isoformat()}): "
                          "no version was current then")
    # the newest version whose commit time (its commitInfo timestamp, as history() and the oldest
    # check above read it) is at or before `when`; delta-rs's load_as_version(datetime) goes by the
    # log files' modification times instead, a few ms later, so the time history() shows for a
    # version could resolve to the one before it
    return max(int(c["version"]) for c in history if _commit_time(c) <= when)


@dataclass(frozen=True)
class DeltaSnapshot:
    """One version of a Delta table, opened: ``dataset`` reads exactly that version's files."""

    location: DeltaLocation
    version: int
    current_version: int
    dataset: ds.FileSystemDataset = field(repr=False)
    table: Any = field(repr=False)  # the deltalake.DeltaTable, loaded at ``version``


def open_delta_version(source: str, as_of: int | str | datetime | date | None = None, *,
                       schema: pa.Schema | Callable[[pa.Schema], pa.Schema] | None = None,
                       what: str = "table", table: Any = None) -> DeltaSnapshot:
    """The version ``as_of`` names (:func:`resolve_version`; None: the current one) of the Delta
    table at ``source`` as a ``pyarrow`` dataset of exactly its files, read through the same
    filesystem as any other input. ``schema``: the dataset's schema, or a function of the table's
    (e.g. the score table's ``_canonical``), to which each file is cast (a column a file lacks reads
    as null). ``table``: the ``DeltaTable`` of ``source`` at its current version, when the caller
    has opened it already (its log is then not read again). An older version whose files a vacuum
    deleted is a ``ConfigError`` saying so."""
    loc = locate(source) if not isinstance(source, DeltaLocation) else source
    dt = table if table is not None else loc.open()
    current = dt.version()
    version = _resolve(dt, loc.uri, as_of)
    from deltalake.exceptions import DeltaError

    try:
        if version != current:
            dt.load_as_version(version)
        found = pa.schema(dt.schema().to_arrow())
        wanted = schema(found) if callable(schema) else (schema if schema is not None else found)
        dataset = dt.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(loc.path, loc.fs), schema=wanted)
    except DeltaError as exc:
        raise ConfigError(f"cannot read the {what} at {loc.uri} (version {version}): {exc}") from exc
    if version != current:  # an old version: are its files still there?
        infos = loc.fs.get_file_info([posixpath.join(loc.path, f) for f in dataset.files])
        gone = [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.NotFound]
        if gone:
            raise ConfigError(f"version {version} of the {what} at {loc.uri} cannot be read: a vacuum deleted "
                              f"{len(gone)} of its {len(infos)} files (e.g. {gone[0]}); versions kept by "
                              "`vacuum(keep_versions=…)` or younger than its retention stay readable")
    return DeltaSnapshot(loc, version, current, dataset, dt)


# --------------------------------------------------------------------------- the tables of an output
#: Delta tables directly under an output: a score job's ``scores/``, a decision output's ``flags/``, a ``history/``
OUTPUT_TABLES = ("scores", "flags", "history")
#: an audit's score runs, each its own score-job output with a ``scores/`` table (``ood/<name>/`` too)
AUDIT_SETS = ("corpus", "heldout")


@dataclass(frozen=True)
class OutputTable:
    """A Delta table of an output: ``name`` relative to it (``""``: the output is the table) and the
    output directories whose writers write it (their leases guard it: ``jobs.run_lock``)."""

    name: str
    location: DeltaLocation
    owners: tuple[str, ...]


def output_tables(output: str) -> list[OutputTable]:
    """The Delta tables of the output directory ``output`` (local or URI): the output itself when it
    is one (a ``--history`` location), else ``scores/``, ``flags/``, ``history/`` and, in an audit's
    output, each score run's ``<set>/scores/`` (``corpus``, ``heldout``, ``ood/<name>``). Folders
    that are not Delta tables (today's per-bucket Parquet layout) are not listed. ``ConfigError``
    when ``output`` is not a directory."""
    fs, path = resolve(str(output))
    try:
        kind = fs.get_file_info(path).type
        if kind != pafs.FileType.Directory:
            what = "does not exist" if kind == pafs.FileType.NotFound else "is a file, not an output directory"
            raise ConfigError(f"{output} {what}")
        root = to_uri(fs, path, str(output))
        if is_delta_table(fs, path):
            return [OutputTable("", DeltaLocation(fs, path), (root,))]
        found = []

        def add(name: str, owners: tuple[str, ...]) -> None:
            p = posixpath.join(path, name)
            if is_delta_table(fs, p):
                found.append(OutputTable(name, DeltaLocation(fs, p), owners))

        for name in OUTPUT_TABLES:
            add(name, (root,))
        sets = list(AUDIT_SETS)
        ood = fs.get_file_info(pafs.FileSelector(posixpath.join(path, "ood"), allow_not_found=True))
        sets += sorted(f"ood/{posixpath.basename(i.path)}" for i in ood if i.type == pafs.FileType.Directory)
        for s in sets:
            add(f"{s}/scores", (root, to_uri(fs, posixpath.join(path, s), str(output))))
    except OSError as exc:
        raise ConfigError(f"cannot read {output}: {exc}") from exc
    return found
