"""Whole results: every decision output of one audit published at once (see docs/decision-stage.md).

Layout of an output directory ``DIR`` (``audit --output``, ``calibrate --output``)::

    DIR/results/<result-id>/      one audit's outputs, written whole, never changed afterwards:
                                   flags/part-<result-id>-RRR-KKKKK.parquet, flag_summary.json,
                                   calibration.json, evaluation.json, report.html, audit.json
    DIR/current.json              the pointer, written last: {"result_id", "path", …}. Writing it
                                   (rename on a local disk, one PUT on an object store) is the commit
    DIR/latest -> results/<id>    local disks only: a symlink swapped (rename) after the pointer
    DIR/flags -> latest/flags     local disks only: the stable names, fixed links through ``latest``
    DIR/audit.json -> latest/audit.json   (and calibration.json, flag_summary.json, evaluation.json,
                                   report.html)

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

from pyarrow import fs as pafs

from odin_engine.io.store import Store

RESULTS_DIR = "results"
POINTER = "current.json"
LATEST = "latest"
#: the names a plain reader of a local ``DIR`` may open directly (links through ``latest``)
STABLE_NAMES = ("flags", "audit.json", "calibration.json", "flag_summary.json", "evaluation.json", "report.html")
#: committed results kept: the current one and the ones before it that readers may still be reading
KEEP = 3
POINTER_VERSION = 1


def new_result_id() -> str:
    """``<UTC %Y%m%dT%H%M%SZ>-<6 hex>``: sorts by time, unique per run."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def read_pointer(out: Store) -> dict[str, Any] | None:
    """``DIR/current.json`` (None when ``DIR`` holds no committed result in this layout)."""
    try:
        doc = out.read_json(POINTER)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("path") else None


def current(out: Store) -> Store:
    """The Store of ``DIR``'s current complete result; ``DIR`` itself for an output written before
    results were published whole (its files then lie directly under ``DIR``)."""
    pointer = read_pointer(out)
    return out.join(pointer["path"]) if pointer else out


@dataclass
class Publication:
    """One result being written: ``store`` is its private directory; :meth:`commit` publishes it.

    Use under the output's lease (``jobs.run_lock.RunLock``): commit deletes result directories
    no committed pointer names, which only a dead run can have left.
    """

    out: Store
    result_id: str = field(default_factory=new_result_id)
    keep: int = KEEP

    def __post_init__(self) -> None:
        follow_pointer(self.out)  # a run killed between its commit and its links left `latest` behind

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

    def commit(self, **info: Any) -> dict[str, Any]:
        """Write the pointer (the commit), then make the local links follow it and remove results
        no reader needs any more. Returns the pointer."""
        before = read_pointer(self.out)
        kept = [self.result_id] + [r for r in (before or {}).get("kept", []) if r != self.result_id]
        pointer = {"version": POINTER_VERSION, "result_id": self.result_id, "path": self.path,
                   "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "kept": kept[: self.keep], **info}
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
    them once a result is committed in this layout (audit.json first, then the rest)."""
    for name in ("audit.json", "calibration.json", "flag_summary.json", "evaluation.json", "report.html", "flags"):
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
