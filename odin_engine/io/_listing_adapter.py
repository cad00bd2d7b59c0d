"""TEMPORARY stand-in for helper B2's odin_engine.io.listing (same interface); removed once it lands."""

from __future__ import annotations

from dataclasses import dataclass

from pyarrow import fs as pafs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Entry:
    image_id: str
    uri: str
    size: int | None
    mtime_ns: int | None
    error: str | None = None


def _uri(fs, path, source):
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{source.split('://', 1)[0]}://{path}"


def _list(fs, base, prefix, source, recursive):
    infos = fs.get_file_info(pafs.FileSelector(f"{base}/{prefix}".rstrip("/"), recursive=recursive))
    entries, dirs = [], []
    for info in infos:
        rel = info.path[len(base) + 1:]
        if info.type == pafs.FileType.File and rel.lower().endswith(IMAGE_EXTENSIONS):
            entries.append(Entry(rel, _uri(fs, info.path, source), info.size, info.mtime_ns, None))
        elif info.type == pafs.FileType.Directory and not recursive:
            dirs.append(rel + "/")
    return sorted(entries, key=lambda e: e.image_id), sorted(dirs)


def walk(fs, root, source, start=""):
    yield from _list(fs, root.rstrip("/"), start, source, True)[0]


def split_points(fs, root, source):
    return _list(fs, root.rstrip("/"), "", source, False)
