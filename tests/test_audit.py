"""`odin-audit audit` end to end on a real local Ray head: ray job submit, resume without rescoring,
config file + tuning file + held-out split, and bad configuration (exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _odin_helpers import noise_images, random_weights, smooth_images
from deltalake import DeltaTable

from jobs.cli import main as cli
from odin_engine import methods
from odin_engine.loading import load_model
from odin_engine.io.results import POINTER, open_flags
from odin_engine.metrics import threshold_at_tpr
from _forkserver import run_command

REPO = Path(__file__).resolve().parents[1]


def _write(d: Path, imgs: np.ndarray, prefix: str = "") -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(imgs):
        p = d / f"{prefix}{i:04d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    w = random_weights(root / "w.pt")
    _write(root / "held", smooth_images(100, 1))
    _write(root / "corpus", np.concatenate([smooth_images(20, 2), noise_images(10, 3)]))
    (root / "corpus" / "broken.png").write_bytes(b"this is not a png")
    _write(root / "ood", noise_images(20, 4))
    _write(root / "few", smooth_images(50, 5))
    return root, w


def _model_args(w: Path) -> list[str]:
    return ["--model", "cifar_resnet20", "--weights", str(w)]


def _scores(d: Path) -> pd.DataFrame:
    """A score run's current rows (its Delta table's version: never a glob of the folder)."""
    from deltalake import DeltaTable

    return DeltaTable(str(d / "scores")).to_pandas()


@pytest.mark.slow
def test_audit_job_submit_end_to_end_then_resume(ray_head, data):
    root, w = data
    out = root / "out"
    args = ["python", "-m", "jobs.audit", "--corpus", str(root / "corpus"), "--heldout", str(root / "held"),
            "--output", str(out), *_model_args(w), "--temperature", "1000", "--epsilon", "0.0014",
            "--ood", f"noise={root / 'ood'}", "--class-names", ",".join(f"c{i}" for i in range(10)), "--quiet"]
    proc = ray_head.submit(args, cwd=REPO, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cal = json.loads((out / "calibration.json").read_text())
    held = _scores(out / "heldout")
    assert len(held) == 100
    assert cal["delta"] == threshold_at_tpr(held["odin"], 0.95)
    assert cal["n_heldout"] == 100 and (cal["temperature"], cal["epsilon"]) == (1000.0, 0.0014)
    flags = DeltaTable(str(out / "flags")).to_pandas()  # DIR/flags: a Delta table, one version per result
    assert len(flags) == 31 and flags["image_id"].is_unique
    broken = flags[flags["image_id"] == "broken.png"].iloc[0]
    assert broken["status"] == "error" and pd.isna(broken["is_outlier"]) and broken["error"]
    ok = flags[flags["status"] == "ok"]
    assert (ok["is_outlier"].astype(bool) == (ok["odin"] < cal["delta"])).all()
    ev = json.loads((out / "evaluation.json").read_text())
    assert set(ev["sets"]) == {"noise"} and ev["sets"]["noise"]["n"] == 20
    # every method computed without a fit is evaluated (fitted ones need --fit/--reference)
    assert set(ev["sets"]["noise"]["metrics"]) == {m for m in methods.TABLE_METHODS if not methods.REGISTRY[m].needs_fit}
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4 and "c0" in report
    doc = json.loads((out / "audit.json").read_text())
    assert doc["score_runs"]["corpus"]["scored_this_run"] == 31
    # the result names the score tables' versions it decided on: readable again by that version
    from odin_engine.io.scores import ScoreTable

    v = doc["score_runs"]["corpus"]["table_version"]
    assert isinstance(v, int) and ScoreTable.open(str(out / "corpus"), as_of=v).count() == 31
    ranks = ok.sort_values("odin")["rank"].to_numpy()
    assert ranks[0] == 1 and (ranks == ok["odin"].rank(method="min").sort_values().to_numpy()).all()
    assert doc["flags_format"] == "delta" and doc["flags_version"] == 0 == cal["flags"]["flags_version"]
    assert all(Path(f).name.startswith(f"part-{doc['result_id']}-") for f in DeltaTable(str(out / "flags")).file_uris())

    # rerun the same command (as a plain driver on the same cluster): resumes, rescores nothing
    before = {k: (out / k / "run.json").read_text() for k in ("heldout", "corpus")}
    again = run_command([sys.executable, *args[1:]], cwd=REPO, env=ray_head.env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    doc2 = json.loads((out / "audit.json").read_text())
    assert all(r["scored_this_run"] == 0 for r in doc2["score_runs"].values())
    assert doc2["score_runs"]["corpus"]["table_version"] == v  # nothing changed: no new version
    report2 = (out / "report.html").read_text()  # the resumed run's report says what it reused
    assert "151 images were scored by an earlier run" in report2 and ">31<" in report2
    for k in ("heldout", "corpus"):
        run = json.loads((out / k / "run.json").read_text())
        assert run["attempts"][-1]["scored"] == 0 and len(run["attempts"]) == 2
        assert json.loads(before[k])["run_id"] == run["run_id"]
    assert json.loads((out / "calibration.json").read_text())["delta"] == cal["delta"]
    assert doc2["flags_version"] == 1  # each audit commits one version of the flags table …
    history = sorted(DeltaTable(str(out / "flags")).history(), key=lambda c: c["version"])
    assert [(c["odin.audit_id"], c["odin.result_id"]) for c in history] == [(d["result_id"],) * 2 for d in (doc, doc2)]
    assert json.loads((out / POINTER).read_text())["flags_version"] == 1

    def by_id(f):
        return f.sort_values("image_id").reset_index(drop=True).drop(columns=["scored_at"], errors="ignore")

    # … the whole flags set: the current version, and the first audit's by its id (time travel)
    pd.testing.assert_frame_equal(by_id(open_flags(str(out)).to_pandas()), by_id(flags))
    first = open_flags(str(out), doc["result_id"])
    assert (first.version, first.result_id) == (0, doc["result_id"])
    pd.testing.assert_frame_equal(by_id(first.to_pandas()), by_id(flags))


@pytest.mark.slow
def test_audit_config_file_tuning_file_and_heldout_split(ray_head, data):
    root, w = data
    model_id = load_model("cifar_resnet20", w).model_id
    tuning = root / "tuning.json"
    tuning.write_text(json.dumps({"version": 1, "temperature": 10.0, "epsilon": 0.001, "mode": "paper",
                                  "model_id": model_id}))
    rows = [{"uri": str(p), "split": "heldout"} for p in _write(root / "m_held", smooth_images(100, 7), "h")]
    rows += [{"uri": str(p), "split": "audit"} for p in _write(root / "m_corp", noise_images(12, 8), "c")]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    out = root / "out_cfg"
    (root / "audit.toml").write_text(
        "[audit]\n"
        f'corpus = "{root / "manifest.csv"}"\nheldout-split = "heldout"\noutput = "{out}"\n'
        f'model = "cifar_resnet20"\nweights = "{w}"\ntuning = "{tuning}"\ntpr = 0.9\nquiet = true\nfdr = 0.2\n'
    )
    proc = run_command([sys.executable, "-m", "jobs.cli", "audit", "--config", str(root / "audit.toml")],
                          cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cal = json.loads((out / "calibration.json").read_text())
    assert (cal["temperature"], cal["epsilon"], cal["target_tpr"]) == (10.0, 0.001, 0.9)
    assert cal["settings_from"].startswith("tuning file")
    flags = open_flags(str(out)).to_pandas()
    assert len(flags) == 12 and (flags["split"] == "audit").all()  # held-out rows are not flagged
    assert cal["n_heldout"] == 100
    scores = _scores(out / "corpus")
    assert cal["delta"] == threshold_at_tpr(scores[scores["split"] == "heldout"]["odin"], 0.9)
    assert not (out / "evaluation.json").exists()
    # --fdr 0.2 (from the config file): BH on the conformal p-values against the held-out split decided
    held = np.sort(scores[scores["split"] == "heldout"]["odin"].to_numpy())
    p = (1 + (held[None, :] <= flags["odin"].to_numpy()[:, None]).sum(1)) / (len(held) + 1)
    np.testing.assert_array_equal(flags["p_value"].to_numpy(), p)
    ps = np.sort(p)
    k = max([i for i in range(1, len(p) + 1) if ps[i - 1] <= i * 0.2 / len(p)], default=0)
    np.testing.assert_array_equal(flags["is_outlier"].to_numpy(bool), p <= ps[k - 1] if k else np.zeros(len(p), bool))
    doc = json.loads((out / "audit.json").read_text())
    assert doc["decision"]["rule"] == "fdr" and doc["summary"]["rule"] == "fdr" and cal["decision"]["fdr_q"] == 0.2
    assert doc["summary"]["n_outliers"] == k and doc["drift"]["n_flagged"] == doc["summary"]["n_flagged_tpr"]
    assert "Conformal p-values" in (out / "report.html").read_text()


def test_bad_configuration_exits_2_and_writes_nothing(data, tmp_path, capsys):
    root, w = data
    other = tmp_path / "other_tuning.json"
    other.write_text(json.dumps({"temperature": 10, "epsilon": 0.001, "model_id": "cifar_resnet20@sha256:0000"}))
    base = ["audit", "--corpus", str(root / "corpus"), *_model_args(w)]
    old_cal = tmp_path / "old_calibration.json"  # written before calibrations kept their held-out scores
    old_cal.write_text(json.dumps({"delta": 0.1, "n_heldout": 100, "order_statistic_k": 95, "target_tpr": 0.95,
                                   "model_id": load_model("cifar_resnet20", w).model_id, "temperature": 1000.0,
                                   "epsilon": 0.0014, "method": "odin"}))
    cases = [
        ([*base, "--heldout", str(root / "held"), "--fdr", "0.001"], "need at least 999"),
        ([*base, "--heldout", str(root / "held"), "--fdr", "0"], "--fdr must be"),
        ([*base, "--calibration", str(old_cal), "--fdr", "0.1"], "keeps no held-out scores"),
        ([*base, "--heldout", str(root / "held"), "--tuning", str(other), "--temperature", "5"], "not both"),
        ([*base, "--heldout", str(root / "held"), "--tuning", str(other)], "tuned for model"),
        ([*base, "--heldout", str(root / "held"), "--tuning", str(tmp_path / "none.json")], "not found"),
        ([*base], "--heldout"),
        ([*base, "--heldout", str(root / "held"), "--heldout-split", "x"], "exactly one"),
        ([*base, "--heldout", str(root / "few")], "at least 100"),
        ([*base, "--heldout", str(root / "held"), "--ood", "noise"], "NAME=SRC"),
        ([*base, "--heldout", str(root / "held"), "--ood", f"a={root}", "--ood", f"a={root}"], "differ"),
        ([*base, "--heldout", str(root / "held"), "--tpr", "1"], "tpr"),
        ([*base, "--heldout", str(root / "held"), "--epsilon", "3"], "epsilon"),
        ([*base, "--heldout", str(root / "held"), "--shard-rows", "0"], "--shard-rows"),
        ([*base, "--heldout", str(root / "held"), "--object-store-mib", "8"], "--object-store-mib"),
        ([*base, "--heldout-split", "heldout"], "split"),
        (["audit", "--corpus", str(root / "corpus"), "--heldout", str(root / "held"), "--model", "nope"], "model"),
        # every source is listed before the first is scored: a missing corpus or OOD set writes nothing
        (["audit", "--corpus", str(root / "missing"), "--heldout", str(root / "held"), *_model_args(w)], "corpus"),
        ([*base, "--heldout", str(root / "held"), "--ood", f"x={root / 'missing'}"], "ood/x"),
    ]
    for i, (argv, msg) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert cli([*argv, "--output", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err, (msg, err)
        assert not out.exists()
    # every set's score directory is checked before the first set is scored: a corpus/ of another
    # configuration refuses the audit before heldout/ is scored (or created)
    out = tmp_path / "other_config"
    (out / "corpus").mkdir(parents=True)
    job = {"run_id": "r", "config": {"temperature": 5.0, "epsilon": 0.0}, "layout": {"buckets": 1}}
    (out / "corpus" / "_odin_job.json").write_text(json.dumps(job))
    assert cli([*base, "--heldout", str(root / "held"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "corpus scores:" in err and "another configuration" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["corpus"]
    assert [p.name for p in (out / "corpus").iterdir()] == ["_odin_job.json"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli([*base, "--heldout", str(root / "held"), "--output", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "x"


@pytest.mark.slow
def test_failure_after_scoring_is_not_a_configuration_error(ray_head, data, tmp_path):
    """100 held-out files are listed (enough for 95%), but 10 do not decode: after scoring only 90 are
    usable. That is exit 4 with a message saying scoring's outputs are kept — not exit 2."""
    root, w = data
    held = tmp_path / "held"
    _write(held, smooth_images(90, 11))
    for i in range(10):
        (held / f"bad{i}.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    proc = run_command([sys.executable, "-m", "jobs.cli", "audit", "--corpus", str(root / "corpus"), "--heldout",
                           str(held), "--output", str(out), *_model_args(w), "--quiet"],
                          cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "scoring finished" in proc.stderr and "90 held-out" in proc.stderr and "at least 100" in proc.stderr
    # the held-out failures: how many, the first few ids with their messages, and what to do
    assert "10 held-out image(s) failed to score" in proc.stderr and "bad0.png: " in proc.stderr
    assert "rerun the same command" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((out / "heldout" / "run.json").read_text())["counts"] == {"ok": 90, "error": 10, "total": 100}
    assert not (out / "calibration.json").exists() and not (out / "flags").exists()


def _bucket_audit(root: Path, w: Path, env: dict, put, uri: str, tmp_path: Path, *extra: str
                  ) -> subprocess.CompletedProcess:
    for name in ("held", "corpus"):
        for p in sorted((root / name).iterdir()):
            put(f"in/{name}/{p.name}", p.read_bytes())
    cwd = tmp_path / "cwd"  # the command runs here: it must create nothing local
    cwd.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "jobs.cli", "audit", "--corpus", f"{uri}/in/corpus", "--heldout", f"{uri}/in/held",
            "--output", f"{uri}/audit", *_model_args(w), "--quiet", *extra]
    first = run_command(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
    assert first.returncode == 0, first.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    return run_command(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def _check_bucket_outputs(fs, prefix: str, again: subprocess.CompletedProcess, flags_format: str) -> None:
    import pyarrow as pa
    import pyarrow.dataset as ds
    from pyarrow import fs as pafs

    from odin_engine.io.delta import DeltaLocation

    assert again.returncode == 0, again.stderr[-3000:]

    with fs.open_input_stream(f"{prefix}/audit/current.json") as fh:  # the pointer to the current result
        result = json.loads(fh.read())["path"]

    def read(name: str) -> bytes:
        with fs.open_input_stream(f"{prefix}/audit/{result}/{name}") as fh:
            return fh.read()

    cal = json.loads(read("calibration.json"))
    doc = json.loads(read("audit.json"))
    assert all(r["scored_this_run"] == 0 for r in doc["score_runs"].values())  # the rerun resumed
    assert doc["score_runs"]["corpus"]["already_done"] == 31
    assert doc["flags_format"] == flags_format  # the corpus score table's format
    if doc["flags_format"] == "delta":  # the flags table's version this result committed (S3)
        table = DeltaLocation(fs, f"{prefix}/audit/flags").open(version=doc["flags_version"])
        parts = [f"{prefix}/audit/flags/{p}" for p in pa.table(table.get_add_actions()).column("path").to_pylist()]
    else:  # --table-format buckets (GCS): the result's own folder
        parts = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{prefix}/audit/{result}/flags"))
                 if i.path.endswith(".parquet")]
    flags = ds.dataset(parts, filesystem=fs).to_table().to_pandas()
    assert len(flags) == 31 and cal["n_heldout"] == 100
    ok = flags[flags["status"] == "ok"]
    assert (ok["is_outlier"].astype(bool) == (ok["odin"] < cal["delta"])).all()
    assert b"data:image/png;base64," in read("report.html") and b"scored by an earlier run" in read("report.html")


@pytest.mark.slow
def test_audit_s3_to_s3_creates_nothing_local_and_resumes(ray_head, s3_server, s3_bucket, data, tmp_path):
    root, w = data
    client = s3_server.client()
    again = _bucket_audit(root, w, dict(ray_head.env, **s3_server.env),
                          lambda key, body: client.put_object(Bucket=s3_bucket, Key=key, Body=body),
                          f"s3://{s3_bucket}", tmp_path)
    _check_bucket_outputs(s3_server.filesystem(), s3_bucket, again, "delta")


@pytest.mark.slow
def test_audit_gcs_to_gcs_creates_nothing_local_and_resumes(ray_head, gcs_server, data, tmp_path):
    import os
    import time

    root, w = data
    fs = gcs_server.filesystem()
    bucket = f"odin-audit-{os.getpid()}-{int(time.time())}"
    fs.create_dir(bucket)

    def put(key: str, body: bytes) -> None:
        with fs.open_output_stream(f"{bucket}/{key}") as fh:
            fh.write(body)

    # the score tables in the bucket-file layout: delta-rs's GCS client speaks GCS's XML API, which
    # the emulator lacks (it serves the JSON API pyarrow uses), so the Delta layout is tested on S3
    again = _bucket_audit(root, w, dict(ray_head.env, **gcs_server.env), put, f"gs://{bucket}", tmp_path,
                          "--table-format", "buckets")
    _check_bucket_outputs(fs, bucket, again, "buckets")
