"""The HTML report: self-contained, and it renders in headless Chromium with every image loaded."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _odin_helpers import noise_images, score_frame, smooth_images, tiny_model
from odin_engine.decide.calibration import calibrate_tables
from odin_engine.decide.evaluation import evaluate_tables
from odin_engine.decide.flagging import prepare, summarize, write_flags
from odin_engine.io.scores import ScoreTable
from odin_engine.io.store import Store
from odin_engine.report import counts_from_quantiles, display_scale, histogram_edges, render_report
from odin_engine.settings import CalibrationSettings

_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    model, _ = tiny_model(tmp)
    held = score_frame(model, smooth_images(100, 1), prefix="held")
    imgs = np.concatenate([smooth_images(20, 2), noise_images(10, 3)])
    corpus = score_frame(model, imgs, prefix="corp", errors=2)
    img_dir = tmp / "imgs"
    img_dir.mkdir()
    for i, uri in enumerate(corpus["uri"]):
        p = img_dir / f"corp-{i:05d}.png"
        Image.fromarray(imgs[i]).save(p)
        corpus.loc[i, "uri"] = str(p)
    ood = {"noise": ScoreTable.from_table(score_frame(model, noise_images(30, 4), prefix="n"))}
    h_table, c_table = ScoreTable.from_table(held), ScoreTable.from_table(corpus)
    cal = calibrate_tables(c_table, h_table, CalibrationSettings(0.95, "odin"))
    plan = prepare(c_table, cal["delta"], "odin")
    # the lowest-scoring image's file is gone: its thumbnail must show as unreadable
    lowest = corpus[corpus["status"] == "ok"].sort_values("odin").index[0]
    Path(corpus.loc[lowest, "uri"]).unlink()
    gone_id = corpus.loc[lowest, "image_id"]
    scale = display_scale("odin", cal["delta"], cal["temperature"])
    h_scores = held["odin"].to_numpy()
    edges = histogram_edges(scale, h_scores, plan.stats.lo, plan.stats.hi)
    flags = write_flags(plan, Store(str(tmp / "flags")), gallery=12, hist_edges=edges)
    summary = summarize(plan.stats, class_names=[f"class{i}" for i in range(10)])
    ev, roc = evaluate_tables(h_table, ood, tpr=0.95)
    runs = {"heldout": {"counts": {"total": 100, "ok": 100, "error": 0}, "scored_this_run": 0, "already_done": 100,
                        "exactly_once": True},
            "corpus": {"counts": {"total": 30, "ok": 28, "error": 2}, "scored_this_run": 5, "already_done": 25,
                       "exactly_once": True}}
    text = render_report(calibration=cal, summary=summary, evaluation=ev, roc_scores=roc, runs=runs,
                         histogram={"edges": edges, "heldout": np.histogram(h_scores, edges)[0],
                                    "corpus": flags.histogram},
                         gallery=flags.gallery, errors=flags.errors,
                         metadata={"run_id": "test-run", "versions": {"odin": "x"}}, title="test <audit> & report")
    path = tmp / "report.html"
    Store(str(tmp)).write_text("report.html", text)
    return {"path": path, "text": text, "cal": cal, "gone_id": gone_id, "edges": edges, "scale": scale,
            "corpus_hist": flags.histogram, "n_ok": plan.stats.n_ok, "tmp": tmp}


def test_histogram_scale_is_readable_and_counts_every_image(report):
    scale, edges = report["scale"], report["edges"]
    x = scale.forward(edges)
    assert x[0] < 0 < x[-1] or x[0] <= 0 <= x[-1]  # δ (at 0) is inside the plotted range
    np.testing.assert_allclose(np.diff(x), np.diff(x)[0], rtol=1e-6)  # equal-width bins on the shown axis
    # at T = 1000 the raw scores span ~1e-4; on the shown axis (T·ln(score/δ)) they span logit units
    assert np.ptp(edges) < 0.01 and np.ptp(x) > 0.01
    assert report["corpus_hist"].sum() == report["n_ok"]
    assert "T = 1000" in report["text"] and "ln(score/δ)" in report["text"]
    np.testing.assert_allclose(scale.inverse(scale.forward(edges)), edges, rtol=1e-12)


def test_histogram_from_a_frozen_calibrations_quantiles_is_close_to_the_real_one():
    """A frozen calibration keeps 201 quantiles of the held-out scores; the piecewise-linear CDF
    between them is off by at most 1/200 of the mass anywhere, so each bin by at most n/100."""
    from odin_engine.decide.calibration import heldout_quantiles

    rng = np.random.default_rng(0)
    for scores in (rng.beta(8, 2, 10_000), np.r_[np.full(3_000, 0.9), rng.uniform(0.1, 0.9, 7_000)]):
        q = heldout_quantiles(scores)
        edges = np.linspace(scores.min(), scores.max(), 61)
        approx, exact = counts_from_quantiles(q, scores.size, edges), np.histogram(scores, edges)[0]
        assert len(q) == 201 and approx.sum() == pytest.approx(scores.size)
        assert np.abs(approx - exact).max() <= scores.size / 100
    assert counts_from_quantiles([0.5] * 201, 100, np.array([0.0, 0.5, 1.0])).sum() == pytest.approx(100)
    assert counts_from_quantiles([], 100, np.array([0.0, 1.0])).tolist() == [0.0]


def test_resumed_runs_are_reported_as_reused_not_as_nothing(report):
    text = report["text"]
    assert "reused from earlier runs" in text and "scored by this run" in text
    assert "125 images were scored by an earlier run" in text


def test_report_is_self_contained_and_complete(report):
    text = report["text"]
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(?:src|href)=\"(?:https?:|//|file:)", text)
    assert "<script" not in text
    # histogram, ROC, per-class bars, and thumbnails for the readable gallery images
    assert len([s for s in re.findall(r'<img class="plot"', text)]) == 3
    assert len(re.findall(r'<img class="thumb"', text)) == 11  # 12 in the gallery, one unreadable
    # the lowest-scoring image (first in the gallery) lost its file: shown as unreadable, not dropped
    first_card = text.split("class='card", 1)[1].split("</div></div>", 1)[0]
    assert report["gone_id"] in first_card and "unreadable" in first_card
    assert f"{report['cal']['delta']:.6g}" in text
    assert "test &lt;audit&gt; &amp; report" in text
    assert "cannot identify image file" in text  # error rows listed
    assert "FPR@95TPR" in text and "noise" in text


def test_report_renders_in_headless_chromium(report, tmp_path, chromium):
    """Real browser (conftest's ``chromium``: fails under CI=true when missing, skips elsewhere)."""
    probe = tmp_path / "probe.html"
    probe.write_text(report["text"].replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180)
    m = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert m, f"chromium did not run the probe: rc={dom.returncode} {dom.stderr[-1500:]}"
    loaded, total = int(m.group(1)), int(m.group(2))
    assert total == report["text"].count("<img ") and total >= 13
    assert loaded == total

    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, "--window-size=1200,1600", f"--screenshot={shot}", report["path"].as_uri()],
                   capture_output=True, text=True, timeout=180)
    assert shot.is_file(), "no screenshot was written"
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert px.shape[0] >= 1000 and px.shape[1] >= 1000
    non_white = np.mean(px < 240)
    assert non_white > 0.03, f"screenshot is (almost) blank: {non_white:.4f} non-white"
    assert px.std() > 10
