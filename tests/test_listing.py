"""The directory walk on hostile trees: symlink loops, dangling and self-looping links, names that
are not UTF-8, FIFOs, vanished directories; object-store prefixes on moto's real S3 API; and the
whole `odin-audit score` over such a tree on a real Ray head."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from conftest import REPO, make_images
from _forkserver import run_command
from odin_engine.io.corpus import LISTING_ERROR, load_corpus
from odin_engine.io.images import decode_image
from odin_engine.io.listing import Entry, escape_name, split_points, unescape_name, walk
from odin_engine.io.reading import ReadError, read_object
from jobs.pipeline import read_and_decode

LOCAL = pafs.LocalFileSystem()
RAW_NAME = b"caf\xe9 100%.png"  # Latin-1 é: not UTF-8
RAW_ID = "odd/caf%E9 100%25.png"


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""

    def _raise(*_):
        raise TimeoutError(f"did not finish within {seconds}s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def hostile_tree(root: Path) -> Path:
    """50 images in nested folders + one with a non-UTF-8 name, two directory-symlink loops, a
    dangling and a self-looping symlink, and files that are not images."""
    make_images(root / "a", 20)
    make_images(root / "a" / "b", 15, prefix="deep_")
    make_images(root / "c", 15, fmt="jpg", prefix="C_")
    (root / "odd").mkdir()
    png = (root / "a" / "img_00000.png").read_bytes()
    with open(os.path.join(os.fsencode(root / "odd"), RAW_NAME), "wb") as fh:
        fh.write(png)
    os.symlink("../..", root / "a" / "b" / "uplink")  # loop 1: back to the root
    os.symlink("../c", root / "c" / "self_dir")  # loop 2: into itself
    os.symlink("nowhere.png", root / "c" / "dangling.png")
    os.symlink("selfloop.jpg", root / "selfloop.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def _by_id(entries: list[Entry]) -> dict[str, Entry]:
    return {e.image_id: e for e in entries}


def test_walk_terminates_on_loops_and_lists_every_file_once(tmp_path):
    root = hostile_tree(tmp_path / "corpus")
    with deadline(30):
        entries = list(walk(LOCAL, str(root), str(root)))
    ids = [e.image_id for e in entries]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    assert ids == sorted(ids)
    ok = [e for e in entries if e.error is None]
    assert len(ok) == 51 and RAW_ID in {e.image_id for e in ok}
    errors = {e.image_id: e.error for e in entries if e.error is not None}
    assert errors == {
        "a/b/uplink": "directory symlink not followed: a/b/uplink -> ../..",
        "c/self_dir": "directory symlink not followed: c/self_dir -> ../c",
        "c/dangling.png": "dangling symlink: target 'nowhere.png' does not exist",
        "selfloop.jpg": "symlink loop: 'selfloop.jpg' leads back to itself",
    }
    for e in ok:
        assert e.size == os.stat(e.uri if "://" not in e.uri else unescape_name(e.uri[7:])).st_size > 0
        assert e.mtime_ns and e.mtime_ns > 0
    assert all(e.size is None and e.mtime_ns is None for e in entries if e.error)


def test_split_points_cover_the_tree_exactly_once(tmp_path):
    root = hostile_tree(tmp_path / "corpus")
    whole = list(walk(LOCAL, str(root), str(root)))
    top, prefixes = split_points(LOCAL, str(root), str(root))
    assert prefixes == ["a/", "c/", "odd/"]
    assert [e.image_id for e in top] == ["selfloop.jpg"]
    parts = top + [e for p in prefixes for e in walk(LOCAL, str(root), str(root), start=p)]
    assert sorted(parts, key=lambda e: e.image_id) == whole
    # a prefix for a directory with a name that is not UTF-8 is walked too
    nested = tmp_path / "nested"
    (nested / "x").mkdir(parents=True)
    raw_dir = os.path.join(os.fsencode(nested / "x"), b"\xff\xfe dir")
    os.mkdir(raw_dir)
    with open(os.path.join(raw_dir, b"p.png"), "wb") as fh:
        fh.write((root / "a" / "img_00001.png").read_bytes())
    assert split_points(LOCAL, str(nested), str(nested)) == ([], ["x/"])
    (e,) = walk(LOCAL, str(nested), str(nested), start="x/%FF%FE dir/")
    assert e.image_id == "x/%FF%FE dir/p.png" and e.error is None and e.size > 0


def test_a_prefix_that_cannot_be_listed_is_one_error_entry(tmp_path):
    root = tmp_path / "corpus"
    make_images(root / "gone", 2)
    make_images(root / "kept", 1)
    _, prefixes = split_points(LOCAL, str(root), str(root))
    for p in (root / "gone").iterdir():
        p.unlink()
    (root / "gone").rmdir()  # vanished between split_points and the task that walks it
    (err,) = list(walk(LOCAL, str(root), str(root), start=prefixes[0]))
    assert err.image_id == "gone" and err.error.startswith("unreadable directory: FileNotFoundError")
    with pytest.raises(ValueError, match="ending in '/'"):
        list(walk(LOCAL, str(root), str(root), start="kept"))
    with pytest.raises(OSError):  # the root itself: the caller's configuration error
        list(walk(LOCAL, str(tmp_path / "nowhere"), "nowhere"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads directories whatever their mode")
def test_an_unreadable_directory_is_one_error_entry(tmp_path):
    root = tmp_path / "corpus"
    make_images(root / "locked", 2)
    make_images(root, 1)
    (root / "locked").chmod(0)
    try:
        entries = _by_id(list(walk(LOCAL, str(root), str(root))))
    finally:
        (root / "locked").chmod(0o755)
    assert entries["locked"].error.startswith("unreadable directory: PermissionError")
    assert entries["img_00000.png"].error is None and len(entries) == 2


def test_non_utf8_name_escaping_is_reversible_and_its_uri_reads(tmp_path):
    root = hostile_tree(tmp_path / "corpus")
    e = _by_id(list(walk(LOCAL, str(root), str(root))))[RAW_ID]
    assert escape_name(RAW_NAME) == "caf%E9 100%25.png" and unescape_name("caf%E9 100%25.png") == RAW_NAME
    assert escape_name("ünï cödé 100%.png".encode()) == "ünï cödé 100%.png"  # valid UTF-8 is left alone
    assert e.uri.startswith("file://") and e.uri.endswith("/odd/caf%E9%20100%25.png")
    data = read_object(e.uri)
    assert data == (root / "a" / "img_00000.png").read_bytes()
    assert decode_image(data, 32)[0].shape == (32, 32, 3)


def test_file_symlinks_fifos_and_non_images(tmp_path):
    root = tmp_path / "corpus"
    outside = make_images(tmp_path / "elsewhere", 1)[0]
    inside = make_images(root, 1)[0]
    os.symlink(outside, root / "from_outside.png")
    os.symlink(inside.name, root / "alias.png")
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "pipe.txt")  # not an image name: ignored
    os.symlink("nowhere", root / "dangling_no_ext")  # not an image name: ignored
    with deadline(20):
        entries = _by_id(list(walk(LOCAL, str(root), str(root))))
        with pytest.raises(ReadError, match="^not a regular file: .* is a FIFO"):
            read_object(str(root / "pipe.jpg"))  # reading a FIFO must not block
    assert set(entries) == {"alias.png", "from_outside.png", "img_00000.png", "pipe.jpg"}
    assert entries["from_outside.png"].size == outside.stat().st_size and entries["from_outside.png"].error is None
    assert entries["alias.png"].uri == str(root / "alias.png")
    assert entries["pipe.jpg"].error == "not a regular file: pipe.jpg is a FIFO"


def test_corpus_listing_carries_listing_errors_and_the_job_turns_them_into_rows(tmp_path):
    root = hostile_tree(tmp_path / "corpus")
    corpus = load_corpus(str(root))
    t = corpus.table
    assert t.num_rows == 55 and LISTING_ERROR in t.column_names
    assert sum(v is not None for v in t.column(LISTING_ERROR).to_pylist()) == 4
    out = read_and_decode(t, 32, "crop")
    rows = {r["image_id"]: r for r in out.to_pylist()}
    assert sum(r["status"] == "ok" for r in rows.values()) == 51 and rows[RAW_ID]["status"] == "ok"
    assert rows["c/dangling.png"]["error"].startswith("dangling symlink")
    assert rows["a/b/uplink"]["status"] == "error"
    clean = tmp_path / "clean"
    make_images(clean, 3)
    assert load_corpus(str(clean)).table.column(LISTING_ERROR).null_count == 3  # a clean tree: no listing error


def test_object_store_prefixes(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    png = make_images(tmp_path / "imgs", 1)[0].read_bytes()
    keys = ["root/top.png", "root/notes.txt", "root/a/x.PNG", "root/a/b/y.jpg", "root/c d/z.png", "other/no.png"]
    for k in keys:
        client.put_object(Bucket=s3_bucket, Key=k, Body=png)
    fs = s3_server.filesystem()
    src = f"s3://{s3_bucket}/root"
    whole = list(walk(fs, f"{s3_bucket}/root", src))
    assert [e.image_id for e in whole] == ["a/b/y.jpg", "a/x.PNG", "c d/z.png", "top.png"]
    assert whole[0].uri == f"s3://{s3_bucket}/root/a/b/y.jpg" and whole[0].size == len(png) and whole[0].mtime_ns > 0
    top, prefixes = split_points(fs, f"{s3_bucket}/root", src)
    assert [e.image_id for e in top] == ["top.png"] and prefixes == ["a/", "c d/"]
    parts = top + [e for p in prefixes for e in walk(fs, f"{s3_bucket}/root", src, start=p)]
    assert sorted(parts, key=lambda e: e.image_id) == whole


@pytest.mark.slow
def test_score_over_a_hostile_tree(ray_head, tiny_model, tmp_path):
    root = hostile_tree(tmp_path / "corpus")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.cli", "score", "--input", str(root), "--output", str(out), *tiny_model.cli,
            "--batch-size", "16", "--shard-rows", "20"]
    proc = run_command(args, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from odin_engine.io.scores import ScoreTable

    t = ScoreTable.open(str(out)).read()
    ids = t.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 55
    rows = {r["image_id"]: r for r in t.to_pylist()}
    ok = {i for i, r in rows.items() if r["status"] == "ok"}
    assert len(ok) == 51 and RAW_ID in ok and rows[RAW_ID]["odin"] is not None
    assert rows["c/dangling.png"]["error"].startswith("dangling symlink")
    assert rows["selfloop.jpg"]["error"].startswith("symlink loop")
    assert {i for i, r in rows.items() if r["status"] == "error"} == {
        "c/dangling.png", "selfloop.jpg", "a/b/uplink", "c/self_dir"}
    assert LISTING_ERROR not in t.column_names
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"ok": 51, "error": 4, "total": 55} and run["verification"]["exactly_once"]


def test_object_store_listing_retries_transient_failures(s3_server, s3_bucket, tmp_path):
    """Listing through a real flaky TCP proxy in front of moto: a glitch longer than pyarrow's own
    retries is ridden out; a store that stays down raises (the caller's error)."""
    from test_reading import FlakyProxy

    png = make_images(tmp_path / "imgs", 1)[0].read_bytes()
    s3_server.client().put_object(Bucket=s3_bucket, Key="root/a/x.png", Body=png)
    port = int(s3_server.endpoint.rsplit(":", 1)[1])

    def fs_via(proxy):
        return pafs.S3FileSystem(endpoint_override=proxy.endpoint, scheme="http", access_key="testing",
                                 secret_key="testing", region="us-east-1")

    down = FlakyProxy(port, fail=10**6, mode="503")
    with pytest.raises(OSError, match="SLOW_DOWN"):
        list(walk(fs_via(down), f"{s3_bucket}/root", f"s3://{s3_bucket}/root"))
    per_call = down.seen // 4  # 4 attempts, each spending pyarrow's own retries
    assert per_call >= 1 and down.seen == 4 * per_call
    flaky = FlakyProxy(port, fail=per_call + 1, mode="503")
    (e,) = walk(fs_via(flaky), f"{s3_bucket}/root", f"s3://{s3_bucket}/root")
    assert e.image_id == "a/x.png" and e.size == len(png)
    down.close(), flaky.close()
