"""`odin-audit fit` and the --fit/--reference/--method plumbing: exit 2 cases (no Ray), a fit on a
bucket through Ray, and (test bed) `tune` choosing a non-ODIN method that `audit --tuning` then uses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_images
from _forkserver import run_command
from jobs.cli import main as cli
from odin_engine.io.results import open_flags

from _odin_helpers import shared_data


def _audit_base(tmp_path, tiny_model):
    corpus, held = tmp_path / "corpus", tmp_path / "held"
    make_images(corpus, 3)
    make_images(held, 3)
    return ["audit", "--corpus", str(corpus), "--output", str(tmp_path / "out"), *tiny_model.cli], held


def test_fitted_method_without_fit_exits_2_naming_fit(tmp_path, tiny_model, capsys):
    base, held = _audit_base(tmp_path, tiny_model)
    assert cli([*base, "--heldout", str(held), "--method", "knn"]) == 2
    err = capsys.readouterr().err
    assert "odin-audit fit" in err and "--fit" in err
    assert not (tmp_path / "out").exists()


def test_methods_option_is_checked_before_anything_is_written(tmp_path, tiny_model, capsys):
    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    base = ["score", "--input", str(corpus), "--output", str(tmp_path / "out"), *tiny_model.cli]
    assert cli([*base, "--methods", "default,knn"]) == 2
    assert "--methods knn needs fitted reference statistics" in capsys.readouterr().err
    assert cli([*base, "--methods", "default,nope"]) == 2
    assert "--methods: unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reference_equal_to_heldout_exits_2(tmp_path, tiny_model, capsys):
    base, held = _audit_base(tmp_path, tiny_model)
    assert cli([*base, "--heldout", str(held), "--reference", str(held) + "/", "--method", "knn"]) == 2
    assert "must not be the held-out set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fit_of_a_model_without_linear_head_exits_2(tmp_path, capsys):
    ref = tmp_path / "ref"
    make_images(ref, 2)
    out = tmp_path / "fit.npz"
    rc = cli(["fit", "--reference", str(ref), "--model", "test_detectors:no_head", "--input-size", "32", "--mean", "0.5,0.5,0.5",
              "--std", "0.25,0.25,0.25",
              "--output", str(out)])
    assert rc == 2 and "calls no nn.Linear" in capsys.readouterr().err and not out.exists()
    rc = cli(["fit", "--reference", str(ref), "--model", "cifar_resnet20", "--weights", "x.th", "--output", str(out)])
    assert rc == 2 and not out.exists()


@pytest.mark.slow
def test_fit_on_a_bucket_then_score_with_it(ray_head, s3_server, s3_bucket, tiny_model, tmp_path):
    from odin_engine.detectors.fit import FitStats
    from odin_engine.io.scores import ScoreTable

    client = s3_server.client()
    for p in make_images(tmp_path / "ref", 10):
        client.put_object(Bucket=s3_bucket, Key=f"ref/{p.name}", Body=p.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="ref/broken.png", Body=b"not an image")
    env = dict(ray_head.env, **s3_server.env)
    fit_uri = f"s3://{s3_bucket}/fits/fit.npz"
    proc = run_command([sys.executable, "-m", "jobs.fit", "--reference", f"s3://{s3_bucket}/ref", "--output",
                           fit_uri, *tiny_model.cli, "--bank-size", "4"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs = s3_server.filesystem()
    with fs.open_input_stream(f"{s3_bucket}/fits/fit.npz") as fh:
        fit = FitStats.from_bytes(fh.read())
    assert fit.n_reference == 10 and fit.bank.shape == (4, 64) and fit.sources["n_undecodable"] == 1
    np.testing.assert_allclose(np.linalg.norm(fit.bank, axis=1), 1.0, rtol=1e-5)

    corpus = tmp_path / "corpus"
    make_images(corpus, 5)
    out = tmp_path / "scores"
    proc = run_command([sys.executable, "-m", "jobs.score", "--input", str(corpus), "--output", str(out),
                           *tiny_model.cli, "--fit", fit_uri, "--methods", "default,adascale"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = ScoreTable.open(str(out)).read().to_pandas()
    assert table[["knn", "vim", "nci", "fdbd", "react", "adascale", "scale", "gen"]].notna().all().all()
    # the job's scores are the engine's with the same fit
    from odin_engine.loading import load_model
    from odin_engine.scorer import OdinScorer
    from odin_engine.io.images import decode_image

    table = table.sort_values("image_id")
    imgs = np.stack([decode_image(open(u, "rb").read(), 32)[0] for u in table["uri"]])
    alone = OdinScorer(load_model(tiny_model.spec, tiny_model.weights), device="cpu", fit=fit).score(imgs)
    np.testing.assert_allclose(table["knn"].to_numpy(), alone["knn"], rtol=1e-5)


def _write_pngs(folder, images):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"img_{i:05d}.png")


@pytest.mark.slow
@pytest.mark.testbed
def test_tune_picks_a_non_odin_method_on_the_test_bed_and_audit_decides_with_it(ray_head, tmp_path):
    data = shared_data()
    weights = data / "weights" / "resnet20-12fca82f.th"
    if not weights.is_file():
        pytest.skip(f"test bed absent: {weights} not found (../shared/data)")
    from odin_engine.detectors.reference import fit_images
    from odin_engine.loading import load_model

    cifar_npz = data / "cifar10_test_jpeg_yoongikim.npz"
    with np.load(cifar_npz) as z:
        cifar = z["images"]
    with np.load(data / "ood" / "tin_crop.npz") as z:
        tin = z["images"]
    model = load_model("cifar_resnet20", str(weights))
    fit = fit_images(model, cifar[:1000], temperature=1000.0, device="cpu",
                     sources={"reference": f"{cifar_npz}[0:1000]"})
    fit_path = tmp_path / "fit.npz"
    fit_path.write_bytes(fit.to_bytes())
    tuning = tmp_path / "tuning.json"
    rc = cli(["tune", "--heldout", f"{cifar_npz}[5000:5400]", "--ood", f"tin={data / 'ood' / 'tin_crop.npz'}[0:300]",
              "--ood", f"photo={data / 'ood' / 'photo_crops.npz'}[0:300]", "--model", "cifar_resnet20",
              "--weights", str(weights), "--fit", str(fit_path), "--temperatures", "1000", "--epsilons", "0,0.0014",
              "--output", str(tuning), "--quiet"])
    assert rc == 0
    doc = json.loads(tuning.read_text())
    comp = doc["comparison"]
    best = min(comp["best"].items(), key=lambda kv: (kv[1]["mean_fpr"], -kv[1]["mean_auroc"]))
    assert doc["method"] == comp["winner"]["method"] == best[0]  # what its own table says is best
    assert doc["method"] != "odin" and comp["best"][doc["method"]]["mean_fpr"] < comp["best"]["odin"]["mean_fpr"]

    held, corpus = tmp_path / "held", tmp_path / "corpus"
    _write_pngs(held, cifar[5400:5520])
    _write_pngs(corpus, np.concatenate([cifar[5520:5540], tin[400:420]]))
    out = tmp_path / "audit"
    env = ray_head.env
    proc = run_command([sys.executable, "-m", "jobs.audit", "--corpus", str(corpus), "--heldout", str(held),
                           "--output", str(out), "--model", "cifar_resnet20", "--weights", str(weights),
                           "--tuning", str(tuning), "--fit", str(fit_path), "--quiet"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    audit = json.loads((out / "audit.json").read_text())
    assert audit["method"] == doc["method"]
    assert f"({doc['method']}," in proc.stdout
    report = (out / "report.html").read_text()
    assert "Detector comparison" in report and f"{doc['method']} (decided)" in report


def test_calibration_refuses_corpus_and_heldout_scored_with_different_fits():
    """A fitted method's score is a distance to one fit's statistics: corpus and held-out scores made
    with different --fit files (the digest in each table's Parquet metadata) cannot share a δ."""
    import pandas as pd
    import pyarrow as pa

    from odin_engine.decide.calibration import calibrate_tables
    from odin_engine.errors import ConfigError
    from odin_engine.io.scores import FIT_ID_KEY, ScoreTable
    from odin_engine.settings import CalibrationSettings

    def table(prefix: str, n: int, fit_id: str | None) -> ScoreTable:
        rng = np.random.default_rng(len(prefix))
        frame = pd.DataFrame({"image_id": [f"{prefix}{i}" for i in range(n)], "status": "ok", "model_id": "m",
                              "temperature": 1.0, "epsilon": 0.0, "knn": rng.standard_normal(n),
                              "odin": rng.standard_normal(n)})
        t = pa.Table.from_pandas(frame, preserve_index=False)
        return ScoreTable.from_table(t.replace_schema_metadata({FIT_ID_KEY: fit_id} if fit_id is not None else {}))

    settings = CalibrationSettings(0.8, "knn")
    with pytest.raises(ConfigError, match="different --fit files.*aaaa vs bbbb"):
        calibrate_tables(table("c", 30, "aaaa"), table("h", 40, "bbbb"), settings)
    assert calibrate_tables(table("c", 30, "aaaa"), table("h", 40, "aaaa"), settings)["fit_id"] == "aaaa"
    # a table rewritten by another tool keeps no metadata: nothing to compare, the known digest is kept
    assert calibrate_tables(table("c", 30, None), table("h", 40, "aaaa"), settings)["fit_id"] == "aaaa"
    # a method without a fit does not depend on it
    assert calibrate_tables(table("c", 30, "aaaa"), table("h", 40, "bbbb"),
                            CalibrationSettings(0.8, "odin"))["fit_id"] is None
    # a frozen calibration records the fit: corpus scores of another fit are refused
    from odin_engine.decide.frozen import check_calibration

    frozen = {"model_id": "m", "method": "knn", "fit_id": "aaaa"}
    with pytest.raises(ConfigError, match="fit_id: 'aaaa' there vs 'bbbb' now"):
        check_calibration(frozen, {"model_id": "m", "fit_id": "bbbb"})
    assert check_calibration(frozen, {"model_id": "m", "fit_id": "aaaa"}) == []


@pytest.mark.slow
def test_audit_with_reference_fits_first_then_decides_with_a_fitted_method(ray_head, tiny_model, tmp_path):
    """`audit --reference SRC --method knn`: the fit runs first into <output>/fit.npz, both score runs
    use it (their Parquet metadata names its digest), and δ records it."""
    import hashlib

    from odin_engine.io.scores import ScoreTable

    ref, corpus, held = tmp_path / "ref", tmp_path / "corpus", tmp_path / "held"
    make_images(ref, 12)
    make_images(corpus, 5)
    make_images(held, 20)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.cli", "audit", "--corpus", str(corpus), "--heldout", str(held),
            "--reference", str(ref), "--bank-size", "8", "--method", "knn", "--tpr", "0.75",
            "--output", str(out), "--quiet", *tiny_model.cli]
    proc = run_command(args, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest = hashlib.sha256((out / "fit.npz").read_bytes()).hexdigest()[:16]
    for name in ("corpus", "heldout"):
        table = ScoreTable.open(str(out / name))
        assert table.fit_id() == digest
        assert table.read(["knn"]).column("knn").null_count == 0
    cal = json.loads((out / "latest" / "calibration.json").read_text())
    assert cal["method"] == "knn" and cal["fit_id"] == digest
    flags = open_flags(str(out)).to_pandas()
    assert len(flags) == 5 and flags["score"].notna().all()
