"""Scheduled audits (issue #10 items 2–3) through `odin-audit audit`: a frozen --calibration, the
--history row per audit, and --fail-on-drift's exit 3 — end to end on a real local Ray head — and
every bad configuration of the new flags exits 2 with nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _odin_helpers import random_weights, smooth_images
from jobs.cli import main as cli
from odin_engine.decide.calibration import calibrate
from odin_engine.decide.history import read_history
from odin_engine.io.results import open_flags
from odin_engine.io.store import Store
from odin_engine.loading import load_model
from _forkserver import run_command

REPO = Path(__file__).resolve().parents[1]


def _write(d: Path, imgs: np.ndarray, prefix: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(d / f"{prefix}{i:04d}.png")


# --------------------------------------------------------------------------- bad configuration (no Ray)
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, two models, and a calibration.json made for model 0 with T = 1000, ε = 0.0014."""
    root = tmp_path_factory.mktemp("scheduled")
    w0, w1 = random_weights(root / "w0.pt", 0), random_weights(root / "w1.pt", 1)
    _write(root / "corpus", smooth_images(12, 3), "c")
    m = load_model("cifar_resnet20", w0)
    cal = {"version": 1, **calibrate(np.random.default_rng(0).standard_normal(200), 0.95), "method": "odin",
           "model_id": m.model_id, "temperature": 1000.0, "epsilon": 0.0014,
           "created_at": "2026-11-01T00:00:00+00:00", "mean": list(m.mean), "std": list(m.std),
           "input_size": m.input_size, "resize": "crop"}
    (root / "cal").mkdir()
    (root / "cal" / "calibration.json").write_text(json.dumps(cal))
    return root, w0, w1


def test_frozen_calibration_for_other_settings_or_bad_alpha_exits_2_and_writes_nothing(setup, tmp_path, capsys):
    root, w0, w1 = setup
    cal = str(root / "cal" / "calibration.json")
    base = ["audit", "--corpus", str(root / "corpus"), "--model", "cifar_resnet20", "--history", str(tmp_path / "h")]
    m0 = [*base, "--weights", str(w0)]
    cases = [
        ([*base, "--weights", str(w1), "--calibration", cal], "model_id: "),  # another model
        ([*m0, "--calibration", cal, "--temperature", "1"], "temperature: 1000.0 there vs 1.0 now"),
        ([*m0, "--calibration", cal, "--epsilon", "0"], "epsilon: 0.0014 there vs 0.0 now"),
        ([*m0, "--calibration", cal, "--resize", "stretch"], "resize: 'crop' there vs 'stretch' now"),
        ([*m0, "--calibration", cal, "--method", "energy"], "method: 'odin' there vs 'energy' now"),
        ([*m0, "--calibration", cal, "--tpr", "0.9"], "target_tpr"),
        ([*m0, "--calibration", cal, "--input-size", "64"], "input_size: 32 there vs 64 now"),
        ([*m0, "--calibration", str(root / "nope.json")], "calibration not found"),
        ([*m0, "--calibration", str(root / "cal"), "--fail-on-drift", "1.5"], "--fail-on-drift"),
        ([*m0, "--calibration", str(root / "cal"), "--fail-on-drift", "0"], "--fail-on-drift"),
        ([*m0, "--calibration", str(root / "cal"), "--fail-on-drift", "nan"], "--fail-on-drift"),
        ([*m0, "--heldout", str(root / "corpus"), "--fail-on-drift", "1"], "--fail-on-drift"),
        ([*m0, "--calibration", cal, "--history", str(root / "w0.pt")], "--history"),  # a file, not a directory
        # the split column is checked before scoring, also when δ comes from --calibration
        ([*m0, "--calibration", cal, "--heldout-split", "heldout"], "`split` column"),
    ]
    for i, (argv, msg) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert cli([*argv, "--output", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err, (msg, err)
        assert not out.exists() and not (tmp_path / "h").exists()
    # the config file takes the new keys, spelled like the flags
    for weights, alpha, msg in ((w0, 1.5, "--fail-on-drift"), (w1, 0.01, "model_id: ")):
        toml = tmp_path / "audit.toml"
        toml.write_text(f'[audit]\ncorpus = "{root / "corpus"}"\nmodel = "cifar_resnet20"\nweights = "{weights}"\n'
                        f'output = "{tmp_path / "cfg_out"}"\ncalibration = "{cal}"\nhistory = "{tmp_path / "h"}"\n'
                        f'fail-on-drift = {alpha}\n')
        assert cli(["audit", "--config", str(toml)]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "cfg_out").exists() and not (tmp_path / "h").exists()


# --------------------------------------------------------------------------- nights end to end (Ray)
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's digit classifier (trained in seconds, cached) and its unseen digits, noise and photo crops."""
    from odin_engine.demo import data as demo_data, model as demo_model

    weights, _ = demo_model.cached_weights(log=None)
    images, _ = demo_data.digits_rgb()
    _, unseen = demo_data.digit_split()
    root = tmp_path_factory.mktemp("nights")
    digits = images[unseen]
    _write(root / "heldout", digits[:100], "held")
    _write(root / "night2", digits[100:160], "d")                      # in-distribution
    _write(root / "night3", digits[160:200], "d")                      # a third of it OOD:
    _write(root / "night3", demo_data.noise_images(10, seed=5)[0], "noise")
    _write(root / "night3", demo_data.photo_crops(10, seed=6)[0], "photo")
    return root, weights


def _audit(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "jobs.cli", "audit", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=500)


@pytest.mark.slow
def test_nightly_audits_with_a_frozen_calibration_history_and_drift_alarm(ray_head, demo, tmp_path):
    """The demo's digits: held-out 100, an in-distribution night of 60, a night of 40 digits + 20 noise/photos."""
    root, weights = demo
    _three_nights(ray_head.env, tmp_path, root, ["--model", "odin_engine.demo.model:build", "--weights", str(weights)],
                  n_heldout=100, n_night=60, is_ood=lambda ids: ids.str.startswith(("noise", "photo")))


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.mark.slow
@pytest.mark.testbed
@pytest.mark.skipif(not (SHARED / "ood" / "mnist_test_pad.npz").is_file(),
                    reason="../shared/data (CIFAR-10 test set, MNIST, ResNet-20 weights) is not present")
def test_nightly_audits_cifar10_resnet20_a_third_mnist(ray_head, tmp_path):
    """Issue #10's words: with a frozen calibration an in-distribution night exits 0 and a night with a
    third of it MNIST exits 3 under --fail-on-drift 0.01 (ResNet-20 on the CIFAR-10 test set)."""
    cifar = np.load(SHARED / "cifar10_test_jpeg_yoongikim.npz", allow_pickle=False)["images"]
    mnist = np.load(SHARED / "ood" / "mnist_test_pad.npz", allow_pickle=False)["images"]
    order = np.random.default_rng(0).permutation(len(cifar))
    root = tmp_path / "data"
    _write(root / "heldout", cifar[order[:200]], "cifar")
    _write(root / "night2", cifar[order[200:350]], "cifar")
    _write(root / "night3", cifar[order[350:450]], "cifar")
    _write(root / "night3", mnist[np.random.default_rng(1).permutation(len(mnist))[:50]], "mnist")
    weights = SHARED / "weights" / "resnet20-12fca82f.th"
    _three_nights(ray_head.env, tmp_path, root, ["--model", "cifar_resnet20", "--weights", str(weights)],
                  n_heldout=200, n_night=150, is_ood=lambda ids: ids.str.startswith("mnist"))


def _three_nights(env: dict, tmp_path: Path, root: Path, model: list[str], n_heldout: int, n_night: int,
                  is_ood) -> None:
    """Night 1 calibrates on root/heldout (its corpus: root/night2); night 2 (root/night2, in
    distribution) and night 3 (root/night3, a third OOD) reuse that calibration, append to one history
    and test for drift at 0.01."""
    model = [*model, "--quiet"]
    # night 1 (the calibrating audit): δ from a held-out set
    cal_dir = tmp_path / "calibrations"
    first = _audit(["--corpus", str(root / "night2"), "--heldout", str(root / "heldout"), "--output", str(cal_dir),
                    *model], env)
    assert first.returncode == 0, first.stderr[-3000:]
    cal = json.loads((cal_dir / "calibration.json").read_text())
    assert cal["n_heldout"] == n_heldout and (cal["temperature"], cal["epsilon"]) == (1000.0, 0.0014)
    assert (cal["input_size"], cal["resize"], len(cal["mean"])) == (32, "crop", 3)  # the scoring settings
    assert "frozen_from" not in cal
    assert len(cal["heldout_quantiles"]) == 201 and cal["heldout_quantiles"] == sorted(cal["heldout_quantiles"])
    assert json.loads((cal_dir / "audit.json").read_text())["drift"]["p_value"] is not None

    # night 2, in distribution: the config file keeps the held-out set (as deploy/audit.toml does) and
    # names the nightly keys; the held-out set is ignored, not scored
    history = tmp_path / "history"
    # the deploy recipe: one --output per model, every night (incremental scoring reuses its rows)
    out2 = out3 = tmp_path / "audits" / "model"
    toml = tmp_path / "audit.toml"
    toml.write_text(f'[audit]\ncorpus = "{root / "night2"}"\nheldout = "{root / "heldout"}"\n'
                    f'calibration = "{cal_dir}"\nhistory = "{history}"\nfail-on-drift = 0.01\n'
                    f'temperature = 1000.0\nepsilon = 0.0014\ntpr = 0.95\n')
    second = _audit(["--config", str(toml), "--output", str(out2), *model], env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "--heldout" in second.stderr and "ignored" in second.stderr
    doc2 = json.loads((out2 / "audit.json").read_text())
    assert set(doc2["score_runs"]) == {"corpus"} and not (out2 / "heldout").exists()  # no held-out set scored
    assert doc2["delta"] == cal["delta"] and doc2["calibration_from"] == str(cal_dir)
    cal2 = json.loads((out2 / "calibration.json").read_text())
    assert cal2["frozen_from"] == str(cal_dir) and cal2["created_at"] == cal["created_at"]
    assert doc2["drift"]["alarm"] is False and doc2["drift"]["p_value"] >= 0.01
    rows = read_history(Store(str(history)))
    assert len(rows) == 1 and rows["n_ok"].iloc[0] == n_night and not rows["alarm"].iloc[0]
    assert rows["calibration_from"].iloc[0] == str(cal_dir) and rows["delta"].iloc[0] == cal["delta"]
    report2 = (out2 / "report.html").read_text()
    assert "<h2>History</h2>" in report2
    assert "drawn from its 201 held-out quantiles" in report2  # the frozen audit still shows the held-out side

    # night 3, a third of it OOD: the deploy recipe's flags; exit 3 after every output is written
    third = _audit(["--config", str(toml), "--corpus", str(root / "night3"), "--output", str(out3),
                    "--calibration", str(cal_dir / "calibration.json"), "--history", str(history),
                    "--fail-on-drift", "0.01", *model], env)
    assert third.returncode == 3, third.stderr[-3000:]
    assert "DRIFT ALARM: flagged" in third.stderr and "p = " in third.stderr
    print(third.stderr.strip().splitlines()[-1])  # the alarm line (README quotes the test bed's)
    for name in ("calibration.json", "flag_summary.json", "report.html", "audit.json"):
        assert (out3 / name).is_file(), name
    assert not (out3 / "heldout").exists()
    flags = open_flags(str(out3)).to_pandas()
    assert len(flags) == n_night
    ood = is_ood(flags["image_id"])
    assert flags.loc[ood, "is_outlier"].astype(bool).mean() > 0.5  # the OOD third is what is flagged
    doc3 = json.loads((out3 / "audit.json").read_text())
    assert doc3["drift"]["alarm"] is True and doc3["drift"]["p_value"] < 0.01
    rows = read_history(Store(str(history)))
    assert len(rows) == 2 and rows["alarm"].tolist() == [False, True]  # one row per night
    assert rows["n_flagged"].iloc[1] == doc3["summary"]["n_outliers"]
    report = (out3 / "report.html").read_text()
    assert "<h2>History</h2>" in report and "2 audit(s); 1 drift alarm(s)" in report


def test_readme_scheduled_audits_lists_every_exit_code():
    from jobs.audit import EXIT_CODES

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Scheduled audits"):]
    section = section[:section.index("\n## ", 1)]
    assert sorted(int(c) for c in re.findall(r"^\| (\d) \|", section, re.M)) == sorted(EXIT_CODES)
    assert "--calibration" in section and "--history" in section and "--fail-on-drift" in section
