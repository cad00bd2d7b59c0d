"""Directory walk: every image below a root exactly once, on any tree (no Ray).

:func:`walk` yields one :class:`Entry` per image file, or per thing the walk meets but cannot
use, sorted by ``image_id``; :func:`split_points` cuts a tree into top-level entries and
sub-prefixes that parallel tasks each ``walk(..., start=prefix)``, together covering the tree
exactly once.

Rules on a local disk (walked with ``os.scandir`` on raw byte names, never following a link):

* Image files: names ending in :data:`IMAGE_EXTENSIONS` (case-insensitive). ``image_id`` is the
  path relative to the root, with ``/``.
* A **directory symlink is never followed** and gives **one error entry** (``directory symlink
  not followed: … → target``), whatever its name: a loop cannot form, the corpus is not entered
  twice, and a linked-in directory is visible instead of silently missing. (The root itself may be
  a symlink: the user named it.) To score a linked directory, pass its target as ``--input``
  or list its files in a manifest.
* A **file symlink** whose target is a regular file (inside or outside the tree) is an image like
  any other; its id and uri are the link's path, size and mtime the target's. Two links to one
  file are two images.
* Symlinks that cannot be resolved give one error entry each when their name ends in an image
  extension: ``dangling symlink: …`` (target missing), ``symlink loop: …`` (self-looping or
  cyclic links). A non-regular file with an image name (FIFO, socket, device) gives ``not a
  regular file: …`` (reading a FIFO would block forever). An entry whose ``stat`` fails gives
  ``unreadable entry: …``; a directory that cannot be listed gives one ``unreadable directory:
  …`` entry (id: its path). A directory met again below itself (a bind-mount loop: same device
  and inode as an ancestor) gives one ``directory loop: …`` entry and is not entered.
* **Names that are not UTF-8**: each such path component's ``image_id`` part is escaped
  reversibly: every byte that is not part of valid UTF-8 becomes ``%XX`` (upper-case hex) and
  every literal ``%`` becomes ``%25``; components that are valid UTF-8 are left as they are.
  (So ``b"caf\\xe9.jpg"`` → ``caf%E9.jpg``.) The ``uri`` of such a file is an RFC 8089
  ``file://`` URI with the whole path percent-encoded (``file:///data/caf%E9.jpg``), which
  :func:`odin_engine.io.reading.read_object` decodes back to the raw bytes. The one ambiguity —
  a valid name spelled like an escaped one (``caf%E9.jpg``) beside its undecodable twin in the
  same directory — gives both the same id, which the listing reports as a duplicate id.

Object stores (``s3://``, ``gs://``) have no symlinks: a prefix is listed with pyarrow's
``FileSelector`` (recursive below a prefix; non-recursive at the top for :func:`split_points`),
transient failures retried as reads are (:mod:`odin_engine.io.reading`).

Error entries carry ``error`` (a one-line message starting with one of the kinds above, see
:data:`LISTING_ERROR_KINDS`) and ``size``/``mtime_ns`` ``None``; the scoring job turns them into
``status='error'`` rows without reading anything. Listing the start directory itself fails with
``OSError`` (the caller decides: a configuration error for the corpus root).
"""

from __future__ import annotations

import errno
import os
import stat
import time
import urllib.parse
from dataclasses import dataclass
from typing import Iterator

from pyarrow import fs as pafs

from odin_engine.errors import short_error
from odin_engine.io.reading import backoff_s, is_transient

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LISTING_ERROR_KINDS = ("directory symlink not followed", "dangling symlink", "symlink loop", "not a regular file",
                       "unreadable entry", "unreadable directory", "directory loop")


@dataclass(frozen=True)
class Entry:
    """One listed item: an image (``error`` None) or something the walk met but cannot use."""

    image_id: str
    uri: str
    size: int | None
    mtime_ns: int | None
    error: str | None = None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- names that are not UTF-8
def escape_name(raw: bytes) -> str:
    """A path component's id: itself when valid UTF-8, else undecodable bytes as ``%XX`` and ``%`` as ``%25``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "surrogateescape")
        return "".join(
            f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else "%25" if c == "%" else c for c in text
        )


def unescape_name(name: str) -> bytes:
    """Inverse of :func:`escape_name` for an escaped component (``%XX`` → byte XX)."""
    return urllib.parse.unquote_to_bytes(name)


def local_uri(path: bytes) -> str:
    """A local file's uri: the plain path when it is UTF-8, else a percent-encoded ``file://`` URI."""
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return "file://" + urllib.parse.quote(path, safe="/")


# --------------------------------------------------------------------------- local disk
def _error(image_id: str, path: bytes, message: str) -> Entry:
    return Entry(image_id, local_uri(path), None, None, message.replace("\n", " "))


def _child(id_prefix: str, de: os.DirEntry) -> tuple[str, Entry | tuple[bytes, str, tuple] | None]:
    """Classify one directory entry → (sort key, Entry | (path, "rel/", (dev, ino)) for a directory | None)."""
    name = escape_name(de.name)
    rel, image = id_prefix + name, is_image_name(name)
    try:
        if de.is_symlink():
            target = os.fsdecode(os.readlink(de.path))
            try:
                st = os.stat(de.path)
            except FileNotFoundError:
                return name, _error(rel, de.path, f"dangling symlink: target {target!r} does not exist") if image else None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                return name, _error(rel, de.path, f"symlink loop: {target!r} leads back to itself") if image else None
            if stat.S_ISDIR(st.st_mode):
                return name, _error(rel, de.path, f"directory symlink not followed: {rel} -> {target}")
        elif de.is_dir(follow_symlinks=False):
            st = de.stat(follow_symlinks=False)
            return name + "/", (de.path, rel + "/", (st.st_dev, st.st_ino))
        elif not image:
            return name, None
        else:
            st = de.stat(follow_symlinks=False)
    except OSError as exc:
        return name, _error(rel, de.path, f"unreadable entry: {short_error(exc)}") if image else None
    if not image:
        return name, None
    if not stat.S_ISREG(st.st_mode):
        return name, _error(rel, de.path, f"not a regular file: {rel} is a {_kind(st.st_mode)}")
    return name, Entry(rel, local_uri(de.path), int(st.st_size), int(st.st_mtime_ns), None)


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return word
    return "special file"


def _children(dir_b: bytes, id_prefix: str) -> list[tuple[str, object]]:
    """Sorted children of one directory; directories sort as ``name/``, so the walk is globally sorted."""
    with os.scandir(dir_b) as it:
        kids = [_child(id_prefix, de) for de in it]
    return sorted((k for k in kids if k[1] is not None), key=lambda k: k[0])


def _walk_local(kids: list, ancestors: tuple) -> Iterator[Entry]:
    """Depth-first over already-listed ``kids``; ``ancestors`` are the (dev, ino) of the directories above."""
    stack = [(iter(kids), ancestors)]
    while stack:
        it, anc = stack[-1]
        item = next(it, None)
        if item is None:
            stack.pop()
            continue
        payload = item[1]
        if isinstance(payload, Entry):
            yield payload
            continue
        path, rel, ident = payload
        if ident in anc:
            yield _error(rel[:-1], path, f"directory loop: {rel[:-1]} is one of its own ancestors")
            continue
        try:
            sub = _children(path, rel)
        except OSError as exc:
            yield _error(rel[:-1], path, f"unreadable directory: {short_error(exc)}")
            continue
        stack.append((iter(sub), anc + (ident,)))


def _resolve_start(root_b: bytes, start: str) -> bytes:
    """The directory named by ``start`` (id form, e.g. ``"sub/caf%E9/"``) below ``root_b``."""
    path = root_b
    for part in [p for p in start.split("/") if p]:
        for raw in (part.encode("utf-8"), unescape_name(part)):
            cand = os.path.join(path, raw)
            if escape_name(raw) == part and os.path.isdir(cand) and not os.path.islink(cand):
                path = cand
                break
        else:
            raise FileNotFoundError(f"no directory {start!r} below the corpus root")
    return path


def _dir_ident(path: bytes) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# --------------------------------------------------------------------------- object stores
def _file_infos(fs: pafs.FileSystem, selector: pafs.FileSelector, attempts: int = 4) -> list[pafs.FileInfo]:
    """``fs.get_file_info(selector)``, transient failures (throttling, network, 5xx) retried with backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fs.get_file_info(selector)
        except OSError as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            time.sleep(backoff_s(attempt))
    raise AssertionError("unreachable")


def _list_store(fs: pafs.FileSystem, base: str, prefix: str, source: str, recursive: bool):
    scheme = source.split("://", 1)[0]
    infos = _file_infos(fs, pafs.FileSelector(f"{base}/{prefix}".rstrip("/"), recursive=recursive))
    entries, dirs = [], []
    for info in infos:
        rel = info.path[len(base) + 1:]
        if info.type == pafs.FileType.File and is_image_name(rel):
            entries.append(Entry(rel, f"{scheme}://{info.path}", info.size, info.mtime_ns, None))
        elif info.type == pafs.FileType.Directory and not recursive:
            dirs.append(rel + "/")
    return sorted(entries, key=lambda e: e.image_id), sorted(dirs)


# --------------------------------------------------------------------------- API
def walk(fs: pafs.FileSystem, root: str, source: str, start: str = "") -> Iterator[Entry]:
    """Every image (and every unusable entry, as an error entry) below ``root/start``, sorted by image_id.

    ``root`` is the path inside ``fs`` (as from :func:`odin_engine.io.store.resolve`), ``source``
    the user's spelling (its scheme is kept in uris); ``start`` is ``""`` or a prefix from
    :func:`split_points` (``"sub/"``). Ids are always relative to ``root``. Raises ``OSError``
    when ``root`` itself cannot be listed, or an object-store prefix cannot be listed after
    retries; a local ``start`` directory that cannot be listed is one ``unreadable directory``
    entry, as the whole walk would give.
    """
    if start and not start.endswith("/"):
        raise ValueError(f"start must be '' or a prefix ending in '/'; got {start!r}")
    if not isinstance(fs, pafs.LocalFileSystem):
        yield from _list_store(fs, root.rstrip("/"), start, source, recursive=True)[0]
        return
    root_b = os.fsencode(root)
    if not start:
        yield from _walk_local(_children(root_b, ""), (_dir_ident(root_b),))
        return
    try:
        path = _resolve_start(root_b, start)
        ancestors = (_dir_ident(root_b), _dir_ident(path))
        kids = _children(path, start)
    except OSError as exc:
        yield _error(start[:-1], os.path.join(root_b, os.fsencode(start[:-1])), f"unreadable directory: {short_error(exc)}")
        return
    yield from _walk_local(kids, ancestors)


def split_points(fs: pafs.FileSystem, root: str, source: str) -> tuple[list[Entry], list[str]]:
    """``(entries directly in root, sub-prefixes)``: ``entries`` + ``walk(start=p)`` for each p = the whole walk.

    Prefixes are relative and end in ``/`` (``"sub/"``), sorted. Raises ``OSError`` when ``root``
    cannot be listed.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        return _list_store(fs, root.rstrip("/"), "", source, recursive=False)
    kids = [payload for _, payload in _children(os.fsencode(root), "")]
    return [k for k in kids if isinstance(k, Entry)], [k[1] for k in kids if not isinstance(k, Entry)]
