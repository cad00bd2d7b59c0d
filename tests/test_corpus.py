"""odin_engine.io.corpus: directory trees and manifests, local and on a real S3 API (moto server)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.csv  # noqa: F401 - pa.csv
import pyarrow.parquet as pq
import pytest

from conftest import make_images
from odin_engine.io.corpus import count_rows, load_corpus, open_corpus
from odin_engine.io.store import read_bytes
from odin_engine.errors import ConfigError


def test_directory_is_listed_recursively_case_insensitively(tmp_path):
    root = tmp_path / "root"
    make_images(root, 2, fmt="png")
    make_images(root / "sub dir" / "ünï", 2, fmt="jpg", prefix="p_")
    (root / "UPPER.PNG").write_bytes((root / "img_00000.png").read_bytes())
    (root / "notes.txt").write_text("not listed")
    (root / "sub dir" / "a.JPEG").write_bytes(b"")  # listed: a zero-byte image becomes an error row later
    c = load_corpus(str(root))
    ids = c.table.column("image_id").to_pylist()
    assert ids == sorted(ids)
    assert set(ids) == {"img_00000.png", "img_00001.png", "UPPER.PNG", "sub dir/a.JPEG",
                        "sub dir/ünï/p_00000.jpg", "sub dir/ünï/p_00001.jpg"}
    uris = dict(zip(ids, c.table.column("uri").to_pylist()))
    assert read_bytes(uris["sub dir/ünï/p_00000.jpg"]) == (root / "sub dir" / "ünï" / "p_00000.jpg").read_bytes()
    assert c.kind == "directory" and c.carried_columns == []
    # file:// is the same corpus
    assert load_corpus(f"file://{root}").table.column("image_id").to_pylist() == ids


def test_manifest_csv_relative_paths_and_carried_columns(tmp_path):
    make_images(tmp_path / "imgs", 3)
    (tmp_path / "m.csv").write_text(
        "path,label,split\nimgs/img_00002.png,2,test\nimgs/img_00000.png,0,train\n"
        f"{tmp_path}/imgs/img_00001.png,1,train\nimgs/missing.png,5,test\n"
    )
    c = load_corpus(str(tmp_path / "m.csv"))
    assert c.table.column("image_id").to_pylist() == [
        "imgs/img_00000.png", "imgs/img_00001.png", "imgs/img_00002.png", "imgs/missing.png"]
    assert c.table.column("label").to_pylist() == [0, 1, 2, 5]
    assert c.table.column("split").to_pylist() == ["train", "train", "test", "test"]
    assert c.carried_columns == ["label", "split"]
    assert os.path.isabs(c.table.column("uri")[0].as_py())


def test_manifest_parquet_with_image_id(tmp_path):
    paths = make_images(tmp_path, 2)
    pq.write_table(pa.table({"uri": [str(p) for p in paths], "image_id": ["b", "a"]}), tmp_path / "m.parquet")
    c = load_corpus(str(tmp_path / "m.parquet"))
    assert c.table.column("image_id").to_pylist() == ["a", "b"]
    assert c.table.column("uri").to_pylist() == [str(paths[1]), str(paths[0])]


def test_carried_columns_take_the_types_a_delta_table_stores(tmp_path):
    """A uint8 label (class index 200) and a categorical split: delta-rs would read uint8 back as
    int8 (200 → −56), so the carried columns are int16 and string from the listing on."""
    from deltalake import DeltaTable, write_deltalake

    m = tmp_path / "m.parquet"
    split = pa.array(["test", "val", "test"]).dictionary_encode()
    pq.write_table(pa.table({"path": ["a.png", "b.png", "c.png"], "label": pa.array([200, 7, 255], pa.uint8()),
                             "split": split}), m)
    c = load_corpus(str(m))
    assert c.table.schema.field("label").type == pa.int16() and c.table.schema.field("split").type == pa.string()
    assert c.table.column("label").to_pylist() == [200, 7, 255]
    write_deltalake(str(tmp_path / "t"), c.table.select(["image_id", "label", "split"]))
    back = DeltaTable(str(tmp_path / "t")).to_pyarrow_table().sort_by("image_id")
    assert back.column("label").to_pylist() == [200, 7, 255]
    assert back.column("split").to_pylist() == ["test", "val", "test"]


def test_an_output_whose_carried_types_this_version_widens_is_told_so():
    """An output scored by an earlier odin-audit with a uint8 label: its rerun is refused (exit 2)
    with the reason — the type changed here, not in the manifest."""
    from jobs.score import _widened

    assert _widened([["label", "uint8"], ["split", "string"]], [["label", "int16"], ["split", "string"]]) == \
        "label uint8 → int16"
    assert _widened([["label", "int64"]], [["label", "string"]]) == ""  # the manifest changed: the usual message
    assert _widened(None, [["label", "int16"]]) == ""


def test_count_rows_agrees_with_the_listing_in_bounded_memory(tmp_path):
    """count_rows (what `audit` checks held-out sizes with, instead of listing the corpus in the
    driver) gives the listing's count for a tree and both manifest kinds, and the split counts."""
    make_images(tmp_path / "tree" / "a", 3)
    make_images(tmp_path / "tree" / "b" / "c", 2)
    tree = str(tmp_path / "tree")
    assert count_rows(open_corpus(tree)) == len(load_corpus(tree)) == 5
    n = 70_000  # more than one listing batch (65,536 rows)
    splits = ["heldout" if i % 7 == 0 else ("train" if i % 7 == 1 else None) for i in range(n)]
    table = pa.table({"uri": [f"x/{i}.png" for i in range(n)], "split": splits})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=20_000)
    pa.csv.write_csv(table, tmp_path / "m.csv")
    want = sum(1 for v in splits if v == "heldout")
    for name in ("m.parquet", "m.csv"):
        src = open_corpus(str(tmp_path / name))
        assert count_rows(src) == n
        assert count_rows(src, split="heldout") == want
        assert count_rows(src, split="nope") == 0
    with pytest.raises(ConfigError, match="`split` column"):
        count_rows(open_corpus(tree), split="heldout")


def test_duplicates_are_listed(tmp_path):
    pq.write_table(pa.table({"uri": ["x.png", "y.png", "z.png", "w.png"], "image_id": ["a", "a", "b", "b"]}),
                   tmp_path / "m.parquet")
    with pytest.raises(ConfigError, match=r"duplicate image_id.*'a'×2, 'b'×2"):
        load_corpus(str(tmp_path / "m.parquet"))


@pytest.mark.parametrize("case", ["missing", "empty_dir", "empty_manifest", "no_uri_column", "not_manifest",
                                  "empty_cells", "blank"])
def test_bad_sources_are_config_errors(tmp_path, case):
    src = {
        "missing": tmp_path / "nope",
        "empty_dir": tmp_path / "empty",
        "empty_manifest": tmp_path / "e.csv",
        "no_uri_column": tmp_path / "n.csv",
        "not_manifest": tmp_path / "x.png",
        "empty_cells": tmp_path / "c.csv",
        "blank": "",
    }[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    (tmp_path / "e.csv").write_text("uri,label\n")
    (tmp_path / "n.csv").write_text("file,label\na.png,1\n")
    (tmp_path / "x.png").write_bytes(b"x")
    (tmp_path / "c.csv").write_text("uri\na.png\n\"\"\n")
    with pytest.raises(ConfigError) as info:
        load_corpus(str(src))
    assert str(info.value)


def test_s3_directory_and_manifest(s3_server, s3_bucket, monkeypatch, tmp_path):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    client = s3_server.client()
    paths = make_images(tmp_path, 3)
    for p in paths:
        client.put_object(Bucket=s3_bucket, Key=f"corpus/a b/{p.name}", Body=p.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="corpus/readme.md", Body=b"skip me")
    c = load_corpus(f"s3://{s3_bucket}/corpus")
    assert c.table.column("image_id").to_pylist() == [f"a b/{p.name}" for p in paths]
    uri = c.table.column("uri")[0].as_py()
    assert uri == f"s3://{s3_bucket}/corpus/a b/{paths[0].name}"
    assert read_bytes(uri) == paths[0].read_bytes()
    client.put_object(Bucket=s3_bucket, Key="m.csv",
                      Body=f"uri,label\ncorpus/a b/{paths[1].name},1\ns3://{s3_bucket}/nokey.png,0\n".encode())
    m = load_corpus(f"s3://{s3_bucket}/m.csv")
    assert m.table.column("image_id").to_pylist() == [f"corpus/a b/{paths[1].name}", "nokey.png"]
    assert m.table.column("uri").to_pylist()[0] == f"s3://{s3_bucket}/corpus/a b/{paths[1].name}"
    with pytest.raises(OSError):
        read_bytes(f"s3://{s3_bucket}/nokey.png")
