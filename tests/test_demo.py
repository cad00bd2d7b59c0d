"""The built-in demo: its model, its images, and the whole `odin-audit demo` run end to end."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from odin_engine import load_model
from odin_engine.io.results import open_flags
from odin_engine.demo import data as demo_data, model as demo_model

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the demo model once (the default recipe) into a fresh cache; time it."""
    cache = tmp_path_factory.mktemp("odin-cache")
    t0 = time.perf_counter()
    weights, info = demo_model.cached_weights(cache_dir=cache, log=None)
    return cache, weights, info, time.perf_counter() - t0


def test_training_is_quick_accurate_and_cached(trained):
    cache, weights, info, seconds = trained
    assert info["cached"] is False
    # "well under a minute on 2 CPU cores": generous bound, since CI shares the cores.
    assert seconds < 60, f"training took {seconds:.1f} s"
    assert info["unseen_accuracy"] > 0.95, info
    assert info["n_train"] == demo_data.TRAIN_SIZE and info["n_unseen"] == demo_data.N_DIGITS - demo_data.TRAIN_SIZE
    # a plain state_dict: loads with weights_only=True
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    # second call: read from the cache, no training
    t0 = time.perf_counter()
    again, info2 = demo_model.cached_weights(cache_dir=cache, log=None)
    assert again == weights and info2["cached"] is True and time.perf_counter() - t0 < 5
    # the recipe key changes with the recipe
    assert demo_model.Recipe(seed=1).key() != demo_model.Recipe().key()


def test_weights_load_through_the_engine_spec(trained):
    _, weights, info, _ = trained
    m = load_model("odin_engine.demo.model:build", str(weights))
    assert (m.input_size, m.num_classes, m.mean, m.std) == (32, 10, demo_model.MEAN, demo_model.STD)
    images, targets = demo_data.digits_rgb()
    _, unseen = demo_data.digit_split()
    x = torch.from_numpy(images[unseen]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(m.mean).view(1, 3, 1, 1)) / torch.tensor(m.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        acc = float((m.module(x).argmax(1).numpy() == targets[unseen]).mean())
    assert acc == pytest.approx(info["unseen_accuracy"], abs=1e-9)


def test_training_is_seeded():
    r = demo_model.Recipe(epochs=1)
    a, _ = demo_model.train(r, log=None)
    b, _ = demo_model.train(r, log=None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_images(tmp_path):
    imgs = demo_data.write_demo_images(tmp_path, n_heldout=50, n_corpus_id=40, n_corpus_ood=21)
    assert imgs.counts == {"heldout_id": 50, "corpus_id": 40, "corpus_ood_photo": 10, "corpus_ood_noise": 11}
    with open(imgs.corpus_manifest) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 61 and {r["label"] for r in rows} == {"id", "ood"}
    assert sum(r["label"] == "ood" for r in rows) == 21
    assert {demo_data.image_kind(r["image_id"]) for r in rows} == {"digit", "photo", "noise"}
    for r in rows:  # manifest paths are relative to the manifest's folder, and every file is a 32×32 RGB PNG
        with Image.open(tmp_path / r["path"]) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
    # held-out, corpus and training digits never overlap
    train, _ = demo_data.digit_split()
    idx = lambda names: {int(re.search(r"-(\d{4})\.png$", n).group(1)) for n in names}  # noqa: E731
    held = idx(p.name for p in imgs.heldout_dir.iterdir())
    corpus = idx(r["path"] for r in rows if r["label"] == "id")
    assert len(held) == 50 and len(corpus) == 40
    assert not (held & corpus) and not (held & set(train.tolist())) and not (corpus & set(train.tolist()))
    ood = demo_data.write_ood_sets(tmp_path, 6)
    assert sorted(len(list(d.iterdir())) for d in ood.values()) == [6, 6]


def test_demo_rejects_impossible_sizes(tmp_path):
    p = subprocess.run([str(VENV_BIN / "odin-audit"), "demo", "--heldout", "700", "--corpus-id", "200",
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "--heldout + --corpus-id must be <= 797" in p.stderr
    p = subprocess.run([str(VENV_BIN / "odin-audit"), "demo", "--heldout", "50", "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "50 held-out digits (--heldout) are too few" in p.stderr, p.stderr
    assert "need at least 100" in p.stderr
    assert not (tmp_path / "o").exists()


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.fixture(scope="module")
def demo_run(trained, tmp_path_factory):
    """One `odin-audit demo` run at small sizes, shared by the checks below."""
    cache, _, _, _ = trained
    cwd = tmp_path_factory.mktemp("demo-cwd")
    out = cwd / "out" / "demo"
    cmd = [str(VENV_BIN / "odin-audit"), "demo", "--output", str(out), "--cache-dir", str(cache),
           "--heldout", "200", "--corpus-id", "120", "--corpus-ood", "80", "--eval-ood", "40", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=_env())
    return cwd, out, p


@pytest.mark.slow
def test_demo_end_to_end(demo_run):
    """`odin-audit demo` at small sizes: real training cache, PNG files, local Ray, the audit, the report."""
    _, out, p = demo_run
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    s = json.loads((out / "demo-summary.json").read_text())
    g = s["groups"]
    assert (g["id_digits"]["n"], g["ood_photos"]["n"], g["ood_noise"]["n"]) == (120, 40, 40)
    # the flags make sense: few digits flagged (δ keeps 95% of held-out digits), most OOD flagged
    assert g["id_digits"]["rate"] <= 0.15, g
    assert g["ood_all"]["rate"] >= 0.80, g
    assert g["ood_noise"]["rate"] >= 0.90, g
    assert s["model"]["cached"] is True
    # the figures are printed, and they are the summary's
    stdout = p.stdout
    assert "flagged as out-of-distribution" in stdout
    for key in ("id_digits", "ood_photos", "ood_noise", "ood_all"):
        assert f"{100 * g[key]['rate']:6.1f}%" in stdout, key
    assert f"report:  {out / 'audit' / 'report.html'}" in stdout
    # the wall-time line names every part, and the parts add up to the whole command
    m = re.search(r"wall time: ([0-9.]+) s since the command started \(start-up and imports ([0-9.]+) s, "
                  r"model ([0-9.]+) s, images ([0-9.]+) s, audit ([0-9.]+) s, summary and Ray shutdown ([0-9.]+) s\)",
                  stdout)
    assert m, stdout[-2000:]
    total, *parts = map(float, m.groups())
    assert sum(parts) == pytest.approx(total, abs=0.3) and min(parts) >= 0 and parts[0] > 0.5
    sec = s["seconds"]
    assert [sec[k] for k in ("command", "startup", "model", "images", "audit", "finish")] == pytest.approx(
        [total, *parts], abs=0.051)
    # the report is real: an HTML page with embedded images, and the evaluation ran
    html = (out / "audit" / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "data:image/png;base64," in html
    assert set(s["evaluation"]) == {"photos", "noise"}
    assert s["evaluation"]["noise"]["odin"]["auroc"] > 0.9
    # flags cover every corpus image exactly once
    import pandas as pd

    flags = open_flags(str(out / "audit")).to_pandas()
    assert len(flags) == 200 and flags["image_id"].is_unique
    # δ and the rates recomputed from the score files alone (not from anything the demo derived):
    # δ = the ceil(0.95·n)-th largest held-out ODIN score; flagged = corpus score < δ
    held = _score_rows(out / "audit" / "heldout")
    held = np.sort(held.loc[held["status"] == "ok", "odin"].to_numpy(np.float64))[::-1]
    assert len(held) == 200
    delta = held[int(np.ceil(0.95 * len(held))) - 1]
    assert s["delta"] == pytest.approx(delta, rel=1e-12)
    assert f"threshold δ={delta:.6g}" in stdout
    corpus = _score_rows(out / "audit" / "corpus")
    truth = pd.read_csv(out / "images" / "corpus.csv", dtype=str)[["image_id", "label"]]
    corpus = corpus.drop(columns=["label"], errors="ignore").merge(truth, on="image_id", how="inner")
    assert len(corpus) == 200 and (corpus["status"] == "ok").all()
    flagged = corpus["odin"].to_numpy(np.float64) < delta
    for key, label in (("id_digits", "id"), ("ood_all", "ood")):
        sel = (corpus["label"] == label).to_numpy()
        assert (g[key]["n"], g[key]["flagged"]) == (int(sel.sum()), int(flagged[sel].sum())), key


def _score_rows(score_dir: Path):
    """Every row of a score run's table, read by delta-rs (its current version)."""
    from deltalake import DeltaTable

    df = DeltaTable(str(score_dir / "scores")).to_pandas()
    assert len(df), f"no score rows under {score_dir}"
    assert df["image_id"].is_unique
    return df


README = (REPO / "README.md").read_text()


def _readme_blocks(tag: str, lang: str) -> list[str]:
    return re.findall(rf"<!-- tested: {tag} -->\n```{lang}\n(.*?)```", README, re.S)


@pytest.mark.slow
def test_readme_recipes_run_on_the_demo_output(demo_run):
    """README's pandas and DuckDB recipes, run as written (from the directory the demo ran in)."""
    cwd, out, p = demo_run
    assert p.returncode == 0
    blocks = _readme_blocks("demo-output", "python")
    assert len(blocks) == 2
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, code + r.stderr[-3000:]
        assert r.stdout.strip(), "a recipe printed nothing"
    duck = subprocess.run([sys.executable, "-c", blocks[1] + "\nimport json; print(json.dumps(rows))"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    rows = {label: (n, rate) for label, n, rate in json.loads(duck.stdout.strip().splitlines()[-1])}
    s = json.loads((out / "demo-summary.json").read_text())["groups"]
    assert rows["id"] == (120, pytest.approx(s["id_digits"]["rate"]))
    assert rows["ood"] == (80, pytest.approx(s["ood_all"]["rate"]))


@pytest.mark.slow
def test_readme_followup_commands_run_on_the_demo_output(demo_run):
    """README's "try the other commands" block: tune on the demo's files, then audit with tuning.json."""
    cwd, out, p = demo_run
    assert p.returncode == 0
    (block,) = _readme_blocks("demo-followup", "bash")
    script = block.replace(".venv/bin/", f"{VENV_BIN}/")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tuning = json.loads((out / "tuning.json").read_text())
    audit = json.loads((out / "audit-tuned" / "audit.json").read_text())
    assert audit["settings_from"].startswith("tuning file")
    assert (audit["temperature"], audit["epsilon"]) == (tuning["temperature"], tuning["epsilon"])
    assert (out / "audit-tuned" / "report.html").is_file()
