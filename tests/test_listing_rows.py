"""Every entry one row: random trees as a non-root user, S3 keys of every shape, split listing,
typed manifests, one error classification (issue 21)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from conftest import REPO, make_images
from _forkserver import run_command
from odin_engine.errors import ConfigError
from odin_engine.io import listing as L
from odin_engine.io.corpus import LISTING_ERROR, _stat_versions, list_unit, load_corpus, open_corpus
from odin_engine.io.failures import FINAL_PREFIXES, MESSAGES, is_retryable, kind_of, path_text, read_failure
from odin_engine.io.reading import ReadError, read_object

LOCAL = pafs.LocalFileSystem()
TEST_UID = 4242  # a uid with no passwd entry and no capabilities: "a user created for the test"

# Runs as the test user: walk the tree whole and by parts (tiny shards), print both as JSON.
_WALKER = """
import json, sys
from pyarrow import fs as pafs
from odin_engine.io import listing as L
L.SHARD_ENTRIES, L.MAX_PREFIX_PARTS = 2, int(sys.argv[2])
root, fs = sys.argv[1], pafs.LocalFileSystem()
whole = [[e.image_id, e.error] for e in L.walk(fs, root, root)]
parts = [[e.image_id, e.error] for p in L.plan_split(fs, root, root) for e in L.walk_part(fs, root, root, p)]
print(json.dumps({"whole": whole, "parts": parts}))
"""


def _as_test_user(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Run ``python args`` as a non-root user: ourselves when not root, else uid 4242 via ``setpriv``."""
    cmd = [sys.executable, *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and no `setpriv` (util-linux) to drop to a test user: permission "
                        "rules cannot be exercised")
        cmd = ["setpriv", f"--reuid={TEST_UID}", f"--regid={TEST_UID}", "--clear-groups", *cmd]
    env = dict(os.environ, HOME="/tmp", PYTHONPATH=str(REPO))
    return run_command(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def user_dir():
    """A world-traversable directory owned by the test user (pytest's tmp_path is root-only when root)."""
    d = Path(tempfile.mkdtemp(prefix="odin-rows-"))
    d.chmod(0o755)
    yield d
    for p, dirs, files in os.walk(d):
        for n in dirs:
            if not os.path.islink(os.path.join(p, n)):
                os.chmod(os.path.join(p, n), 0o755)
    shutil.rmtree(d)


def _own(root: Path) -> None:
    if os.geteuid() == 0:
        for p, dirs, files in os.walk(root):
            for n in [*dirs, *files]:
                os.chown(os.path.join(p, n), TEST_UID, TEST_UID, follow_symlinks=False)
        os.chown(root, TEST_UID, TEST_UID)


NAMES = ["a.png", "b.JPG", "c.txt", "d.jpeg", "e", "f.webp", os.fsdecode(b"caf\xe9 100%.png")]


def _random_tree(root: Path, rng: random.Random) -> list[tuple[Path, int]]:
    """A random tree: images, non-images, dirs, FIFOs, sockets, device nodes (root only), symlinks of
    every kind; returns the directory modes to apply last (after everything is created)."""
    modes, queue = [], [(root, 0)]
    while queue:
        d, depth = queue.pop(0)
        if True:
            for k in range(rng.randint(1, 5)):
                name = f"{k}{rng.choice(NAMES)}"
                p = d / name
                kind = rng.choice(["file", "file", "dir", "dir", "fifo", "sock", "dev", "link"])
                if kind == "file":
                    p.write_bytes(b"x" * rng.randint(0, 9))
                    p.chmod(rng.choice([0o644, 0o600, 0o000]))
                elif kind == "dir" and depth < 2:
                    p.mkdir()
                    queue.append((p, depth + 1))
                    modes.append((p, rng.choice([0o755, 0o755, 0o700, 0o500, 0o444, 0o311, 0o000, 0o100])))
                elif kind == "fifo":
                    os.mkfifo(p)
                elif kind == "sock" and len(str(p)) < 100:
                    s = socket.socket(socket.AF_UNIX)
                    s.bind(str(p))
                    s.close()
                elif kind == "dev" and os.geteuid() == 0:
                    os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
                elif kind == "link":
                    target = rng.choice(["nowhere.png", name, "..", ".", str(root), "../" + rng.choice(NAMES),
                                         str(root.parent / "outside.png"), f"{k}x.png"])
                    os.symlink(target, p)
    (root.parent / "outside.png").write_bytes(b"o")
    return modes


def _expected(root: Path) -> tuple[set[str], set[str]]:
    """As root: ids that need a row (image-named entries, symlinks to directories) and all directory ids."""
    need, dirs = set(), set()
    for p, dnames, fnames in os.walk(root):
        rel = os.path.relpath(p, root)
        rel = "" if rel == "." else "/".join(L.escape_name(os.fsencode(c)) for c in rel.split("/")) + "/"
        for n in dnames + fnames:
            full, n = os.path.join(p, n), L.escape_name(os.fsencode(n))
            if os.path.isdir(full) and not os.path.islink(full):
                dirs.add(rel + n)
            elif L.is_image_name(n) or (os.path.islink(full) and os.path.isdir(full)):
                need.add(rel + n)
    return need, dirs


@pytest.mark.parametrize("seed", range(12))
def test_random_trees_every_entry_has_a_row_or_an_error_ancestor(user_dir, seed):
    rng = random.Random(seed)
    root = user_dir / "tree"
    root.mkdir()
    modes = _random_tree(root, rng)
    need, dirs = _expected(root)
    _own(user_dir)
    for p, mode in reversed(modes):  # deepest first: chmod a parent last
        p.chmod(mode)
    proc = _as_test_user(["-c", _WALKER, str(root), str(rng.choice([0, 4096]))], cwd=str(user_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    whole = {i: e for i, e in got["whole"]}
    assert len(whole) == len(got["whole"]), "an id listed twice"
    assert sorted(map(tuple, got["parts"])) == sorted(map(tuple, got["whole"])), "split listing != whole walk"
    dir_errors = {i for i, e in whole.items() if e and e.startswith("unreadable directory:")}
    assert all(whole[d].endswith("its contents are not listed") for d in dir_errors)
    for i in need:
        parents = {"/".join(i.split("/")[:k]) for k in range(1, i.count("/") + 1)}
        assert i in whole or parents & dir_errors, f"seed {seed}: {i!r} has no row and no error ancestor"
    assert set(whole) <= need | dirs, f"rows for entries that are not images: {set(whole) - need - dirs}"
    for i, e in whole.items():
        if e is not None:
            assert kind_of(e) is not None and e.startswith(FINAL_PREFIXES) and "b'" not in e


def test_readable_but_not_traversable_directory_is_one_error_row(user_dir):
    """The reported case: r44/ (mode 0444) with r44/inner/ holding 5 images."""
    root = user_dir / "corpus"
    make_images(root / "r44" / "inner", 5)
    make_images(root / "r44", 2)
    make_images(root / "ok", 1)
    _own(user_dir)
    (root / "r44").chmod(0o444)
    proc = _as_test_user(["-c", _WALKER, str(root), "4096"], cwd=str(user_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = dict(json.loads(proc.stdout)["whole"])
    assert set(whole) == {"r44", "ok/img_00000.png"}
    assert whole["r44"].startswith("unreadable directory: PermissionError: [Errno 13]")
    assert whole["r44"].endswith("; its contents are not listed")


def test_an_unstatable_entry_of_any_name_is_a_row(tmp_path):
    """_child used to drop an entry whose stat failed unless its name looked like an image."""
    root = tmp_path / "c"
    make_images(root, 1)
    os.symlink("sub", root / "gone_dir")  # dangling, no image name: not an image, no row (classified)
    rows = {e.image_id: e.error for e in L.walk(LOCAL, str(root), str(root))}
    assert rows == {"img_00000.png": None}


# --------------------------------------------------------------------------- split listing
def test_flat_folder_is_split_into_shards_without_listing_in_the_caller(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(50):
        (root / f"{i:03d}.png").write_bytes(b"x")
    make_images(root / "sub", 2)
    monkeypatch.setattr(L, "SHARD_ENTRIES", 8)
    parts = L.plan_split(LOCAL, str(root), str(root))
    shards = [p for p in parts if p.kind == "shard"]
    assert len(shards) == 7 and [p.prefix for p in parts if p.kind == "prefix"] == ["sub/"]
    ids = [e.image_id for p in parts for e in L.walk_part(LOCAL, str(root), str(root), p)]
    assert sorted(ids) == sorted([f"{i:03d}.png" for i in range(50)] + ["sub/img_00000.png", "sub/img_00001.png"])
    sizes = [sum(1 for _ in L.walk_part(LOCAL, str(root), str(root), p)) for p in shards]
    assert max(sizes) < 20  # spread, not one shard with everything
    monkeypatch.setattr(L, "MAX_PREFIX_PARTS", 0)  # many sub-directories: the shards take them too
    parts = L.plan_split(LOCAL, str(root), str(root))
    assert all(p.kind == "shard" and p.with_dirs for p in parts)
    assert sorted(e.image_id for p in parts for e in L.walk_part(LOCAL, str(root), str(root), p)) == sorted(ids)


def _list_all(source: str) -> tuple[list[dict], int]:
    """What the job's driver loop does, in-process: run units, then the units they hand off."""
    src = open_corpus(source)
    pending, rows, n = list(src.units), [], 0
    while pending:
        more: list = []
        for t in list_unit(pending.pop(), src.carried, more=more):
            rows += t.to_pylist()
        pending += more
        n += 1
    return rows, n


def test_s3_keys_of_every_shape_are_listed_once(s3_server, s3_bucket, monkeypatch):
    client = s3_server.client()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    odd = ["c//top.png", "c/sub//x.png", "c/./d.png", "c/../e.png"]
    good = ["c/ok.png", "c/a.png", "c/a.png/b.png", "c/sub/y.png", "c/a.png.png", "c/ü %.png"]
    for k in odd + good + ["c/t.png/", "c/notes.txt", "cc/outside.png", "c.png"]:
        client.put_object(Bucket=s3_bucket, Key=k, Body=b"\x89PNG")
    for k in range(60):
        client.put_object(Bucket=s3_bucket, Key=f"c/n/{k:04d}.png", Body=b"x")
    monkeypatch.setattr(L, "PAGE_KEYS", 5)
    monkeypatch.setattr(L, "PAGES_PER_PART", 2)
    rows, tasks = _list_all(f"s3://{s3_bucket}/c")
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(odd) + len(good) + 60
    assert tasks > 3  # the key range split itself
    by_id = {r["image_id"]: r for r in rows}
    for k in good:  # ids round-trip: root + "/" + id is the key
        r = by_id[k[2:]]
        assert r[LISTING_ERROR] is None and r["uri"] == f"s3://{s3_bucket}/{k}" and read_object(r["uri"])
    for k in odd:
        r = by_id[k[2:]]
        assert r[LISTING_ERROR].startswith("unreadable key: ") and not is_retryable(r[LISTING_ERROR])
    for k in odd:  # as a manifest would give them: final, not 'read failed' (they never succeed)
        with pytest.raises(ReadError, match="^bad uri: s3://.* path segment"):
            read_object(f"s3://{s3_bucket}/{k}")
    assert load_corpus(f"s3://{s3_bucket}/c").table.num_rows == len(ids)  # the one-process listing agrees


def test_split_range_covers_the_rest_exactly():
    pieces = L.split_range("p/img_0000999.png", None, "p/")
    assert pieces[0][0] == "p/img_0000999.png" and pieces[-1][1] is None
    assert all(a < b for a, b in pieces[:-1]) and all(pieces[i][1] == pieces[i + 1][0] for i in range(len(pieces) - 1))
    assert "p/img_0001" in {b for _, b in pieces}
    bounded = L.split_range("p/a5", "p/b", "p/")
    assert bounded[-1][1] == "p/b" and all(b is None or b <= "p/b" for _, b in bounded)


# --------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("column,values,type_word", [
    ("uri", [[1, 2], [3]], "list<element: int64>"),
    ("uri", [{"a": 1}, {"a": 2}], "struct<a: int64>"),
    ("uri", [1, 2], "int64"),
    ("image_id", [1.0, float("nan")], "double"),
    ("image_id", [True, False], "bool"),
])
def test_manifest_columns_must_be_strings(tmp_path, column, values, type_word):
    data = {"uri": ["a.png", "b.png"], column: values}
    pq.write_table(pa.table(data), tmp_path / "m.parquet")
    with pytest.raises(ConfigError, match=f"column '{column}' has type {type_word.replace('<', '.').replace('>', '.')}"):
        open_corpus(str(tmp_path / "m.parquet"))
    pq.write_table(pa.table({"uri": pa.array(["a.png", "b.png"]).dictionary_encode(),
                             "image_id": pa.array(["x", "y"], pa.large_string())}), tmp_path / "ok.parquet")
    assert load_corpus(str(tmp_path / "ok.parquet")).table.column("image_id").to_pylist() == ["x", "y"]


@pytest.mark.parametrize("ids", [["x", None], ["x", ""], ["x", "  "]])
def test_empty_image_ids_are_a_configuration_error(tmp_path, ids):
    pq.write_table(pa.table({"uri": ["a.png", "b.png"], "image_id": ids}), tmp_path / "m.parquet")
    with pytest.raises(ConfigError, match="1 empty 'image_id' cells \\(rows 2\\)"):
        load_corpus(str(tmp_path / "m.parquet"))
    (tmp_path / "m.csv").write_text("uri,image_id\na.png,x\nb.png,\n")
    with pytest.raises(ConfigError, match="1 empty 'image_id' cells \\(lines 3\\)"):
        load_corpus(str(tmp_path / "m.csv"))


# --------------------------------------------------------------------------- error classification
def test_permanent_read_failures_are_final_and_transient_ones_retryable(tmp_path):
    cases = {
        "http://example.invalid/x.png": "bad uri:",
        "/proc/self/mem": "unreadable:",  # EIO, the same on every run
        str(tmp_path): "not a regular file:",
        str(tmp_path / "missing.png"): "read failed:",
    }
    for uri, prefix in cases.items():
        with pytest.raises(ReadError) as info:
            read_object(uri, attempts=1)
        assert str(info.value).startswith(prefix), (uri, str(info.value))
        assert is_retryable(str(info.value)) == (prefix == "read failed:")
    locked = tmp_path / "locked.png"
    locked.write_bytes(b"x")
    assert read_failure(PermissionError(13, "Permission denied", str(locked))).startswith("read failed:")
    assert read_failure(TimeoutError("timed out")).startswith("read failed:")
    assert read_failure(OSError("AWS Error SLOW_DOWN during GetObject"), attempts=4).endswith("(after 4 attempts)")


def test_paths_in_messages_are_text_with_percent_escapes(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9 100%.png")
    os.mkfifo(raw)
    with pytest.raises(ReadError) as info:
        read_object(os.fsdecode(raw))
    text = str(info.value)
    assert text.startswith("not a regular file: ") and "caf%E9 100%25.png is a FIFO" in text
    assert "b'" not in text and "\\udce9" not in text and "\\x" not in text
    assert path_text(b"a\nb\xff") == "a%0Ab%FF" and path_text("plain 100%") == "plain 100%"
    err = read_failure(FileNotFoundError(2, "No such file or directory", raw))
    assert err.endswith("caf%E9 100%25.png") and "b'" not in err


def test_special_files_have_versions_stable_across_runs():
    a = _stat_versions(["/proc/self/status", "/proc/cpuinfo"])
    b = _stat_versions(["/proc/self/status", "/proc/cpuinfo"])
    assert a == b == ["pseudo:proc", "pseudo:proc"]


def test_every_message_kind_is_documented():
    doc = (REPO / "docs" / "scoring-job.md").read_text()
    missing = [k.prefix for k in MESSAGES if f"`{k.prefix}" not in doc]
    assert not missing, f"docs/scoring-job.md does not list {missing}"
    assert {k.prefix for k in MESSAGES if k.retryable} == {"read failed:", "scoring failed:"}


def test_every_decode_and_read_message_has_a_kind(bad_images, tmp_path):
    """The messages the job writes for bad files all belong to a documented kind (and are final)."""
    from odin_engine.io.images import ImageDecodeError, decode_image

    seen = set()
    for name, data in bad_images.items():
        try:
            decode_image(data, 32)
        except ImageDecodeError as exc:
            kind = kind_of(str(exc))
            assert kind is not None and not kind.retryable, str(exc)
            seen.add(kind.prefix)
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 100)
    with pytest.raises(ReadError) as info:
        read_object(str(big), max_bytes=10)
    assert kind_of(str(info.value)).prefix == "file too large:"
    assert {"empty file:", "not an image", "truncated or corrupt:", "decompression bomb:"} <= seen
