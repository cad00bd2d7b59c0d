"""(T, ε) tuning: the shared-gradient grid equals separate scoring, the criteria pick their optimum,
tuning.json round-trips through load_tuning, image sources, and the tune command's errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _odin_helpers import noise_images, smooth_images, tiny_model
from jobs.cli import main as cli
from odin_engine.errors import ConfigError
from odin_engine.metrics import auroc, fpr_at_tpr
from odin_engine.scorer import OdinScorer
from odin_engine.decide.tuning import (
    PAPER_EPSILONS, PAPER_TEMPERATURES, load_source, load_tuning, split_source, tune_id_only, tune_paper,
)

REPO_DOCS = Path(__file__).resolve().parents[1] / "docs"
TEMPS = (1.0, 1000.0)
EPS = (0.0, 0.004)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    model, weights = tiny_model(tmp)
    id_imgs = smooth_images(24, 5)
    ood = {"noise": noise_images(16, 6), "flat": np.full((16, 32, 32, 3), 128, np.uint8) + noise_images(16, 7) // 16}
    separate = {}
    for t in TEMPS:
        for e in EPS:
            sc = OdinScorer(model, temperature=t, epsilon=e, device="cpu", batch_size=32)
            separate[(t, e)] = {"id": sc.score(id_imgs)["odin"], **{n: sc.score(x)["odin"] for n, x in ood.items()}}
    return {"model": model, "weights": weights, "id": id_imgs, "ood": ood, "separate": separate, "tmp": tmp}


def test_paper_grid_is_the_papers():
    assert PAPER_TEMPERATURES == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert len(PAPER_EPSILONS) == 21 and PAPER_EPSILONS[0] == 0.0 and PAPER_EPSILONS[-1] == 0.004
    assert np.allclose(np.diff(PAPER_EPSILONS), 0.0002)


def test_paper_mode_picks_the_argmin_of_separately_scored_pairs(setup):
    scorer = OdinScorer(setup["model"], device="cpu", batch_size=32)
    res = tune_paper(scorer, setup["id"], setup["ood"], TEMPS, EPS, tpr=0.95)
    mean_fpr = {}
    for (t, e), s in setup["separate"].items():
        mean_fpr[(t, e)] = np.mean([fpr_at_tpr(s["id"], s[n], 0.95) for n in setup["ood"]])
        i, j = TEMPS.index(t), EPS.index(e)
        assert res["grid"]["mean_fpr_at_tpr"][i][j] == pytest.approx(mean_fpr[(t, e)], abs=1 / 16 + 1e-9)
    best = min(mean_fpr.values())
    chosen = (res["temperature"], res["epsilon"])
    # the shared-gradient scores equal separate scoring to float precision, so the optimum agrees
    # (up to a one-image difference at the threshold, hence the tolerance of one OOD image)
    assert mean_fpr[chosen] <= best + 1 / 16 + 1e-9
    assert res["objective"] == pytest.approx(min(min(r) for r in res["grid"]["mean_fpr_at_tpr"]))
    for n in setup["ood"]:
        assert 0.0 <= res["ood_sets"][n]["fpr_at_tpr"] <= 1.0
    # the reported per-set AUROC is the AUROC of the chosen pair's scores
    s = setup["separate"][chosen]
    assert res["ood_sets"]["noise"]["auroc"] == pytest.approx(auroc(s["id"], s["noise"]), abs=0.02)


def test_score_grid_equals_separate_scoring(setup):
    scorer = OdinScorer(setup["model"], device="cpu", batch_size=32)
    grid = scorer.score_grid(setup["id"], TEMPS, EPS)["odin"]
    for (t, e), s in setup["separate"].items():
        np.testing.assert_allclose(grid[TEMPS.index(t), EPS.index(e)], s["id"], rtol=1e-4, atol=1e-6)


def test_id_only_mode_maximizes_mean_id_score(setup):
    scorer = OdinScorer(setup["model"], device="cpu", batch_size=32)
    res = tune_id_only(scorer, setup["id"], temperature=1000.0, epsilons=EPS)
    means = {e: float(np.mean(setup["separate"][(1000.0, e)]["id"])) for e in EPS}
    assert res["temperature"] == 1000.0
    assert means[res["epsilon"]] == pytest.approx(max(means.values()), rel=1e-4)
    assert res["mode"] == "id-only" and "ood_sets" not in res


def test_split_source_syntax():
    assert split_source("a/b.npz") == ("a/b.npz", None, None)
    assert split_source("a/b.npz[0:5000]") == ("a/b.npz", None, slice(0, 5000))
    assert split_source("b.npz[1::5]") == ("b.npz", None, slice(1, None, 5))
    assert split_source("b.npz:imgs[:10]") == ("b.npz", "imgs", slice(None, 10))
    assert split_source("dir/manifest.csv[10:20]") == ("dir/manifest.csv", None, slice(10, 20))
    for bad in ("b.npz[a:b]", "b.npz[5]", "b.npz[0:10:0]"):
        with pytest.raises(ConfigError):
            split_source(bad)


def test_load_source_npz_directory_and_manifest(tmp_path):
    imgs = smooth_images(12, 1)
    np.savez(tmp_path / "s.npz", images=imgs, labels=np.arange(12))
    got, err = load_source(f"{tmp_path / 's.npz'}[2:10:2]", 32)
    assert err == [] and np.array_equal(got, imgs[2:10:2])
    big = np.repeat(np.repeat(imgs[:2], 2, axis=1), 2, axis=2)  # 64×64
    np.savez(tmp_path / "big.npz", images=big)
    got, _ = load_source(str(tmp_path / "big.npz"), 32)
    assert got.shape == (2, 32, 32, 3)
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(5):
        Image.fromarray(imgs[i]).save(d / f"{i:02d}.png")
    (d / "99.png").write_bytes(b"not an image")
    got, err = load_source(str(d), 32)
    assert np.array_equal(got, imgs[:5])  # PNG is lossless
    assert len(err) == 1 and err[0]["image_id"] == "99.png"
    (tmp_path / "m.csv").write_text("uri\n" + "\n".join(f"dir/{i:02d}.png" for i in range(5)) + "\n")
    got, _ = load_source(f"{tmp_path / 'm.csv'}[1:3]", 32)
    assert np.array_equal(got, imgs[1:3])
    with pytest.raises(ConfigError, match="not found"):
        load_source(str(tmp_path / "missing.npz"), 32)
    with pytest.raises(ConfigError, match="selects no images"):
        load_source(f"{tmp_path / 's.npz'}[20:30]", 32)


def test_tune_cli_writes_tuning_json_that_load_tuning_accepts(setup, tmp_path, capsys):
    np.savez(tmp_path / "id.npz", images=setup["id"])
    np.savez(tmp_path / "ood.npz", images=setup["ood"]["noise"])
    out = tmp_path / "tuning.json"
    rc = cli(["tune", "--heldout", f"{tmp_path / 'id.npz'}[0:20]", "--ood", f"noise={tmp_path / 'ood.npz'}",
              "--model", "cifar_resnet20", "--weights", str(setup["weights"]),
              "--temperatures", "1,1000", "--epsilons", "0,0.004", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["mode"] == "paper" and doc["model_id"] == setup["model"].model_id
    assert doc["sources"]["heldout"]["n"] == 20 and doc["sources"]["ood"]["noise"]["n"] == 16
    assert (doc["temperature"], doc["epsilon"]) in {(t, e) for t in (1.0, 1000.0) for e in (0.0, 0.004)}
    assert load_tuning(out) == (doc["temperature"], doc["epsilon"])
    assert load_tuning(out, expect_model_id=setup["model"].model_id) == (doc["temperature"], doc["epsilon"])
    with pytest.raises(ConfigError, match="tuned for model"):
        load_tuning(out, expect_model_id="other@sha256:00")

    out2 = tmp_path / "idonly.json"
    rc = cli(["tune", "--heldout", str(tmp_path / "id.npz"), "--mode", "id-only", "--model", "cifar_resnet20",
              "--weights", str(setup["weights"]), "--epsilons", "0,0.002,0.004", "--output", str(out2)])
    assert rc == 0
    doc2 = json.loads(out2.read_text())
    assert doc2["mode"] == "id-only" and doc2["temperature"] == 1000.0
    assert len(doc2["grid"]["mean_id_score"][0]) == 3


def test_load_tuning_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    for text, msg in [("{", "not valid JSON"), ("{}", "temperature"), ('{"temperature": -1, "epsilon": 0}', "temperature"),
                      ('{"temperature": 10, "epsilon": 2}', "epsilon")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_tuning(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_tuning(tmp_path / "none.json")


def test_tune_cli_bad_configuration_exits_2_and_writes_nothing(setup, tmp_path, capsys):
    np.savez(tmp_path / "id.npz", images=setup["id"])
    base = ["tune", "--model", "cifar_resnet20", "--weights", str(setup["weights"])]
    out = tmp_path / "t.json"
    cases = [
        ([*base, "--heldout", str(tmp_path / "id.npz"), "--output", str(out)], "--ood"),
        ([*base, "--heldout", str(tmp_path / "id.npz"), "--mode", "id-only", "--output", str(tmp_path / "t.txt")], ".json"),
        ([*base, "--heldout", f"{tmp_path / 'id.npz'}[x:y]", "--mode", "id-only", "--output", str(out)], "slice"),
        ([*base, "--heldout", str(tmp_path / "id.npz"), "--mode", "id-only", "--epsilons", "0,5", "--output", str(out)], "epsilon"),
        (["tune", "--heldout", str(tmp_path / "id.npz"), "--mode", "id-only", "--output", str(out)], "--model"),
    ]
    for argv, msg in cases:
        assert cli(argv) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "t.txt").exists()


@pytest.mark.testbed
def test_committed_tuning_beats_msp_on_real_data():
    """docs/tuning-resnet20-cifar10.json (tuned on CIFAR-10[0::10] + tin_crop[0:1000]) on images it never saw."""
    from _odin_helpers import shared_data
    from odin_engine.loading import load_model

    data = shared_data()
    if not (data / "cifar10_test_jpeg_yoongikim.npz").is_file():
        pytest.skip(f"test-bed data not found at ../shared/data ({data})")
    model = load_model("cifar_resnet20", data / "weights" / "resnet20-12fca82f.th")
    t, e = load_tuning(REPO_DOCS / "tuning-resnet20-cifar10.json", expect_model_id=model.model_id)
    id_imgs, _ = load_source(f"{data / 'cifar10_test_jpeg_yoongikim.npz'}[3:10000:33]", 32)  # 304, disjoint from [0::10]
    sets = {"tin_crop": f"{data / 'ood' / 'tin_crop.npz'}[5000:5200]",
            "mnist_test_pad": f"{data / 'ood' / 'mnist_test_pad.npz'}[5000:5200]"}
    sc = OdinScorer(model, temperature=t, epsilon=e, device="cpu")
    s_id = sc.score(id_imgs)
    for name, spec in sets.items():
        s_ood = sc.score(load_source(spec, 32)[0])
        odin, msp = fpr_at_tpr(s_id["odin"], s_ood["odin"]), fpr_at_tpr(s_id["msp"], s_ood["msp"])
        assert odin < msp, (name, odin, msp)
