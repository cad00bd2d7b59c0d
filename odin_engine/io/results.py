"""Whole results: every decision output of one audit published at once (see docs/decision-stage.md).

Layout of an output directory ``DIR`` (``audit --output``, ``calibrate --output``)::

    DIR/flags/                    flags format ``delta`` (the default): a Delta table, one version
                                   per result (the whole flags set; commit metadata ``odin.result_id``,
                                   and ``odin.audit_id`` for an audit), data files
                                   part-<result-id>-RRR-KKKKK.parquet
    DIR/results/<result-id>/      one audit's outputs, written whole, never changed afterwards:
                                   flag_summary.json, calibration.json, evaluation.json, report.html,
                                   audit.json (and, flags format ``buckets``, its own
                                   flags/part-<result-id>-RRR-KKKKK.parquet)
    DIR/current.json              the pointer, written last: {"result_id", "path", "flags_format",
                                   "flags_version", …}. Writing it (rename on a local disk, one PUT
                                   on an object store) is the commit
    DIR/latest -> results/<id>    local disks only: a symlink swapped (rename) after the pointer
    DIR/audit.json -> latest/audit.json   local disks only: the stable names, fixed links through
                                   ``latest`` (and calibration.json, flag_summary.json,
                                   evaluation.json, report.html; ``flags -> latest/flags`` in the
                                   ``buckets`` format)

Order of a publication: the flag files, the flags' Delta version (:meth:`Publication.commit_flags`),
the result's JSON files and report, the pointer naming that version. A run killed before the
pointer leaves the previous result current (its pointer names its own ``flags_version``); the
table's newest version may then be the dead run's flags, whole, until the next run commits a newer
one. :func:`open_flags` reads the flags of a result (the current one, or as of a result id,
a version or a date) in either format.

A reader who reads the pointer (or resolves ``DIR/latest``) once and then reads that directory
sees one complete result, whatever runs meanwhile. Part files carry the result id in their
names, so a reader that lists ``DIR/flags`` just before a swap and opens its files just after
fails with "file not found" instead of reading parts of two results. The previous
:data:`KEEP` committed results stay; older ones, and any result directory that was never
committed (a killed run's), are deleted by the next commit, which runs under the output's lease.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError
from odin_engine.io.delta import DeltaLocation, is_delta_table
from odin_engine.io.store import Store

RESULTS_DIR = "results"
POINTER = "current.json"
LATEST = "latest"
#: the names a plain reader of a local ``DIR`` may open directly (links through ``latest``)
STABLE_NAMES = ("flags", "audit.json", "calibration.json", "flag_summary.json", "evaluation.json", "report.html")
#: committed results kept: the current one and the ones before it that readers may still be reading
KEEP = 3
POINTER_VERSION = 1
FLAGS = "flags"
#: the flags' formats: ``delta`` (a Delta table at ``DIR/flags``) or ``buckets`` (each result's own Parquet
#: folder ``results/<id>/flags``); chosen as the score table's (``jobs.score.table_format``)
FLAGS_FORMATS = ("delta", "buckets")


def new_result_id() -> str:
    """``<UTC %Y%m%dT%H%M%SZ>-<6 hex>``: sorts by time, unique per run."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def read_pointer(out: Store) -> dict[str, Any] | None:
    """``DIR/current.json``; None when ``DIR`` has none (no committed result in this layout yet).

    A pointer that exists but cannot be read raises: taking it for absent would show ``DIR``'s
    other files as the result. (A read cut by a concurrent publication on an object store is
    retried by ``Store.read_json``.)"""
    try:
        doc = out.read_json(POINTER)
    except ValueError as exc:
        raise ValueError(f"{out.uri(POINTER)} is not a result pointer this tool wrote ({exc}); each "
                         "publication writes it whole, so something else changed it: rerun the command "
                         "that wrote DIR, whose commit writes a new one") from exc
    return doc if isinstance(doc, dict) and doc.get("path") else None


def _pointer_to_replace(out: Store) -> dict[str, Any] | None:
    """The pointer a writer is about to replace; one it cannot read counts as none (the commit
    writes a whole new pointer, so a damaged one never blocks the run that repairs it)."""
    try:
        return read_pointer(out)
    except ValueError:
        return None


def current(out: Store) -> Store:
    """The Store of ``DIR``'s current complete result; ``DIR`` itself for an output written before
    results were published whole (its files then lie directly under ``DIR``)."""
    pointer = read_pointer(out)
    return out.join(pointer["path"]) if pointer else out


def check_flags_format(out: Store, flags_format: str) -> None:
    """Exit 2 (``ConfigError``) when ``out``'s flags are a Delta table and ``flags_format`` is
    ``buckets``: an output never goes back to per-result Parquet flags."""
    if flags_format == "buckets" and is_delta_table(out.fs, out.p(FLAGS)):
        raise ConfigError(f"{out.uri(FLAGS)} is a Delta table (one version per result): this output cannot go back "
                          "to per-result Parquet flags; drop --table-format buckets, or use a new --output")


def recorded_flags_format(out: Store) -> str | None:
    """The flags' format ``out`` already has: its pointer's (a pointer written before the Delta
    flags: ``buckets``), ``delta`` for a Delta table at ``DIR/flags`` (a first run killed after its
    flags commit), ``buckets`` for an oldest-layout ``DIR/flags/``; None for a new output."""
    pointer = read_pointer(out)
    if pointer is not None:
        return str(pointer.get("flags_format", "buckets"))
    if is_delta_table(out.fs, out.p(FLAGS)):
        return "delta"
    return "buckets" if out.exists(FLAGS) else None


@dataclass
class Publication:
    """One result being written: ``store`` is its private directory; :meth:`commit` publishes it.

    Use under the output's lease (``jobs.run_lock.RunLock``): commit deletes result directories
    no committed pointer names, which only a dead run can have left.
    """

    out: Store
    result_id: str = field(default_factory=new_result_id)
    keep: int = KEEP
    flags_format: str = "buckets"  # see FLAGS_FORMATS
    flags_version: int | None = None  # the flags' Delta version, once committed

    def __post_init__(self) -> None:
        if self.flags_format not in FLAGS_FORMATS:
            raise ValueError(f"flags format {self.flags_format!r}: one of {FLAGS_FORMATS}")
        pointer = _pointer_to_replace(self.out)
        if pointer is not None:  # a run killed between its commit and its links left `latest` behind
            follow_pointer(self.out, pointer)

    @property
    def path(self) -> str:
        return posixpath.join(RESULTS_DIR, self.result_id)

    @property
    def store(self) -> Store:
        return self.out.join(self.path)

    @property
    def part_prefix(self) -> str:
        """Flag files are ``<part_prefix>-RRR-KKKKK.parquet``: unique to this result."""
        return f"part-{self.result_id}"

    @property
    def flags_store(self) -> Store:
        """Where the flag files are written: the Delta table's folder ``DIR/flags`` (not visible to
        its readers before :meth:`commit_flags`), or the result's private ``flags/``."""
        return self.out.join(FLAGS) if self.flags_format == "delta" else self.store.join(FLAGS)

    def prepare_flags(self) -> None:
        """Before the flag files are written (format ``delta``): ``DIR/flags`` becomes the table's
        folder. An output of the ``buckets`` layout has a link ``DIR/flags -> latest/flags`` there
        (local disks), or an oldest-layout ``flags/`` folder: the link is removed (kept results keep
        their own ``results/<id>/flags/``, still read by :func:`open_flags`), the folder deleted —
        until this run's version is committed a Delta reader of ``DIR/flags`` finds no table, and a
        pointer reader reads the previous result. Also deletes temporary files a killed run left."""
        if self.flags_format != "delta":
            return
        fs, table = self.out.fs, self.out.p(FLAGS)
        if self.out.is_local:
            if os.path.islink(table):
                os.unlink(table)
            elif os.path.isdir(table) and not is_delta_table(fs, table):
                aside = posixpath.join(self.out.path, f".{FLAGS}.old-{uuid.uuid4().hex[:6]}")
                os.replace(table, aside)
                fs.delete_dir(aside)
            os.makedirs(table, exist_ok=True)
            for name in os.listdir(table):  # a killed writer's partial part (Store.parquet_writer's temp)
                if name.startswith(".part-") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(posixpath.join(table, name))
        elif fs.get_file_info(table).type == pafs.FileType.Directory and not is_delta_table(fs, table):
            fs.delete_dir(table)

    def commit_flags(self, files: list[str], schema: pa.Schema, **metadata: str) -> int:
        """One Delta version of ``DIR/flags`` holding exactly ``files`` (names under
        :attr:`flags_store`): every file of the previous version is removed, the table's schema is
        ``schema``, and the commit metadata carry ``odin.result_id`` (and ``metadata``). Returns the
        version, recorded by :meth:`commit` in the pointer."""
        from odin_engine.io.delta import add_action, commit, file_entry
        from odin_engine.io.maintenance import RESULT_ID_KEY

        if self.flags_format != "delta":
            raise ValueError("only the delta flags format commits a table version")
        loc = DeltaLocation(self.out.fs, self.out.p(FLAGS))
        now = int(datetime.now(timezone.utc).timestamp() * 1000)
        adds = [add_action(file_entry(loc, self.flags_store.p(posixpath.basename(f))), now) for f in files]
        self.flags_version = commit(loc, schema, adds, metadata={RESULT_ID_KEY: self.result_id, **metadata},
                                    replace=True)
        return self.flags_version

    @property
    def flags_info(self) -> dict[str, Any]:
        """What the pointer and audit.json record of this result's flags."""
        if self.flags_format == "delta":
            return {"flags_format": "delta", "flags_version": self.flags_version}
        return {"flags_format": "buckets"}

    def commit(self, **info: Any) -> dict[str, Any]:
        """Write the pointer (the commit), then make the local links follow it and remove results
        no reader needs any more. Returns the pointer."""
        if self.flags_format == "delta" and self.flags_version is None:
            raise ValueError("commit the flags (commit_flags) before the result")
        before = _pointer_to_replace(self.out)
        kept = [self.result_id] + [r for r in (before or {}).get("kept", []) if r != self.result_id]
        pointer = {"version": POINTER_VERSION, "result_id": self.result_id, "path": self.path,
                   "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "kept": kept[: self.keep], **self.flags_info, **info}
        self.out.write_json(POINTER, pointer)
        follow_pointer(self.out, pointer)
        prune(self.out, keep=set(pointer["kept"]))
        return pointer


def follow_pointer(out: Store, pointer: dict[str, Any] | None = None) -> None:
    """Local disks: point ``DIR/latest`` at the pointer's result (atomic rename of a new link) and
    make each stable name the result has a fixed link through it. An output of the older layout (real files and
    a real ``flags/`` under ``DIR``) is converted: its files are replaced by the links. Object
    stores have no links: readers there read the pointer."""
    pointer = pointer if pointer is not None else read_pointer(out)
    if not out.is_local or pointer is None:
        if pointer is not None:
            _drop_old_layout(out)
        return
    root = out.path
    _swap_link(root, LATEST, pointer["path"])
    for name in STABLE_NAMES:
        target = posixpath.join(LATEST, name)
        link = posixpath.join(root, name)
        if name == FLAGS and (pointer.get("flags_format") == "delta" or is_delta_table(out.fs, link)):
            continue  # DIR/flags is the Delta table itself (Publication.prepare_flags made it one)
        if not os.path.lexists(posixpath.join(root, pointer["path"], name)):  # not part of this result
            if os.path.isdir(link) and not os.path.islink(link):  # the older layout's flags/
                out.fs.delete_dir(link)
            elif os.path.lexists(link):
                os.unlink(link)
            continue
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        if os.path.isdir(link) and not os.path.islink(link):  # the older layout's flags/: set aside, then link
            aside = posixpath.join(root, f".{name}.old-{uuid.uuid4().hex[:6]}")
            os.replace(link, aside)
            _swap_link(root, name, target)
            out.fs.delete_dir(aside)
        else:
            _swap_link(root, name, target)  # rename replaces an older layout's file atomically


def _swap_link(root: str, name: str, target: str) -> None:
    tmp = posixpath.join(root, f".{name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, posixpath.join(root, name))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _drop_old_layout(out: Store) -> None:
    """Object stores: outputs of the older layout directly under ``DIR`` would look current; remove
    them once a result is committed in this layout (audit.json first, then the rest). One listing of
    ``DIR`` finds them (a check per name cost a HEAD and a LIST each on S3, at every commit)."""
    present = {posixpath.basename(i.path) for i in out.listdir()}
    for name in ("audit.json", "calibration.json", "flag_summary.json", "evaluation.json", "report.html", "flags"):
        if name not in present:
            continue
        if name == FLAGS and is_delta_table(out.fs, out.p(FLAGS)):
            continue  # the flags' Delta table, not an old layout's folder
        with contextlib.suppress(OSError):
            out.delete(name)


def prune(out: Store, keep: set[str]) -> list[str]:
    """Delete every result directory whose id is not in ``keep``; returns the ids deleted."""
    gone = []
    for info in out.listdir(RESULTS_DIR):
        rid = posixpath.basename(info.path)
        if info.type == pafs.FileType.Directory and rid not in keep:
            with contextlib.suppress(OSError):
                out.fs.delete_dir(info.path)
                gone.append(rid)
    return gone


def referenced_versions(out: Store) -> dict[str, list[int]]:
    """The Delta versions that ``out``'s kept results read: ``{table name: [versions]}``, names as
    ``odin_engine.io.maintenance.output_tables`` gives them — each kept result's flags version
    (``flags``; the current one from the pointer, which after a run killed between its flags commit
    and its pointer is not the table's newest) and the version of each score table an audit decided
    on (``corpus/scores``, ``heldout/scores``, ``ood/<name>/scores``: ``audit.json``'s
    ``score_runs``). ``odin-audit compact --vacuum-hours`` keeps them, so every kept result stays
    readable whole."""
    pointer = read_pointer(out)
    if not pointer:
        return {}
    found: dict[str, set[int]] = {}

    def add(table: str, version: Any) -> None:
        if isinstance(version, int) and not isinstance(version, bool):
            found.setdefault(table, set()).add(version)

    add(FLAGS, pointer.get("flags_version"))
    for rid in pointer.get("kept", []):
        for name in ("audit.json", "calibration.json"):
            try:
                doc = out.join(RESULTS_DIR, str(rid)).read_json(name)
            except (OSError, ValueError):
                doc = None
            if not isinstance(doc, dict):
                continue
            add(FLAGS, doc.get("flags_version", (doc.get("flags") or {}).get("flags_version")))
            for sub, run in (doc.get("score_runs") or {}).items():
                add(f"{sub}/scores", (run or {}).get("table_version"))
    return {table: sorted(versions) for table, versions in found.items()}


# --------------------------------------------------------------------------- reading the flags
@dataclass(frozen=True)
class Flags:
    """The flags of one result, opened: ``dataset`` reads exactly its files."""

    source: str  # the output directory
    result_id: str | None  # None: an oldest-layout output, or a Delta version no result committed
    format: str  # "delta" or "buckets"
    version: int | None  # the Delta version read (None: a ``buckets`` result's own folder)
    dataset: ds.Dataset = field(repr=False)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        return self.dataset.to_table(columns=columns)

    def to_pandas(self, columns: list[str] | None = None):
        return self.read(columns).to_pandas()


def open_flags(output: "str | Store", as_of: Any = None) -> Flags:
    """The flags of the output directory ``output`` (local or URI, an ``audit``/``calibrate --output``):

    * ``as_of=None``: the current result's (the version its pointer names: the same snapshot as
      its JSON files and report, even while a newer run is writing);
    * a result id (an audit's id is its result id): that result's — a kept ``buckets`` result's
      own folder, or the newest flags version whose commit carries the id;
    * a version number, or an ISO date or time (the version current then): through
      :func:`odin_engine.io.maintenance.resolve_version`, like the score table's ``as_of``.

    A version found by id (or the pointer) that a compaction replaced since is read as the
    compaction's version (the same rows; its files survive a vacuum). ``ConfigError`` when the
    output has no flags, or the version asked for is unknown or vacuumed."""
    from odin_engine.io.maintenance import RESULT_ID_KEY, open_delta_version, resolve_version

    out = output if isinstance(output, Store) else Store(str(output))
    loc = DeltaLocation(out.fs, out.p(FLAGS))
    pointer = read_pointer(out)
    if as_of is None and not (pointer and pointer.get("flags_format") == "delta"):
        return _parquet_flags(out, current(out).join(FLAGS), pointer["result_id"] if pointer else None)
    if isinstance(as_of, str) and out.exists(RESULTS_DIR, as_of.strip(), FLAGS):  # a buckets result's own flags
        return _parquet_flags(out, out.join(RESULTS_DIR, as_of.strip(), FLAGS), as_of.strip())
    if not loc.exists():
        raise ConfigError(f"{out.uri(FLAGS)} is not a Delta table: no flags version {as_of!r} to read "
                          f"(results kept with their own flags: {_kept_ids(out) or 'none'})")
    dt = loc.open(what="flags")
    if as_of is None:
        version = int(pointer["flags_version"])
    else:
        version = resolve_version(dt, as_of)
    history = dt.history()  # of the current version (delta-rs numbers an older version's history wrongly)
    if not isinstance(as_of, int) and not (isinstance(as_of, str) and as_of.strip().isdigit()):
        version = _compacted(history, version)
    snap = open_delta_version(loc, version, what="flags", table=dt)
    rid = next((c.get(RESULT_ID_KEY) for c in history if int(c["version"]) <= version
                and c.get("operation") != "OPTIMIZE"), None)
    return Flags(out.uri(), rid, "delta", version, snap.dataset)


def _compacted(history: list[dict[str, Any]], version: int) -> int:
    """``version``, or the last of the compactions committed right after it (the same rows)."""
    later = sorted((int(c["version"]), c.get("operation")) for c in history if int(c["version"]) > version)
    for v, op in later:
        if op != "OPTIMIZE" or v != version + 1:
            break
        version = v
    return version


def _parquet_flags(out: Store, folder: Store, result_id: str | None) -> Flags:
    from odin_engine.io.scores import list_parquet_files

    files = list_parquet_files(out.fs, folder.path) if folder.exists() else []
    if not files:
        raise ConfigError(f"no flags in {folder.uri()}: {out.uri()} holds no committed decision result")
    return Flags(out.uri(), result_id, "buckets", None, ds.dataset(files, filesystem=out.fs, format="parquet"))


def _kept_ids(out: Store) -> list[str]:
    return sorted(posixpath.basename(i.path) for i in out.listdir(RESULTS_DIR)
                  if i.type == pafs.FileType.Directory) if out.exists(RESULTS_DIR) else []
