"""Directory walk: every image below a root exactly once, on any tree (no Ray).

:func:`walk` yields one :class:`Entry` per image file, or per thing the walk meets but cannot
use, sorted by ``image_id``. :func:`plan_split` cuts a tree into :class:`Part` objects that parallel
tasks list with :func:`walk_part`, together covering the tree exactly once, without this process
holding any per-file list (hash shards of a flat folder, sub-directories, S3 key ranges that
split themselves); :func:`split_points` is the older cut (top-level entries + sub-prefixes).

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
  regular file: …`` (reading a FIFO would block forever). An entry that cannot be classified —
  its ``stat`` or ``readlink`` fails — gives ``unreadable entry: …`` *whatever its name*; a
  directory that cannot be listed (no ``r``) or traversed (no ``x``) gives one ``unreadable
  directory: …; its contents are not listed`` entry (id: its path), which stands for everything
  below it. A directory met again below itself (a bind-mount loop: same device
  and inode as an ancestor) gives one ``directory loop: …`` entry and is not entered.
* **Names that are not UTF-8**: each such path component's ``image_id`` part is escaped
  reversibly: every byte that is not part of valid UTF-8 becomes ``%XX`` (upper-case hex) and
  every literal ``%`` becomes ``%25``; components that are valid UTF-8 are left as they are.
  (So ``b"caf\\xe9.jpg"`` → ``caf%E9.jpg``.) The ``uri`` of such a file is an RFC 8089
  ``file://`` URI with the whole path percent-encoded (``file:///data/caf%E9.jpg``), which
  :func:`odin_engine.io.reading.read_object` decodes back to the raw bytes. The one ambiguity —
  a valid name spelled like an escaped one (``caf%E9.jpg``) beside its undecodable twin in the
  same directory — gives both the same id, which the listing reports as a duplicate id.

Object stores (``s3://``, ``gs://``) have no symlinks. With boto3 installed, an ``s3://`` prefix
is listed as key ranges (:func:`list_keys`: ``ListObjectsV2`` with ``StartAfter``, botocore's
retries), every key exactly once whatever its slashes; otherwise a prefix is listed with
pyarrow's ``FileSelector`` (recursive below a prefix; non-recursive at the top for
:func:`split_points`), transient failures retried as reads are. ``image_id`` is the key after the
prefix, verbatim; a key that the store clients cannot read (:func:`odd_key`: an empty, ``.`` or
``..`` segment) is a final ``unreadable key: …`` entry. Paths in messages are text
(:func:`odin_engine.io.failures.path_text`).

Error entries carry ``error`` (a one-line message starting with one of the kinds above, see
:data:`LISTING_ERROR_KINDS`) and ``size``/``mtime_ns`` ``None``; the scoring job turns them into
``status='error'`` rows without reading anything. Listing the start directory itself fails with
``OSError`` (the caller decides: a configuration error for the corpus root).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Iterator

from pyarrow import fs as pafs

from odin_engine.errors import short_error
from odin_engine.io.failures import is_transient, os_error_line, path_text
from odin_engine.io.reading import backoff_s

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LISTING_ERROR_KINDS = ("directory symlink not followed", "dangling symlink", "symlink loop", "not a regular file",
                       "unreadable entry", "unreadable directory", "directory loop", "unreadable key")


NOT_LISTED = "; its contents are not listed"
# pseudo filesystems: their files' mtimes (and sizes) change on every stat, their bytes are no images
PSEUDO_FILESYSTEMS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "debugfs", "tracefs", "securityfs", "cgroup",
                                "cgroup2", "configfs", "pstore", "bpf", "efivarfs", "fusectl", "mqueue", "hugetlbfs"})


@dataclass(frozen=True)
class Entry:
    """One listed item: an image (``error`` None) or something the walk met but cannot use.

    ``version``, when set, replaces ``size:mtime_ns`` as the entry's version (a file on a pseudo
    filesystem: ``pseudo:<fstype>``, stable across runs).
    """

    image_id: str
    uri: str
    size: int | None
    mtime_ns: int | None
    error: str | None = None
    version: str | None = None


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[dict[int, str], tuple[tuple[str, str], ...]]:
    """``({st_dev: fstype}, ((mount point, fstype), … longest first))`` from ``/proc/self/mountinfo``."""
    devs, points = {}, []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                major, minor = fields[2].split(":")
                fstype = right.split()[0]
                devs[os.makedev(int(major), int(minor))] = fstype
                points.append((fields[4].replace("\\040", " "), fstype))
    except (OSError, ValueError, IndexError):
        pass
    return devs, tuple(sorted(points, key=lambda p: -len(p[0])))


def stable_version(st: os.stat_result) -> str | None:
    """``pseudo:<fstype>`` for a file on a pseudo filesystem (/proc, /sys, …), else None (use size:mtime_ns)."""
    fstype = _mounts()[0].get(st.st_dev)
    return f"pseudo:{fstype}" if fstype in PSEUDO_FILESYSTEMS else None


@functools.lru_cache(maxsize=1)
def _pseudo_prefixes() -> tuple[str, ...]:
    return tuple(point.rstrip("/") + "/" for point, fstype in _mounts()[1] if fstype in PSEUDO_FILESYSTEMS)


def pseudo_version(path: str) -> str | None:
    """:func:`stable_version` by path (longest mount point that contains ``path``), for manifests' local paths."""
    if not path.startswith(_pseudo_prefixes()):  # the common case, one C call
        return None
    path = os.path.abspath(path)
    for point, fstype in _mounts()[1]:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return f"pseudo:{fstype}" if fstype in PSEUDO_FILESYSTEMS else None
    return None


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
    """Classify one directory entry → (sort key, Entry | (path, "rel/", (dev, ino)) for a directory | None).

    ``None`` only for an entry classified as *not an image* (a regular file, FIFO, … whose name has
    no image extension, or a symlink with such a name); an entry that cannot be classified (its
    ``stat`` or ``readlink`` fails) is an error entry whatever its name.
    """
    name = escape_name(de.name)
    rel, image = id_prefix + name, is_image_name(name)
    is_dir = False
    try:
        if de.is_symlink():
            target = path_text(os.readlink(de.path))
            try:
                st = os.stat(de.path)
            except FileNotFoundError:
                return name, _error(rel, de.path, f"dangling symlink: target '{target}' does not exist") if image else None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                return name, _error(rel, de.path, f"symlink loop: '{target}' leads back to itself") if image else None
            if stat.S_ISDIR(st.st_mode):
                return name, _error(rel, de.path, f"directory symlink not followed: {rel} -> {target}")
        elif de.is_dir(follow_symlinks=False):
            is_dir = True
            st = de.stat(follow_symlinks=False)
            return name + "/", (de.path, rel + "/", (st.st_dev, st.st_ino))
        elif not image:
            return name, None
        else:
            st = de.stat(follow_symlinks=False)
    except OSError as exc:
        if is_dir:
            return name + "/", _error(rel, de.path, f"unreadable directory: {os_error_line(exc)}{NOT_LISTED}")
        return name, _error(rel, de.path, f"unreadable entry: {os_error_line(exc)}")
    if not image:
        return name, None
    if not stat.S_ISREG(st.st_mode):
        return name, _error(rel, de.path, f"not a regular file: {rel} is a {_kind(st.st_mode)}")
    return name, Entry(rel, local_uri(de.path), int(st.st_size), int(st.st_mtime_ns), None,
                       stable_version(st))


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return word
    return "special file"


def _children(dir_b: bytes, id_prefix: str) -> list[tuple[str, object]]:
    """Sorted children of one directory; directories sort as ``name/``, so the walk is globally sorted."""
    if not os.access(dir_b, os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        # readable but not traversable (mode r--): names could be read, nothing below them
        raise PermissionError(errno.EACCES, "no search (x) permission: cannot be traversed", dir_b)
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
            yield _error(rel[:-1], path, f"unreadable directory: {os_error_line(exc)}{NOT_LISTED}")
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
            entries.append(store_entry(rel, f"{scheme}://{info.path}", info.size, info.mtime_ns))
        elif info.type == pafs.FileType.Directory and not recursive:
            dirs.append(rel + "/")
    return sorted(entries, key=lambda e: e.image_id), sorted(dirs)


def odd_key(key: str) -> str | None:
    """Why pyarrow's S3/GCS clients cannot read an object key (empty, ``.`` or ``..`` path segment), else None."""
    parts = key.split("/")
    if any(p == "" for p in parts):
        return "an empty path segment ('//' or a leading '/')"
    if any(p in (".", "..") for p in parts):
        return "a '.' or '..' path segment"
    return None


def store_entry(image_id: str, uri: str, size: int | None, mtime_ns: int | None) -> Entry:
    """An object-store key's entry: an image, or a final ``unreadable key`` error when no read can succeed."""
    why = odd_key(uri.split("://", 1)[1].split("/", 1)[1] if "/" in uri.split("://", 1)[1] else "")
    if why:
        return Entry(image_id, uri, size, mtime_ns,
                     f"unreadable key: {path_text(uri)} has {why}, which the store client refuses to read; "
                     "rename the object")
    return Entry(image_id, uri, size, mtime_ns, None)


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
        yield _error(start[:-1], os.path.join(root_b, os.fsencode(start[:-1])),
                     f"unreadable directory: {os_error_line(exc)}{NOT_LISTED}")
        return
    yield from _walk_local(kids, ancestors)


def split_points(fs: pafs.FileSystem, root: str, source: str) -> tuple[list[Entry], list[str]]:
    """``(entries directly in root, sub-prefixes)``: ``entries`` + ``walk(start=p)`` for each p = the whole walk.

    Prefixes are relative and end in ``/`` (``"sub/"``), sorted. Raises ``OSError`` when ``root``
    cannot be listed. (Holds the root's entries in memory: the job uses :func:`plan_split`.)
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        entries, dirs = _list_store(fs, root.rstrip("/"), "", source, recursive=False)
        if any(odd_key(d[:-1]) for d in dirs):  # a '//' key: its "sub-prefix" would list the prefix again
            return [], [""]
        return entries, dirs
    kids = [payload for _, payload in _children(os.fsencode(root), "")]
    return [k for k in kids if isinstance(k, Entry)], [k[1] for k in kids if not isinstance(k, Entry)]


# --------------------------------------------------------------------------- splitting among listing tasks
SHARD_ENTRIES = 131072  # directory entries per listing task when a folder's own entries are split …
MAX_SHARDS = 64  # … into at most this many tasks (each reads the folder's names once: more costs more readdir)
MAX_PREFIX_PARTS = 4096  # more sub-directories than this: they are split among the shards too
PAGE_KEYS = 1000  # keys per listing request (the S3 API's maximum)
list_requests = 0  # ListObjectsV2 requests this process made (the benchmark reports it)
PAGES_PER_PART = 16  # object-store listing pages (1,000 keys each) one task lists before it hands off the rest


@dataclass(frozen=True)
class Part:
    """One listing task's share of a tree, small enough to ship as a task argument.

    * ``kind="shard"``: the root's own entries whose ``crc32(raw name) % shards == shard`` (local
      disk), and — when ``with_dirs`` — the whole subtrees of its sub-directories in that shard;
    * ``kind="prefix"``: the sub-directory ``prefix`` (``walk(start=prefix)``);
    * ``kind="keys"``: the object keys ``k`` below the root with ``after < k <= upto`` (``upto``
      None: no end), listed page by page from ``after`` with the S3 API's ``StartAfter``.
    """

    kind: str
    shard: int = 0
    shards: int = 1
    with_dirs: bool = False
    prefix: str = ""
    after: str = ""
    upto: str | None = None


@functools.lru_cache(maxsize=1)
def _s3_client():
    """A boto3 S3 client, one per process (honours ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` included), or None without boto3."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8}))


def _root_key(root: str) -> tuple[str, str]:
    """``bucket/some/prefix`` → ``("bucket", "some/prefix/")`` (``""`` for a whole bucket)."""
    bucket, _, key = root.strip("/").partition("/")
    return bucket, (key + "/" if key else "")


def plan_split(fs: pafs.FileSystem, root: str, source: str) -> list[Part]:
    """Cut a tree into :class:`Part` objects, keeping nothing per file in this process.

    Local disk: one pass over the root's names (``readdir`` only, no ``stat``) counts its own
    entries and collects sub-directory names while there are at most :data:`MAX_PREFIX_PARTS`;
    the entries are split into ``min(MAX_SHARDS, ceil(n / SHARD_ENTRIES))`` hash shards (a task
    writes its rows in chunks as it goes, so its memory does not grow with its share), each sub-directory is one
    ``prefix`` part (or, beyond the cap, the shards take the sub-directories too). ``s3://`` with
    boto3 installed: one ``keys`` part for the whole prefix, which splits itself as it is listed
    (:func:`list_keys`). Other stores: :func:`split_points`' sub-prefixes plus one part for the
    top-level objects. Raises ``OSError`` when ``root`` cannot be listed.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        if isinstance(fs, pafs.S3FileSystem) and _s3_client() is not None:
            return [Part("keys")]
        entries, prefixes = split_points(fs, root, source)
        if not prefixes:
            # Some GCS APIs (the emulator) list no sub-prefixes without a delimiter reply: one task
            # walks the whole prefix recursively, which is right whatever the store answered.
            return [Part("prefix", prefix="")]
        return [Part("prefix", prefix=p) for p in prefixes] + ([Part("shard")] if entries else [])
    root_b = os.fsencode(root)
    if not os.access(root_b, os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise PermissionError(errno.EACCES, "no search (x) permission: cannot be traversed", root)
    n_files, dirs = 0, []
    with os.scandir(root_b) as it:
        for de in it:
            if de.is_dir(follow_symlinks=False):
                if dirs is not None:
                    dirs.append(escape_name(de.name) + "/")
                    if len(dirs) > MAX_PREFIX_PARTS:
                        n_files, dirs = n_files + len(dirs), None
            else:
                n_files += 1
    shards = min(MAX_SHARDS, max(1, -(-n_files // SHARD_ENTRIES)))
    if dirs is None:
        return [Part("shard", k, shards, with_dirs=True) for k in range(shards)]
    return ([Part("shard", k, shards) for k in range(shards)] if n_files else []) + [
        Part("prefix", prefix=d) for d in sorted(dirs)]


def _in_shard(raw: bytes, part: Part) -> bool:
    return part.shards == 1 or zlib.crc32(raw) % part.shards == part.shard


def walk_part(fs: pafs.FileSystem, root: str, source: str, part: Part, more: list | None = None) -> Iterator[Entry]:
    """The entries of one :class:`Part` (unsorted across directories).

    ``keys`` parts: with ``more`` a list, at most :data:`PAGES_PER_PART` pages are listed and the
    rest of the range is appended to ``more`` as new parts; with ``more`` None the whole range is
    listed here.
    """
    if part.kind == "prefix":
        yield from walk(fs, root, source, start=part.prefix)
        return
    if part.kind == "keys":
        yield from list_keys(root, source, part, more)
        return
    if not isinstance(fs, pafs.LocalFileSystem):  # top-level objects of a store prefix
        yield from _list_store(fs, root.rstrip("/"), "", source, recursive=False)[0]
        return
    root_b = os.fsencode(root)
    ancestors = (_dir_ident(root_b),)
    with os.scandir(root_b) as it:
        for de in it:
            if not _in_shard(de.name, part):
                continue
            key, payload = _child("", de)
            if isinstance(payload, Entry):
                yield payload
            elif payload is not None and part.with_dirs:
                yield from _walk_local([(key, payload)], ancestors)


# --------------------------------------------------------------------------- S3 keys, page by page
def _next_char(c: str) -> str | None:
    n = ord(c) + 1
    n = 0xE000 if 0xD800 <= n <= 0xDFFF else n
    return chr(n) if n <= 0x10FFFF else None


def split_range(last: str, upto: str | None, floor: str, first: str | None = None) -> list[tuple[str, str | None]]:
    """``(last, upto]`` → consecutive ranges ``(a, b]`` covering it, geometrically growing.

    Boundaries are ``last`` with one character incremented, from the last character back to the
    first one after ``floor`` (the root's key prefix) — starting, when ``first`` (the first key the
    part listed) is given, at the first character where ``first`` and ``last`` differ, so that the
    first range is about one part's worth of keys: for ``img_0000999.png`` they fall after
    ``img_000099*``, ``img_00009*``, ``img_0000*``, … so the ranges hold about 10, 100, 1,000, …
    keys of a dense numbered folder, and the last, open one is split again when it is listed.
    """
    bounds = []
    top = len(last) - 1 if first is None else min(len(last) - 1, len(os.path.commonprefix([first, last])))
    for j in range(top, len(floor) - 1, -1):
        nxt = _next_char(last[j])
        if nxt is None:
            continue
        b = last[:j] + nxt
        if b > last and (upto is None or b < upto) and (not bounds or b > bounds[-1]):
            bounds.append(b)
    edges = [last, *bounds]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)] + [(edges[-1], upto)]


def _mtime_ns(dt) -> int:
    import calendar

    return calendar.timegm(dt.utctimetuple()) * 1_000_000_000 + dt.microsecond * 1000


def list_keys(root: str, source: str, part: Part, more: list | None = None) -> Iterator[Entry]:
    """Keys ``after < k <= upto`` below ``root`` (``bucket/prefix``), as entries (see :func:`walk_part`)."""
    global list_requests
    client = _s3_client()
    if client is None:
        raise OSError("listing s3:// by key ranges needs boto3 (pip install boto3)")
    bucket, key_prefix = _root_key(root)
    scheme = source.split("://", 1)[0]
    kwargs = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": PAGE_KEYS}
    after, pages, first = max(part.after, ""), 0, None
    while True:
        args = dict(kwargs, StartAfter=after) if after else kwargs
        try:
            page = client.list_objects_v2(**args)
        except Exception as exc:  # noqa: BLE001 - botocore retried transient causes already
            raise OSError(f"cannot list s3://{bucket}/{key_prefix}: {short_error(exc)}") from None
        pages, list_requests = pages + 1, list_requests + 1
        contents = page.get("Contents", [])
        first = first or (contents[0]["Key"] if contents else None)
        for obj in contents:
            key = obj["Key"]
            if part.upto is not None and key > part.upto:
                return
            rel = key[len(key_prefix):]
            if is_image_name(rel):
                yield store_entry(rel, f"{scheme}://{bucket}/{key}", int(obj["Size"]), _mtime_ns(obj["LastModified"]))
        if not page.get("IsTruncated") or not contents:
            return
        after = contents[-1]["Key"]
        if more is not None and pages >= PAGES_PER_PART:
            more.extend(Part("keys", after=a, upto=b) for a, b in split_range(after, part.upto, key_prefix, first))
            return
