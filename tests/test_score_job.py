"""The scoring job end to end, with real parts: a real Ray head with token auth, real
``ray job submit``, moto's real S3 API, real process kills."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ALARM, BAD_EXPECT, REPO, _with_descendants, make_images, pids_matching, process_cmdlines
from _forkserver import run_command, start_command
from jobs.cli import main as cli_main

SCORE_COLS = ["image_id", "uri", "status", "error", "width", "height", "pred", "msp", "max_logit", "energy",
              "odin", "gen", "scale", "ash_s", "react", "knn", "vim", "nci", "fdbd", "adascale",
              "temperature", "epsilon", "model_id", "run_id", "scored_at", "version"]
DOC = REPO / "docs" / "scoring-job.md"


def read_scores(out: Path) -> pa.Table:
    """The score table's current rows (a Delta table: its log names the files; never a glob), without
    the ``bucket`` column the Delta layout adds (checked in the tests of the layout)."""
    from odin_engine.io.scores import ScoreTable

    t = ScoreTable.open(str(out)).read()
    return t.drop_columns(["bucket"]) if "bucket" in t.column_names else t


def assert_exactly_once(out: Path, expected_ids: set[str]) -> pa.Table:
    t = read_scores(out)
    ids = t.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows"
    assert set(ids) == expected_ids, f"missing {sorted(expected_ids - set(ids))[:5]} extra {sorted(set(ids) - expected_ids)[:5]}"
    run = json.loads((out / "run.json").read_text())
    assert run["verification"]["exactly_once"] is True
    assert run["counts"]["total"] == len(expected_ids)
    return t


def job_cmd(corpus, out, tiny_model, *extra) -> list[str]:
    return [sys.executable, "-m", "jobs.score", "--input", str(corpus), "--output", str(out), *tiny_model.cli,
            "--temperature", "1000", "--epsilon", "0.0014", *extra]


def run_job(args, env, timeout=300) -> subprocess.CompletedProcess:
    return run_command(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- bad configuration: exit 2, nothing written
@pytest.mark.parametrize("case", ["empty_corpus", "missing_corpus", "missing_weights", "unknown_model", "bad_T",
                                  "zero_T", "bad_eps", "bad_batch", "bad_mean", "no_input", "bad_config_key",
                                  "tuning_and_T", "tuning_other_model", "tuning_missing", "small_object_store"])
def test_bad_configuration_exits_2_and_writes_nothing(tmp_path, tiny_model, case, capsys):
    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    args = ["score", "--input", str(corpus), "--output", str(out), *tiny_model.cli]
    if case == "empty_corpus":
        args[2] = str(tmp_path / "empty")
    elif case == "missing_corpus":
        args[2] = str(tmp_path / "nowhere")
    elif case == "missing_weights":
        args[args.index("--weights") + 1] = str(tmp_path / "nope.pt")
    elif case == "unknown_model":
        args[args.index("--model") + 1] = "resnet_forty_two"
    elif case == "bad_T":
        args += ["--temperature", "nan"]
    elif case == "zero_T":
        args += ["--temperature", "0"]
    elif case == "bad_eps":
        args += ["--epsilon", "2"]
    elif case == "bad_batch":
        args += ["--batch-size", "0"]
    elif case == "bad_mean":
        args += ["--mean", "0.5,0.5"]
    elif case == "small_object_store":
        args += ["--object-store-mib", "8"]
    elif case == "no_input":
        args = ["score", "--output", str(out), *tiny_model.cli]
    elif case == "bad_config_key":
        (tmp_path / "c.toml").write_text("[score]\ntemprature = 10\n")
        args += ["--config", str(tmp_path / "c.toml")]
    elif case.startswith("tuning"):
        tuning = tmp_path / "tuning.json"
        tuning.write_text(json.dumps({"temperature": 20.0, "epsilon": 0.002, "model_id": "other_net@sha256:0"}))
        if case == "tuning_missing":
            tuning = tmp_path / "no-tuning.json"
        args += ["--tuning", str(tuning)] + (["--temperature", "5"] if case == "tuning_and_T" else [])
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip()) > 20
    assert not out.exists()


def test_output_directory_that_is_not_a_run_is_refused(tmp_path, tiny_model, capsys):
    corpus = tmp_path / "corpus"
    make_images(corpus, 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert cli_main(["score", "--input", str(corpus), "--output", str(out), *tiny_model.cli]) == 2
    assert "holds no odin score run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_help_and_config_file_are_wired(tmp_path, tiny_model):
    from jobs.options import parse_with_config
    import argparse

    from jobs import score

    (tmp_path / "c.toml").write_text(f'[score]\ninput = "x"\ntemperature = 10.0\nbatch-size = 8\nworkers = 3\n')
    parser = argparse.ArgumentParser()
    score.build_parser(parser)
    args = parse_with_config(parser, ["--config", str(tmp_path / "c.toml"), "--temperature", "20"], "score")
    assert (args.input, args.temperature, args.batch_size, args.workers) == ("x", 20.0, 8, 3)
    # --help for real, through the console entry point: usage, every flag, the config file's flag
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "score", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: odin-audit score")
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert len(flags) > 20 and flags <= set(re.findall(r"--[a-z][a-z-]*", p.stdout)) and "--config TOML" in p.stdout


# --------------------------------------------------------------------------- ray job submit against a real head
@pytest.mark.slow
def test_ray_job_submit_end_to_end_then_resume_and_refuse(ray_head, tiny_model, tmp_path, bad_images):
    corpus = tmp_path / "corpus dir"
    make_images(corpus / "a", 40, prefix="ok_")
    (corpus / "b ünï").mkdir()
    for name in ("corrupt.png", "zero_byte.png", "rgba.png"):
        (corpus / "b ünï" / name).write_bytes(bad_images[name])
    out = tmp_path / "out"
    args = ["python", "-m", "jobs.score", "--input", str(corpus), "--output", str(out), *tiny_model.cli,
            "--batch-size", "16", "--shard-rows", "10", "--run-id", "submit-test"]
    proc = ray_head.submit(args, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Job 'raysubmit_" in proc.stdout + proc.stderr and "succeeded" in proc.stdout + proc.stderr
    assert "odin score: 43 rows (41 ok, 2 error)" in proc.stdout
    ids = {f"a/ok_{i:05d}.png" for i in range(40)} | {f"b ünï/{n}" for n in ("corrupt.png", "zero_byte.png", "rgba.png")}
    t = assert_exactly_once(out, ids)
    assert t.column_names == SCORE_COLS
    # the Delta table adds each row's hash bucket, and keeps the settings in its description
    from deltalake import DeltaTable

    delta = DeltaTable(str(out / "scores"))
    assert delta.schema().to_arrow().field("bucket") is not None
    assert json.loads(delta.metadata().description)["odin.model_id"].startswith("cifar_resnet20@sha256:")
    rows = {r["image_id"]: r for r in t.to_pylist()}
    assert rows["b ünï/zero_byte.png"]["status"] == "error" and rows["b ünï/zero_byte.png"]["error"].startswith("empty file")
    assert rows["b ünï/rgba.png"]["status"] == "ok" and rows["b ünï/rgba.png"]["pred"] is not None
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert all(0 < r["odin"] <= 1 and 0 < r["msp"] <= 1 and r["run_id"] == "submit-test" for r in ok)
    # no --fit: the fitted methods' columns are null, the others scored
    assert all(r["knn"] is None and r["adascale"] is None and r["scale"] is not None for r in ok)
    assert all(r["temperature"] == 1000.0 and r["epsilon"] == 0.0014 for r in rows.values())
    meta = pq.read_schema(next((out / "scores").glob("*.parquet"))).metadata
    assert meta[b"odin.model_id"].decode().startswith("cifar_resnet20@sha256:")
    assert json.loads(meta[b"odin.normalization"])["std"] == [0.229, 0.224, 0.225]
    assert "ray" in json.loads(meta[b"odin.versions"])
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"ok": 41, "error": 2, "total": 43}
    assert run["config"]["temperature"] == 1000.0 and run["versions"]["ray"]

    # each row carries the scores of its own image: the in-process engine agrees per image_id
    _assert_matches_in_process(t, tiny_model)

    # the same command again: nothing rescored, nothing duplicated
    env = dict(ray_head.env)
    again = run_job([sys.executable, *args[1:]], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this attempt scored 0 (43 already done)" in again.stdout
    assert_exactly_once(out, ids)
    # T and ε from a tuning.json (for this model) are the same configuration: it resumes too
    tuning = tmp_path / "tuning.json"
    tuning.write_text(json.dumps({"temperature": 1000.0, "epsilon": 0.0014,
                                  "model_id": meta[b"odin.model_id"].decode()}))
    tuned = run_job([sys.executable, *args[1:], "--tuning", str(tuning)], env)
    assert tuned.returncode == 0 and "this attempt scored 0 (43 already done)" in tuned.stdout, tuned.stderr[-3000:]
    # another configuration in the same directory: refused with exit 2, files untouched
    before = sorted(p.name for p in (out / "scores").iterdir())
    other = run_job([sys.executable, *args[1:], "--temperature", "10"], env)
    assert other.returncode == 2 and "another configuration" in other.stderr and "temperature" in other.stderr
    assert sorted(p.name for p in (out / "scores").iterdir()) == before

    # the README/docs query examples run against this output
    _run_doc_examples(out)


def _assert_matches_in_process(t: pa.Table, model_fixture, size: int = 32) -> None:
    import numpy as np

    from odin_engine.io.store import read_bytes
    from odin_engine.io.images import decode_image
    from odin_engine.loading import load_model
    from odin_engine.scorer import OdinScorer

    ok = [r for r in t.to_pylist() if r["status"] == "ok"]
    scorer = OdinScorer(load_model(model_fixture.spec, model_fixture.weights), 1000.0, 0.0014, device="cpu")
    ref = scorer.score(np.stack([decode_image(read_bytes(r["uri"]), size)[0] for r in ok]))
    for i, r in enumerate(ok):
        assert r["pred"] == int(ref["pred"][i]), r["image_id"]
        for c in ("msp", "max_logit", "energy", "odin"):
            assert abs(r[c] - float(ref[c][i])) <= 1e-5 * max(1.0, abs(float(ref[c][i]))), (r["image_id"], c)


def _run_doc_examples(out: Path) -> None:
    text = DOC.read_text()
    blocks = re.findall(r"<!-- tested: (\w+) -->\s*```python\n(.*?)```", text, re.S)
    kinds = {k for k, _ in blocks}
    assert {"pandas", "duckdb"} <= kinds, "docs/scoring-job.md lost its tested query examples"
    for kind, code in blocks:
        ns: dict = {}
        exec(compile(code.replace("OUTPUT_DIR", str(out)), f"<docs {kind} example>", "exec"), ns)
        result = ns["result"]
        assert len(result) > 0, kind


# --------------------------------------------------------------------------- every bad input kind
@pytest.mark.slow
def test_bad_input_corpus_every_kind_gives_one_row(ray_head, tiny_model, tmp_path, bad_images):
    root = tmp_path / "bad corpus" / "ünï cödé"
    root.mkdir(parents=True)
    for name, data in bad_images.items():
        (root / name).write_bytes(data)
    lines = ["path,label,split"]
    for i, name in enumerate(sorted(bad_images)):
        lines.append(f"\"ünï cödé/{name}\",{i % 10},{'test' if i % 2 else 'train'}")
    lines.append("ünï cödé/missing file.png,3,test")
    manifest = tmp_path / "bad corpus" / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    # through the Python API the audit stage uses (in a child process: it becomes a Ray driver)
    code = ("import json, sys; from jobs.score import score_corpus; "
            f"r = score_corpus({str(manifest)!r}, {str(out)!r}, {tiny_model.spec!r}, {tiny_model.weights!r}, "
            "temperature=1000.0, epsilon=0.0014, batch_size=8, shard_rows=8); "
            "print('RESULT', json.dumps(r))")
    proc = run_job([sys.executable, "-c", code], ray_head.env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result == json.loads((out / "run.json").read_text())
    expected = {f"ünï cödé/{n}" for n in bad_images} | {"ünï cödé/missing file.png"}
    t = assert_exactly_once(out, expected)
    assert t.column_names == SCORE_COLS + ["label", "split"]
    rows = {r["image_id"]: r for r in t.to_pylist()}
    for name, want in BAD_EXPECT.items():
        r = rows[f"ünï cödé/{name}"]
        assert r["status"] == want, (name, r["error"])
        if want == "error":
            assert r["error"] and r["pred"] is None and r["odin"] is None
        else:
            assert r["error"] is None and r["pred"] is not None and r["width"] >= 1
    missing = rows["ünï cödé/missing file.png"]
    assert missing["status"] == "error" and missing["error"].startswith("read failed")
    assert rows["ünï cödé/exif_rotated.jpg"]["width"] == 40 and rows["ünï cödé/exif_rotated.jpg"]["height"] == 60
    assert rows["ünï cödé/bomb.png"]["error"].startswith("decompression bomb")
    assert {r["split"] for r in rows.values()} == {"train", "test"}
    n_err = sum(1 for v in BAD_EXPECT.values() if v == "error") + 1
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["error"] == n_err and run["counts"]["ok"] == len(expected) - n_err
    assert f"({len(expected) - n_err} ok, {n_err} error)" in proc.stdout


# --------------------------------------------------------------------------- S3 in and out (moto server)
@pytest.mark.slow
def test_s3_corpus_and_s3_output(ray_head, s3_server, s3_bucket, tiny_model, tmp_path, bad_images, monkeypatch):
    client = s3_server.client()
    paths = make_images(tmp_path / "imgs", 12)
    for p in paths:
        client.put_object(Bucket=s3_bucket, Key=f"corpus/x y/{p.name}", Body=p.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="corpus/x y/truncated.jpg", Body=bad_images["truncated.jpg"])
    manifest = "uri,label\n" + "".join(f"x y/{p.name},1\n" for p in paths) + "x y/truncated.jpg,2\nx y/gone.png,3\n"
    client.put_object(Bucket=s3_bucket, Key="corpus/manifest.csv", Body=manifest.encode())
    env = dict(ray_head.env, **s3_server.env)
    out = f"s3://{s3_bucket}/runs/r1"
    proc = run_job(job_cmd(f"s3://{s3_bucket}/corpus/manifest.csv", out, tiny_model,
                           "--batch-size", "8", "--shard-rows", "5"), env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fs = s3_server.filesystem()
    from odin_engine.io.scores import ScoreTable

    for k, v in s3_server.env.items():  # the table's log is read by delta-rs, its files by pyarrow, both on moto
        monkeypatch.setenv(k, v)
    assert fs.get_file_info(f"{s3_bucket}/runs/r1/scores/_delta_log").type == pa.fs.FileType.Directory
    t = ScoreTable.open(out).read()
    ids = t.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 14
    rows = {r["image_id"]: r for r in t.to_pylist()}
    assert rows["x y/gone.png"]["status"] == "error" and "read failed" in rows["x y/gone.png"]["error"]
    assert rows["x y/truncated.jpg"]["status"] == "error"
    assert rows[f"x y/{paths[0].name}"]["uri"] == f"s3://{s3_bucket}/corpus/x y/{paths[0].name}"
    assert sum(r["status"] == "ok" for r in rows.values()) == 12
    with fs.open_input_stream(f"{s3_bucket}/runs/r1/run.json") as fh:
        run = json.loads(fh.read())
    assert run["counts"] == {"ok": 12, "error": 2, "total": 14} and run["verification"]["exactly_once"]
    again = run_job(job_cmd(f"s3://{s3_bucket}/corpus/manifest.csv", out, tiny_model, "--shard-rows", "5"), env)
    # the rerun attempts the unreadable key again (a `read failed` row is retryable); the rest is kept
    assert again.returncode == 0 and "this attempt scored 1 (13 already done)" in again.stdout, again.stderr[-2000:]
    assert "retried 1" in again.stdout


@pytest.mark.slow
def test_a_delta_output_delta_rs_cannot_reach_is_exit_2_before_anything_is_written(ray_head, gcs_server, tiny_model,
                                                                                   tmp_path):
    """delta-rs writes a Delta table's log with its own client and credentials, which may fail where
    pyarrow succeeds (here: the GCS emulator, which delta-rs cannot use): the run says so before it
    scores or writes anything, naming the fix, instead of failing at its commit."""
    fs = gcs_server.filesystem()
    bucket = f"odin-{os.getpid()}-{int(time.time())}-reach"
    fs.create_dir(bucket)
    for p in make_images(tmp_path / "imgs", 2):
        with fs.open_output_stream(f"{bucket}/corpus/{p.name}") as fh:
            fh.write(p.read_bytes())
    proc = run_job(job_cmd(f"gs://{bucket}/corpus", f"gs://{bucket}/runs/r1", tiny_model),
                   dict(ray_head.env, **gcs_server.env))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert f"gs://{bucket}/runs/r1/scores" in line and "delta-rs cannot reach it" in line, line
    assert "--table-format buckets" in line and "\x1b" not in line
    assert fs.get_file_info(pa.fs.FileSelector(f"{bucket}/runs", allow_not_found=True)) == []


def test_gcs_corpus_and_gcs_output(ray_head, gcs_server, tiny_model, tmp_path, bad_images):
    """A gs:// directory corpus scored into a gs:// output on a real GCS API (the emulator), in the
    bucket-file layout: delta-rs (the Delta layout's commit) has no setting that points it at a GCS
    emulator, so the Delta layout on gs:// is not tested here (S3 is, on moto)."""
    fs = gcs_server.filesystem()
    bucket = f"odin-{os.getpid()}-{int(time.time())}"
    fs.create_dir(bucket)
    paths = make_images(tmp_path / "imgs", 6)
    for p in paths:
        with fs.open_output_stream(f"{bucket}/corpus/a b/{p.name}") as fh:
            fh.write(p.read_bytes())
    with fs.open_output_stream(f"{bucket}/corpus/zero_byte.png") as fh:
        fh.write(bad_images["zero_byte.png"])
    env = dict(ray_head.env, **gcs_server.env)
    out = f"gs://{bucket}/runs/r1"
    proc = run_job(job_cmd(f"gs://{bucket}/corpus", out, tiny_model, "--batch-size", "4", "--shard-rows", "3",
                           "--table-format", "buckets"), env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = [i.path for i in fs.get_file_info(pa.fs.FileSelector(f"{bucket}/runs/r1/scores"))]
    t = pq.ParquetDataset(files, filesystem=fs).read()
    rows = {r["image_id"]: r for r in t.to_pylist()}
    assert len(t) == len(rows) == 7
    assert rows["zero_byte.png"]["status"] == "error" and "empty file" in rows["zero_byte.png"]["error"]
    assert rows[f"a b/{paths[0].name}"]["uri"] == f"gs://{bucket}/corpus/a b/{paths[0].name}"
    assert sum(r["status"] == "ok" for r in rows.values()) == 6
    with fs.open_input_stream(f"{bucket}/runs/r1/run.json") as fh:
        run = json.loads(fh.read())
    assert run["counts"] == {"ok": 6, "error": 1, "total": 7} and run["verification"]["exactly_once"]
    assert fs.get_file_info(f"{bucket}/runs/r1/_odin_lock.json").type == pa.fs.FileType.NotFound
    again = run_job(job_cmd(f"gs://{bucket}/corpus", out, tiny_model, "--shard-rows", "3"), env)
    assert again.returncode == 0 and "this attempt scored 0 (7 already done)" in again.stdout, again.stderr[-2000:]


# --------------------------------------------------------------------------- kills
def _map_worker_pids(head) -> list[int]:
    """Scoring actors of *our* test head only (descendants of its raylet), never anyone else's."""
    ours = set(_with_descendants(pids_matching(head.temp_dir)))
    return [pid for pid, cmd in process_cmdlines().items()
            if pid in ours and cmd.startswith("ray::MapWorker") and "ScoreBatch" in cmd]


def _committed(out: Path) -> int:
    """Staged blocks (complete files in ``_staging/``): what a killed run keeps."""
    d = out / "_staging"
    return len(list(d.glob("*.parquet"))) if d.exists() else 0


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killing_a_scoring_actor_loses_and_duplicates_nothing(ray_head, tiny_model, tmp_path):
    """Every scoring actor's process is killed mid-run (what a node loss does to them): Ray restarts
    them from their constructor arguments (Ray Data's driver-owned refs, kept for the whole run),
    the restarted actors score the rest, and no row is lost or duplicated."""
    from datetime import datetime, timezone

    corpus = tmp_path / "corpus"
    n = 1200
    make_images(corpus, n)
    out = tmp_path / "out"
    proc = start_command(job_cmd(corpus, out, tiny_model, "--batch-size", "8", "--shard-rows", "50", "--quiet"),
                            cwd=REPO, env=ray_head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _committed(out) >= 1, 120, "a first committed shard")
        victims = _wait(lambda: _map_worker_pids(ray_head), 30, "the scoring actor process")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed = datetime.now(timezone.utc)
        killed_at = _committed(out)
        # the restarted actors: new processes of the same pool
        restarted = _wait(lambda: set(_map_worker_pids(ray_head)) - set(victims) or proc.poll() is not None, 120,
                          "a restarted scoring actor")
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at < n // 50, "the job finished before the kill: make it slower"
    assert proc.returncode == 0, stderr[-4000:]
    t = assert_exactly_once(out, {f"img_{i:05d}.png" for i in range(n)})
    assert restarted is not True and restarted, "no scoring actor was restarted after the kill"
    # every actor alive before the kill is dead: the rows scored after it were scored by restarted actors
    after = sum(ts > killed for ts in t.column("scored_at").to_pylist())
    assert after >= n - killed_at * 50 - 2 * 50, (after, killed_at)
    assert set(_map_worker_pids(ray_head)).isdisjoint(victims)


@pytest.mark.slow
def test_killing_the_job_then_rerunning_resumes_without_duplicates(ray_head, tiny_model, tmp_path):
    corpus = tmp_path / "corpus"
    n = 1200
    make_images(corpus, n)
    out = tmp_path / "out"
    cmd = job_cmd(corpus, out, tiny_model, "--batch-size", "8", "--shard-rows", "50", "--quiet")
    proc = start_command(cmd, cwd=REPO, env=ray_head.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait(lambda: _committed(out) >= 3, 120, "three committed shards")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done_at_kill = _committed(out)
    assert done_at_kill < n // 50, "the job finished before the kill: make it slower"
    assert not (out / "run.json").exists()
    # the dead driver's workers go away with it; then the same command resumes
    _wait(lambda: not _map_worker_pids(ray_head), 60, "the killed job's actors to exit")
    again = run_job(cmd, ray_head.env)
    assert again.returncode == 0, again.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    attempt = run["attempts"][-1]
    assert attempt["already_done"] >= 3 * 50 and attempt["scored"] == n - attempt["already_done"]
    assert_exactly_once(out, {f"img_{i:05d}.png" for i in range(n)})


@pytest.mark.slow
def test_a_bucket_file_output_migrates_to_delta_without_rescoring(ray_head, tiny_model, tmp_path):
    """An output of the bucket-file layout (``--table-format buckets``, or made before Delta) rerun
    with ``--table-format delta``: its rows move into a Delta table in that run's one version (not
    rescored; new images scored), the bucket files go, the job file says delta; later runs are Delta."""
    from deltalake import DeltaTable

    corpus = tmp_path / "corpus"
    make_images(corpus, 12)
    out = tmp_path / "out"
    cmd = job_cmd(corpus, out, tiny_model, "--batch-size", "8", "--shard-rows", "3", "--quiet")
    first = run_job(cmd + ["--table-format", "buckets"], ray_head.env)
    assert first.returncode == 0, first.stderr[-3000:]
    buckets = sorted(p.name for p in (out / "scores").glob("part-*.parquet"))
    assert len(buckets) >= 2 and not (out / "scores" / "_delta_log").exists()
    old = {r["image_id"]: r for r in read_scores(out).to_pylist()}
    make_images(corpus, 3, prefix="new_", seed=4)
    back = run_job(cmd + ["--table-format", "delta"], ray_head.env)
    assert back.returncode == 0, back.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    att = run["attempts"][-1]
    assert (att["scored"], att["already_done"], att["table"]["migrated_bucket_files"]) == (3, 12, len(buckets))
    assert run["verification"]["exactly_once"] and json.loads((out / "_odin_job.json").read_text())["layout"]["format"] == "delta"
    assert not set(buckets) & {p.name for p in (out / "scores").glob("*.parquet")}  # the bucket files are gone
    rows = {r["image_id"]: r for r in assert_exactly_once(out, {p.name for p in corpus.iterdir()}).to_pylist()}
    assert all(rows[i]["scored_at"] == old[i]["scored_at"] and rows[i]["odin"] == old[i]["odin"] for i in old)
    assert len(DeltaTable(str(out / "scores")).history()) >= 1
    # a kill between the migration's commit and its job-file update leaves the job file saying
    # buckets beside a Delta table: the next run (no option needed) finishes the migration
    job = json.loads((out / "_odin_job.json").read_text())
    job["layout"]["format"] = "buckets"
    (out / "_odin_job.json").write_text(json.dumps(job))
    again = run_job(cmd, ray_head.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["attempts"][-1]["scored"] == 0
    assert json.loads((out / "_odin_job.json").read_text())["layout"]["format"] == "delta"
    assert_exactly_once(out, {p.name for p in corpus.iterdir()})
    refused = run_job(cmd + ["--table-format", "buckets"], ray_head.env)
    assert refused.returncode == 2 and "cannot go back" in refused.stderr


@pytest.mark.slow
def test_kill_9_between_the_delta_files_and_the_commit_then_rerun(ray_head, tiny_model, tmp_path):
    """A night (+10 new, 1 changed, 3 gone) killed with SIGKILL as soon as its first new table file
    exists — after its data files began, before its Delta commit: readers still see the previous
    version whole (the dead attempt's files are in no version); the same command then commits the
    night as one version, exactly once."""
    from deltalake import DeltaTable

    from odin_engine.io.scores import ScoreTable

    corpus = tmp_path / "corpus"
    make_images(corpus, 40)
    out = tmp_path / "out"
    code = ("from jobs.score import score_corpus; "
            f"score_corpus({str(corpus)!r}, {str(out)!r}, {tiny_model.spec!r}, {tiny_model.weights!r}, "
            "temperature=1000.0, epsilon=0.0014, batch_size=8, shard_rows=2, partition_rows=4, verbose=False)")
    first = run_job([sys.executable, "-c", code], ray_head.env)
    assert first.returncode == 0, first.stderr[-3000:]
    scores = out / "scores"
    night_before = sorted(ScoreTable.open(str(out)).read(["image_id"]).column("image_id").to_pylist())
    files_before = {p.name for p in scores.glob("*.parquet")}
    seen = DeltaTable(str(scores)).version()  # the version readers see after night 1
    make_images(corpus, 10, prefix="new_", seed=5)
    _new_bytes(corpus / "img_00000.png", seed=11)
    for i in (1, 2, 3):
        (corpus / f"img_{i:05d}.png").unlink()
    proc = start_command([sys.executable, "-c", code], cwd=REPO, env=ray_head.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: {p.name for p in scores.glob("*.parquet")} - files_before, 300, "the night's first table file")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    table = DeltaTable(str(scores))
    assert table.version() == seen, "the kill came after the commit: the window was missed"
    assert sorted(ScoreTable.open(str(out)).read(["image_id"]).column("image_id").to_pylist()) == night_before
    _wait(lambda: not _map_worker_pids(ray_head), 60, "the killed job's actors to exit")
    again = run_job([sys.executable, "-c", code], ray_head.env)
    assert again.returncode == 0, again.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    night = run["attempts"][-1]["table"]
    assert run["verification"]["exactly_once"] and night["version"] == seen + 1
    today = {p.name for p in corpus.iterdir()}
    rows = {r["image_id"]: r for r in assert_exactly_once(out, today).to_pylist()}
    st = (corpus / "img_00000.png").stat()
    assert rows["img_00000.png"]["version"] == f"{st.st_size}:{st.st_mtime_ns}"
    # one version for the night, whatever the kill left (and one more if the rule compacted after it)
    assert DeltaTable(str(scores)).version() == (night["compaction"] or night)["version"]


@pytest.mark.slow
def test_kill_9_just_before_the_delta_commit_on_s3_then_rerun(ray_head, s3_server, s3_bucket, tiny_model, tmp_path,
                                                              monkeypatch):
    """The same on moto's S3 API, the kill made exact: the driver stops at the fault point between
    its data files (all written, the touched files rewritten) and the Delta commit
    (``ODIN_FAULT_BEFORE_COMMIT``), and is killed there. Readers still see the previous version
    whole; the rerun commits the night as one version, exactly once."""
    from jobs.score import FAULT_BEFORE_COMMIT
    from odin_engine.io.scores import ScoreTable

    for k, v in s3_server.env.items():  # this process reads the table too
        monkeypatch.setenv(k, v)
    corpus = tmp_path / "corpus"
    make_images(corpus, 20)
    out = f"s3://{s3_bucket}/kill/out"
    env = dict(ray_head.env, **s3_server.env)
    cmd = job_cmd(corpus, out, tiny_model, "--batch-size", "8", "--shard-rows", "4", "--quiet")
    first = run_job(cmd, env)
    assert first.returncode == 0, first.stderr[-3000:]
    night_before = sorted(ScoreTable.open(out).read(["image_id"]).column("image_id").to_pylist())
    from deltalake import DeltaTable

    opts = {**{k: v for k, v in s3_server.env.items() if k.startswith("AWS_")}, "AWS_ALLOW_HTTP": "true"}
    seen = DeltaTable(f"{out}/scores", storage_options=opts).version()
    make_images(corpus, 5, prefix="new_", seed=5)
    (corpus / "img_00001.png").unlink()
    marker = tmp_path / "at-the-commit"
    proc = start_command(cmd, cwd=REPO, env=dict(env, **{FAULT_BEFORE_COMMIT: str(marker)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: marker.exists(), 300, "the driver at its fault point before the commit")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert DeltaTable(f"{out}/scores", storage_options=opts).version() == seen
    assert sorted(ScoreTable.open(out).read(["image_id"]).column("image_id").to_pylist()) == night_before
    _wait(lambda: not _map_worker_pids(ray_head), 60, "the killed job's actors to exit")
    again = run_job(cmd, env)
    assert again.returncode == 0, again.stderr[-3000:]
    fs = s3_server.filesystem()
    with fs.open_input_stream(f"{s3_bucket}/kill/out/run.json") as fh:
        run = json.loads(fh.read())
    night = run["attempts"][-1]["table"]
    assert run["verification"]["exactly_once"] and night["version"] == seen + 1
    ids = ScoreTable.open(out).read(["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == {p.name for p in corpus.iterdir()}


# --------------------------------------------------------------------------- the pieces of the exactly-once scheme
def test_corpus_shards_read_each_block_in_its_own_small_read_unit(tmp_path):
    """A block (``block_rows`` rows: the unit an actor stages) is a plan file's row group; there is
    one read unit per block up to ``max_units``, so a small run still has an input per actor."""
    from pyarrow import fs as pafs

    from jobs.pipeline import CorpusShards

    files, want = [], []
    for k, n in enumerate((10, 3, 7)):
        path = tmp_path / f"p{k:06d}.parquet"
        ids = [f"{k}-{i}" for i in range(n)]
        pq.write_table(pa.table({"image_id": ids, "uri": ["u"] * n}), path, row_group_size=4)
        files.append(str(path))
        want += ids
    bigger = tmp_path / "big.parquet"  # an older plan file in one row group: still cut into 4-row blocks
    pq.write_table(pa.table({"image_id": [f"b-{i}" for i in range(9)], "uri": ["u"] * 9}), bigger)
    for max_units, n_tasks, per_task in ((4096, 7, 3), (4, 4, 3), (1, 1, 10)):  # 7 row groups; big.parquet: 3 blocks
        tasks = CorpusShards(pafs.LocalFileSystem(), [*files, str(bigger)], block_rows=4,
                             max_units=max_units).get_read_tasks(100)
        assert len(tasks) == n_tasks
        outputs = [list(t()) for t in tasks]
        blocks = [b for out in outputs for b in out]
        assert sorted(b.num_rows for b in blocks) == sorted([4, 4, 2, 3, 4, 3, 4, 4, 1])  # row groups of 4, 9 → 4,4,1
        assert max(len(out) for out in outputs) <= per_task
        assert sum(t.metadata.num_rows for t in tasks) == 29
        ids = [i for b in blocks for i in b.column("image_id").to_pylist()]
        assert sorted(ids) == sorted(want + [f"b-{i}" for i in range(9)])


def test_plan_readers_grow_with_the_actor_pool():
    """One plan reader at a time per 16 actors (at most 8): a small cluster starts no second reader
    process, a big pool is never short of inputs."""
    from jobs.pipeline import MAX_READERS, plan_readers

    assert [plan_readers(n) for n in (1, 2, 16, 17, 32, 33, 128, 10_000)] == [1, 1, 1, 2, 2, 3, 8, MAX_READERS]
    assert plan_readers(0) == 1


@pytest.mark.slow
@pytest.mark.parametrize("preset,expected", [(None, "60000"), ("5000", "5000")])
def test_a_local_cluster_keeps_idle_workers_for_reuse(preset, expected):
    """init_ray without an address starts a real local cluster whose raylet (so every worker) has the
    worker-reuse setting, unless the user set their own; num_cpus reaches the cluster."""
    code = (
        "import os, ray\n"
        "from jobs.ray_utils import init_ray\n"
        "assert init_ray(num_cpus=1)\n"
        "@ray.remote(num_cpus=1)\n"
        "def setting():\n"
        "    return os.environ.get('RAY_idle_worker_killing_time_threshold_ms')\n"
        "print('RESULT', ray.cluster_resources().get('CPU'), ray.get(setting.remote()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_idle_worker_killing_time_threshold_ms")}
    if preset is not None:
        env["RAY_idle_worker_killing_time_threshold_ms"] = preset
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    result = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert result == [["1.0", expected]], p.stdout[-2000:]


def test_scoring_workers_do_not_import_scikit_learn():
    """A scoring actor imports jobs.score; scikit-learn (metrics only) would add ~0.6 s to its start."""
    code = "import sys, jobs.score; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- the real test bed
SHARED = REPO / ".." / "shared" / "data"


@pytest.mark.slow
@pytest.mark.testbed
@pytest.mark.skipif(not (SHARED / "cifar10_test_jpeg_yoongikim.npz").is_file(),
                    reason="../shared/data (CIFAR-10 test set and ResNet-20 weights) is not present")
def test_real_weights_on_cifar_pngs_with_labels(ray_head, tmp_path):
    import numpy as np
    from PIL import Image

    with np.load(SHARED / "cifar10_test_jpeg_yoongikim.npz", allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]  # once: each npz item access decompresses it again
    pick = np.arange(0, 10000, 50)  # 200 images, 20 per class
    lines = ["path,label,split"]
    for i in pick:
        Image.fromarray(images[i]).save(tmp_path / f"c{i:05d}.png")
        lines.append(f"c{i:05d}.png,{int(labels[i])},test")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    weights = str(SHARED / "weights" / "resnet20-12fca82f.th")
    proc = run_job([sys.executable, "-m", "jobs.score", "--input", str(tmp_path / "m.csv"), "--output", str(out),
                    "--model", "cifar_resnet20", "--weights", weights, "--batch-size", "64", "--shard-rows", "100",
                    "--quiet"], ray_head.env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    t = assert_exactly_once(out, {f"c{i:05d}.png" for i in pick})
    df = t.to_pandas()
    accuracy = float((df["pred"] == df["label"]).mean())
    assert accuracy > 0.7, accuracy  # PROVENANCE.md: 81% on the whole JPEG test set
    assert df["model_id"].iloc[0] == "cifar_resnet20@sha256:12fca82f0bebc413"


@pytest.mark.slow
def test_torchscript_model_with_normalization_flags(ray_head, tmp_path):
    """A TorchScript archive has no known normalization or size: --mean/--std/--input-size supply them."""
    import torch

    from odin_engine.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    torch.jit.script(CifarResNet(20).eval()).save(str(tmp_path / "m.ts"))
    corpus = tmp_path / "corpus"
    make_images(corpus, 6, size=48)
    out = tmp_path / "out"
    base = [sys.executable, "-m", "jobs.score", "--input", str(corpus), "--output", str(out),
            "--model", f"torchscript:{tmp_path / 'm.ts'}", "--batch-size", "4"]
    missing = run_job(base, ray_head.env)
    assert missing.returncode == 2 and "--mean" in missing.stderr and not out.exists()
    proc = run_job(base + ["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--input-size", "32"], ray_head.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = assert_exactly_once(out, {f"img_{i:05d}.png" for i in range(6)})
    assert set(t.column("status").to_pylist()) == {"ok"}
    execution = json.loads((out / "run.json").read_text())["attempts"][-1]["execution"]
    assert (execution["workers"], execution["actors"]) == (2, 1)  # 6 images are one block: one actor starts
    meta = pq.read_schema(next((out / "scores").glob("*.parquet"))).metadata
    assert json.loads(meta[b"odin.normalization"])["std"] == [0.25, 0.25, 0.25]
    assert meta[b"odin.input_size"] == b"32"


# --------------------------------------------------------------------------- incremental reruns
def _new_bytes(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.mark.slow
def test_incremental_rerun_scores_only_new_and_changed_images(ray_head, tiny_model, tmp_path):
    """+30 new, 1 overwritten, −5 removed: the same command scores exactly 31; the table is today's files."""
    corpus = tmp_path / "corpus"
    make_images(corpus / "a", 40)
    make_images(corpus / "b", 20, prefix="q_")
    out = tmp_path / "out"
    cmd = job_cmd(corpus, out, tiny_model, "--batch-size", "16", "--shard-rows", "4")  # 15 buckets
    first = run_job(cmd, ray_head.env)
    assert first.returncode == 0, first.stderr[-3000:]
    job = json.loads((out / "_odin_job.json").read_text())
    assert job["layout"]["buckets"] == 15
    before = {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("*.parquet")}
    old_rows = {r["image_id"]: r for r in read_scores(out).to_pylist()}

    make_images(corpus / "c", 30, prefix="n_", seed=7)
    _new_bytes(corpus / "a" / "img_00000.png", seed=99)
    for i in range(5):
        (corpus / "b" / f"q_{i:05d}.png").unlink()
    again = run_job(cmd, ray_head.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this attempt scored 31 (54 already done)" in again.stdout
    # a healthy run's default output (no TTY): the tool's lines only, nothing alarming (tests/test_console.py)
    for proc in (first, again):
        assert not proc.stderr.strip(), proc.stderr[-3000:]
        assert all(ln.startswith("odin score") and not ALARM.search(ln) for ln in proc.stdout.splitlines()), proc.stdout
    att = json.loads((out / "run.json").read_text())["attempts"][-1]
    assert (att["scored"], att["new"], att["changed"], att["retried"], att["dropped"]) == (31, 30, 1, 0, 5)
    today = {p.relative_to(corpus).as_posix() for p in corpus.rglob("*.png")}
    assert len(today) == 85
    t = assert_exactly_once(out, today)
    rows = {r["image_id"]: r for r in t.to_pylist()}
    changed = rows["a/img_00000.png"]
    st = (corpus / "a" / "img_00000.png").stat()
    assert changed["version"] == f"{st.st_size}:{st.st_mtime_ns}" and changed["scored_at"] > old_rows["a/img_00000.png"]["scored_at"]
    kept = [i for i in today if i in old_rows and i != "a/img_00000.png"]
    assert all(rows[i]["scored_at"] == old_rows[i]["scored_at"] and rows[i]["odin"] == old_rows[i]["odin"] for i in kept)
    # one new Delta version: the 31 new rows written, the 54 unchanged rows kept as they were (no
    # file is ever modified: the touched file was rewritten as a new one); the night before is
    # still readable as it was (time travel), and the log names exactly today's files
    from deltalake import DeltaTable

    first_run = json.loads((out / "run.json").read_text())["attempts"][0]["table"]
    seen = (first_run["compaction"] or first_run)["version"]  # the version readers saw after night 1
    assert (att["table"]["version"], att["table"]["rows_written"], att["table"]["rows_kept"]) == (seen + 1, 31, 54)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("*.parquet")}
    assert all(after[n] == before[n] for n in before)
    table = DeltaTable(str(out / "scores"))
    compaction = att["table"]["compaction"]  # small files merged by the rule (a table this small: always)
    assert len(table.file_uris()) == (compaction["files_after"] if compaction
                                      else att["table"]["files_added"] + att["table"]["files_kept"])
    night_before = DeltaTable(str(out / "scores"), version=seen).to_pyarrow_dataset().to_table()
    assert sorted(night_before.column("image_id").to_pylist()) == sorted(old_rows)
    assert not any(n.startswith("_") for n in os.listdir(out) if n not in ("_odin_job.json",)), os.listdir(out)
    # and once more: nothing to do
    third = run_job(cmd, ray_head.env)
    assert third.returncode == 0 and "this attempt scored 0 (85 already done)" in third.stdout, third.stderr[-2000:]


@pytest.mark.slow
def test_read_failures_are_retried_on_rerun_and_final_verdicts_are_not(ray_head, tiny_model, tmp_path):
    """A manifest whose missing file appears later is completed by rerunning the same call; an empty
    file stays an error without being read again. Many buckets and bucket ranges on a small corpus."""
    imgs = tmp_path / "imgs"
    make_images(imgs, 10)
    (imgs / "zero.png").write_bytes(b"")
    names = [f"img_{i:05d}.png" for i in range(10)] + ["zero.png", "late.png"]
    (tmp_path / "m.csv").write_text("path\n" + "".join(f"imgs/{n}\n" for n in names))
    out = tmp_path / "out"
    code = ("import json; from jobs.score import score_corpus; "
            f"r = score_corpus({str(tmp_path / 'm.csv')!r}, {str(out)!r}, {tiny_model.spec!r}, {tiny_model.weights!r}, "
            "temperature=1000.0, epsilon=0.0014, batch_size=4, shard_rows=2, partition_rows=3, verbose=False); "
            "print('RESULT', json.dumps(r))")

    def once():
        proc = run_job([sys.executable, "-c", code], ray_head.env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.split("RESULT ", 1)[1])

    r1 = once()
    assert r1["layout"]["buckets"] == 6 and r1["attempts"][-1]["buckets"]["ranges"] >= 3
    assert r1["counts"] == {"ok": 10, "error": 2, "total": 12}
    rows1 = {r["image_id"]: r for r in read_scores(out).to_pylist()}
    assert rows1["imgs/late.png"]["error"].startswith("read failed")
    assert rows1["imgs/zero.png"]["error"].startswith("empty file")

    r2 = once()  # still missing: attempted again, still a row, still exactly once
    assert (r2["attempts"][-1]["scored"], r2["attempts"][-1]["retried"]) == (1, 1)
    _new_bytes(imgs / "late.png", seed=3)
    r3 = once()
    att = r3["attempts"][-1]
    assert (att["scored"], att["already_done"], att["changed"]) == (1, 11, 1)  # the file now has a version
    assert r3["counts"] == {"ok": 11, "error": 1, "total": 12} and r3["verification"]["exactly_once"]
    rows3 = {r["image_id"]: r for r in assert_exactly_once(out, {f"imgs/{n}" for n in names}).to_pylist()}
    assert rows3["imgs/late.png"]["status"] == "ok"
    assert rows3["imgs/zero.png"]["scored_at"] == rows1["imgs/zero.png"]["scored_at"]  # not re-read


def test_score_batch_stages_each_block_in_sub_batches(tmp_path, tiny_model):
    """The actor stage, without a cluster: a block scored in sub-batches (one stamp each) and staged
    as one atomic file sorted by bucket; a read failure is a row, not an exception."""
    from pyarrow import fs as pafs

    from jobs.pipeline import ScoreBatch, read_and_decode
    from jobs.shards import parse_staging_file
    from odin_engine.io.scores import output_schema
    from odin_engine.loading import load_model

    paths = make_images(tmp_path / "imgs", 11)
    batch = pa.table({"image_id": [p.name for p in paths] + ["gone.png"],
                      "uri": [str(p) for p in paths] + [str(tmp_path / "gone.png")],
                      "version": ["1:1"] * 12, "bucket": pa.array([3, 1, 2] * 4, pa.int64())})
    schema = output_schema().append(pa.field("bucket", pa.int64()))
    model_id = load_model(tiny_model.spec, tiny_model.weights).model_id
    actor = ScoreBatch(tiny_model.spec, tiny_model.weights, None, None, None, 1000.0, 0.0014, 4, model_id, "r", 1,
                       False, schema.serialize().to_pybytes(), staging=(pafs.LocalFileSystem(), str(tmp_path / "st")))
    counts = actor(read_and_decode(batch, 32, "crop")).to_pylist()
    assert counts == [{"rows": 12, "ok": 11, "files": 1}]
    (staged,) = list((tmp_path / "st").iterdir())
    assert parse_staging_file(staged.name)[:2] == (1, 3)
    t = pq.read_table(staged)
    assert t.column("bucket").to_pylist() == sorted(t.column("bucket").to_pylist())
    assert t.schema.names == schema.names and t.num_rows == 12
    ok = t.filter(pa.compute.equal(t.column("status"), "ok"))
    assert len(set(ok.column("scored_at").to_pylist())) == 3  # 11 images in sub-batches of 4
    gone = t.filter(pa.compute.equal(t.column("image_id"), "gone.png")).to_pylist()[0]
    assert gone["error"].startswith("read failed") and gone["odin"] is None
