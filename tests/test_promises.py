"""Promises the docs make that no other test held the code to.

* A file over the size limit (256 MiB by default) becomes one ``file too large`` error row; it is
  never read into memory.
* When a batch fails to score, the job scores its images one by one: the others get their scores,
  the one that breaks gets ``scoring failed: …``.
* A run that fails its exactly-once check exits 1 from the command line and says so in run.json.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import REPO, make_images
from _forkserver import run_command
from jobs.pipeline import MAX_FILE_BYTES, ScoreBatch, read_and_decode
from odin_engine.io.scores import output_schema
from odin_engine.loading import load_model


def _rows(paths) -> pa.Table:
    paths = [str(p) for p in paths]
    return pa.table({"image_id": [os.path.basename(p) for p in paths], "uri": paths})


# --------------------------------------------------------------------------- the file-size limit
def test_a_file_over_256_mib_is_one_error_row_and_is_never_read(tmp_path):
    assert MAX_FILE_BYTES == 256 * 1024 * 1024  # the documented default
    big = tmp_path / "huge.png"
    with open(big, "wb") as fh:  # sparse: 300 MiB long, a few KB on disk
        fh.write(Image.new("RGB", (8, 8)).tobytes())
        fh.truncate(300 * 1024 * 1024)
    assert big.stat().st_size > MAX_FILE_BYTES and big.stat().st_blocks * 512 < 1024 * 1024
    make_images(tmp_path, 2)
    good = sorted(tmp_path.glob("img_*.png"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = read_and_decode(_rows([good[0], big, good[1]]), size=32, policy="crop")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert out.num_rows == 3
    assert out.column("status").to_pylist() == ["ok", "error", "ok"]
    assert out.column("error")[1].as_py() == f"file too large: {300 * 1024 * 1024} bytes > {MAX_FILE_BYTES}"
    assert out.column("pixels")[1].as_py() is None
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB: the file was read"


def test_max_bytes_sets_the_limit(tmp_path):
    (p,) = make_images(tmp_path, 1)
    size = p.stat().st_size
    at_limit = read_and_decode(_rows([p]), size=32, policy="crop", max_bytes=size)
    assert at_limit.column("status").to_pylist() == ["ok"]  # the limit itself is allowed
    over = read_and_decode(_rows([p]), size=32, policy="crop", max_bytes=size - 1)
    assert over.column("status").to_pylist() == ["error"]
    assert over.column("error")[0].as_py() == f"file too large: {size} bytes > {size - 1}"


# --------------------------------------------------------------------------- one image breaks its batch
WHITE_INPUT = (1.0 - 0.5) / 0.25  # what an all-white (255) pixel becomes after this model's normalization


class RefusesWhite(nn.Module):
    """A small real classifier whose forward raises on an all-white image (as a model with a
    data-dependent check would): one such image makes its whole batch fail to score."""

    mean, std, input_size = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        white = (x >= WHITE_INPUT - 1e-4).flatten(1).all(dim=1)
        if bool(white.any()):
            raise ValueError(f"cannot classify an all-white image ({int(white.sum())} in this batch)")
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def refuses_white() -> nn.Module:
    """``test_promises:refuses_white``: the factory spec the job loads."""
    return RefusesWhite()


def test_a_batch_that_fails_to_score_is_scored_image_by_image(tmp_path):
    make_images(tmp_path, 5, size=16)
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "img_00002_white.png")
    paths = sorted(tmp_path.glob("*.png"))
    decoded = read_and_decode(_rows(paths), size=16, policy="crop")
    assert decoded.column("status").to_pylist() == ["ok"] * 6
    spec = "test_promises:refuses_white"
    model = load_model(spec)
    score = ScoreBatch(spec, None, list(model.mean), list(model.std), model.input_size, 1000.0, 0.0014, 64,
                       model.model_id, "run-1", 1, False, output_schema().serialize().to_pybytes(), device="cpu")
    with pytest.raises(ValueError, match="all-white"):  # the batch as a whole cannot be scored
        score._score(decoded.column("pixels").to_pylist())
    out = score(decoded).to_pydict()
    (w,) = [i for i, name in enumerate(out["image_id"]) if "white" in name]
    assert len(out["image_id"]) == 6
    assert out["status"] == ["error" if i == w else "ok" for i in range(6)]
    assert out["error"][w] == "scoring failed: ValueError: cannot classify an all-white image (1 in this batch)"
    assert out["odin"][w] is None and out["pred"][w] is None
    # the others carry exactly the scores they get on their own
    from odin_engine.scorer import OdinScorer

    alone = OdinScorer(model, temperature=1000.0, epsilon=0.0014, device="cpu").score(
        np.stack([np.frombuffer(p, np.uint8).reshape(16, 16, 3)
                  for i, p in enumerate(decoded.column("pixels").to_pylist()) if i != w]))
    got = [v for i, v in enumerate(out["odin"]) if i != w]
    np.testing.assert_allclose(got, alone["odin"], rtol=1e-6)


# --------------------------------------------------------------------------- exactly-once failure → exit 1
@pytest.mark.slow
def test_a_run_that_fails_its_exactly_once_check_exits_1(ray_head, tmp_path, tiny_model):
    """Real state, real command, the bucket-file layout (``--table-format buckets``, where every file
    in ``scores/`` is part of the table): score a corpus, then put a second copy of a committed score
    file beside it (as a botched copy or sync would); rerunning the same command must refuse the
    output as not exactly-once — exit 1, run.json saying why — rather than report success."""
    corpus = tmp_path / "corpus"
    make_images(corpus, 12)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.score", "--input", str(corpus), "--output", str(out), *tiny_model.cli,
           "--batch-size", "4", "--workers", "1", "--table-format", "buckets"]
    env = ray_head.env  # the session's cluster: which cluster is not the point here
    first = run_command(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["verification"]["exactly_once"] is True
    assert json.loads((out / "_odin_job.json").read_text())["layout"]["format"] == "buckets"
    committed = sorted(p for p in (out / "scores").rglob("*.parquet") if not p.name.startswith((".", "_")))
    assert committed
    shutil.copyfile(committed[0], committed[0].with_name("copy-of-" + committed[0].name))
    copied = pq.read_metadata(committed[0]).num_rows
    second = run_command(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    # the copy is no bucket's file: its rows would be every image a second time in the table readers see
    assert run["verification"]["exactly_once"] is False
    assert any("copy-of-" in f for f in run["verification"]["stray_files"]), run["verification"]
    assert copied == 12 and run["verification"]["rows"] == 12  # the buckets themselves still hold each image once
    assert "exactly once: False" in second.stdout + second.stderr


@pytest.mark.slow
def test_a_delta_score_table_ignores_stray_files_and_heals_rows_another_writer_duplicated(ray_head, tmp_path,
                                                                                         tiny_model):
    """The Delta layout (the default): a file copied into ``scores/`` is in no version, so no reader
    of the table sees it; rows another writer appended a second time *are* in the table — the
    next run keeps one row per image, removes the copies in its one version, and verifies."""
    from deltalake import DeltaTable, write_deltalake

    from odin_engine.io.scores import ScoreTable

    corpus = tmp_path / "corpus"
    make_images(corpus, 12)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.score", "--input", str(corpus), "--output", str(out), *tiny_model.cli,
           "--batch-size", "4", "--workers", "1"]
    first = run_command(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    scores = out / "scores"
    some = sorted(p for p in scores.glob("*.parquet"))[0]
    shutil.copyfile(some, scores / ("copy-of-" + some.name))
    assert ScoreTable.open(str(out)).count() == 12  # the stray copy is no part of the table
    table = DeltaTable(str(scores))
    seen = table.version()
    write_deltalake(str(scores), pa.table(table.to_pyarrow_dataset().to_table()), mode="append")  # a botched append
    assert ScoreTable.open(str(out)).count() == 24
    second = run_command(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    att = run["attempts"][-1]
    assert run["verification"]["exactly_once"] is True and run["verification"]["rows"] == 12
    assert att["scored"] == 0 and att["table"]["rows_kept"] == 12 and att["table"]["rows_written"] == 0
    ids = ScoreTable.open(str(out)).read(["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(p.name for p in corpus.iterdir())
    assert att["table"]["version"] == seen + 2  # after the botched append: the healing run's one version
