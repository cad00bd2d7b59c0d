"""Plausibility checks: implausible settings exit 2 with a message that says what to fix, and nothing
is written. Normalization in 0–255 units, input size 0, class names that do not match the model,
files that are not checkpoints, a file given as the output directory, manifest problems by line."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_images
from jobs.cli import main as cli_main
from jobs.run_lock import RunLock
from odin_engine.errors import CheckpointError, ConfigError
from odin_engine.io.corpus import load_corpus
from odin_engine.loading import load_model


# --------------------------------------------------------------------------- mean / std
@pytest.mark.parametrize("mean, std, message", [
    ("125.3,123.0,113.9", None, r"mean must be in \[0, 1\] pixel units \(CLI: --mean\).*divide by 255, i\.e\. 0\.4914,0\.4824,0\.4467"),
    (None, "63.0,62.1,66.7", r"std must be in \[0, 1\] pixel units \(CLI: --std\).*divide by 255, i\.e\. 0\.2471,0\.2435,0\.2616"),
    (None, "0.2,0,0.2", r"std values must be > 0 \(CLI: --std\)"),
    ("-0.1,0.5,0.5", None, r"mean must be in \[0, 1\].*got -0\.1,0\.5,0\.5\.$"),
    ("nan,0.5,0.5", None, r"mean must be finite numbers"),
    ("0.5,0.5", None, r"mean must have 3 values"),
])
def test_normalization_outside_pixel_units_is_refused(tiny_model, mean, std, message):
    with pytest.raises(ConfigError, match=message):
        load_model(tiny_model.spec, tiny_model.weights, mean=mean, std=std)


def test_normalization_in_pixel_units_is_accepted(tiny_model):
    m = load_model(tiny_model.spec, tiny_model.weights, mean=[0, 0.5, 1], std="1,0.5,0.01")
    assert m.mean == (0.0, 0.5, 1.0) and m.std == (1.0, 0.5, 0.01)


def test_cli_normalization_in_0_255_units_exits_2_and_writes_nothing(tmp_path, tiny_model, capsys):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    make_images(corpus, 3)
    code = cli_main(["score", "--input", str(corpus), "--output", str(out), *tiny_model.cli,
                     "--mean", "125.3,123.0,113.9", "--std", "63.0,62.1,66.7"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "mean must be in [0, 1] pixel units (CLI: --mean)" in err and "divide by 255" in err


# --------------------------------------------------------------------------- input size
@pytest.mark.parametrize("size", [0, -3, 32.5, "abc", True])
def test_input_size_below_1_or_not_an_integer_is_refused(tiny_model, size):
    with pytest.raises(ConfigError, match=r"input_size must be an integer >= 1 \(CLI: --input-size\)"):
        load_model(tiny_model.spec, tiny_model.weights, input_size=size)


def test_input_size_0_is_not_taken_for_the_default(tmp_path, tiny_model, capsys):
    assert load_model(tiny_model.spec, tiny_model.weights, input_size=None).input_size == 32
    assert load_model(tiny_model.spec, tiny_model.weights, input_size="48").input_size == 48
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    make_images(corpus, 2)
    assert cli_main(["score", "--input", str(corpus), "--output", str(out), *tiny_model.cli, "--input-size", "0"]) == 2
    assert "got 0" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- class names
def test_class_names_must_match_the_models_classes(tiny_model):
    m = load_model(tiny_model.spec, tiny_model.weights)
    with pytest.raises(ConfigError, match=r"class_names has 3 names but the model has 10 classes \(CLI: --class-names\)"):
        m.check_class_names("a,b,c")
    with pytest.raises(ConfigError, match=r"empty names at positions \[2\]"):
        m.check_class_names("a,b,,d,e,f,g,h,i,j")
    names = [f"c{i}" for i in range(10)]
    assert m.check_class_names(names) == names and m.check_class_names(" , ".join(names)) == names


def test_audit_with_wrong_class_names_exits_2_before_scoring(tmp_path, tiny_model, capsys):
    corpus, heldout, out = tmp_path / "corpus", tmp_path / "heldout", tmp_path / "out"
    make_images(corpus, 3)
    make_images(heldout, 100)
    code = cli_main(["audit", "--corpus", str(corpus), "--heldout", str(heldout), "--output", str(out),
                     *tiny_model.cli, "--class-names", "a,b,c"])
    assert code == 2 and not out.exists()
    assert "3 names but the model has 10 classes" in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("content, says", [
    (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "an HTML/XML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n", "a Git LFS pointer"),
    ((20).to_bytes(8, "little") + b'{"a": {"dtype": "F32"}}', "a safetensors file"),
    (b"just some text", "expected a zip archive"),
    (b"", "is empty (0 bytes)"),
])
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, tiny_model, content, says, capsys):
    weights = tmp_path / "weights.th"
    weights.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_model.spec, str(weights))
    msg = str(info.value)
    assert says in msg and "arbitrary pickled objects" not in msg
    if content:
        assert "is not a PyTorch checkpoint (starts with " in msg
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    make_images(corpus, 2)
    assert cli_main(["score", "--input", str(corpus), "--output", str(out), "--model", tiny_model.spec,
                     "--weights", str(weights)]) == 2
    assert says in capsys.readouterr().err and not out.exists()


def test_real_checkpoints_still_load(tmp_path, tiny_model):
    state = torch.load(tiny_model.weights, weights_only=True)
    legacy = tmp_path / "legacy.th"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)  # the pre-1.6 pickle format
    assert load_model(tiny_model.spec, str(legacy)).num_classes == 10
    wrapped = tmp_path / "wrapped.th"
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    assert load_model(tiny_model.spec, str(wrapped)).num_classes == 10
    # a real pickle that needs arbitrary objects is still diagnosed as such
    evil = tmp_path / "evil.th"
    evil.write_bytes(pickle.dumps({"obj": ConfigError("x")}, protocol=2))
    with pytest.raises(CheckpointError, match="arbitrary pickled objects"):
        load_model(tiny_model.spec, str(evil))


# --------------------------------------------------------------------------- output that is a file
def test_a_file_as_output_is_refused_and_left_alone(tmp_path, tiny_model, capsys):
    corpus, out = tmp_path / "corpus", tmp_path / "results.parquet"
    make_images(corpus, 2)
    out.write_bytes(b"precious")
    assert cli_main(["score", "--input", str(corpus), "--output", str(out), *tiny_model.cli]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory: --output needs a directory" in err
    assert "another run" not in err and "pid -1" not in err
    assert out.read_bytes() == b"precious"


def test_audit_output_below_a_file_is_refused(tmp_path, tiny_model, capsys):
    corpus, heldout, out = tmp_path / "corpus", tmp_path / "heldout", tmp_path / "report.html"
    make_images(corpus, 3)
    make_images(heldout, 100)
    out.write_text("precious")
    assert cli_main(["audit", "--corpus", str(corpus), "--heldout", str(heldout), "--output", str(out),
                     *tiny_model.cli]) == 2
    err = capsys.readouterr().err
    # audit checks --output before it lists or scores anything (the score job's own lease check would say
    # "cannot be a directory: … is a file"): either way the file is named and nothing is written
    assert f"--output {out} is a file" in err and "pid -1" not in err
    assert out.read_text() == "precious"


def test_an_object_as_output_is_refused_on_s3(s3_server, s3_bucket):
    s3_server.client().put_object(Bucket=s3_bucket, Key="runs/out", Body=b"x")
    lock = RunLock(s3_server.filesystem(), f"{s3_bucket}/runs/out", display=f"s3://{s3_bucket}/runs/out")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        lock.check_free()


# --------------------------------------------------------------------------- manifest lines
def test_manifest_problems_are_named_by_file_line(tmp_path):
    make_images(tmp_path, 3)
    csv = tmp_path / "m.csv"
    # header = line 1; line 3 is blank (the reader skips it); empty paths on lines 4 and 6
    csv.write_text("path,label\nimg_00000.png,1\n\n,2\nimg_00001.png,3\n  ,4\n")
    with pytest.raises(ConfigError, match=r"2 empty 'path' cells \(lines 4, 6\)"):
        load_corpus(str(csv))
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["img_00000.png", None, "img_00002.png"]}), parquet)
    with pytest.raises(ConfigError, match=r"1 empty 'uri' cells \(rows 2\)"):
        load_corpus(str(parquet))
