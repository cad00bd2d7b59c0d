"""The HTML report: self-contained, and it renders in headless Chromium with every image loaded."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from _odin_helpers import noise_images, score_frame, smooth_images, tiny_model
from odin_engine.decide.calibration import calibrate_frames
from odin_engine.decide.evaluation import evaluate_frames
from odin_engine.decide.flagging import flag, summarize
from odin_engine.report import render_report, write_report

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
    # the most anomalous scored image (first in the gallery) points at a file that is gone
    gone = corpus[corpus["status"] == "ok"]["odin"].idxmin()
    corpus.loc[gone, "uri"] = str(img_dir / "gone.png")
    ood = {"noise": score_frame(model, noise_images(30, 4), prefix="n")}
    cal = calibrate_frames(corpus, held, 0.95, "odin")
    flags = flag(corpus, cal["delta"], "odin")
    summary = summarize(flags, class_names=[f"class{i}" for i in range(10)])
    ev = evaluate_frames(held, ood, tpr=0.95)
    text = render_report(calibration=cal, heldout=held, flags=flags, summary=summary, evaluation=ev, ood=ood,
                         metadata={"run_id": "test-run", "versions": {"odin": "x"}}, gallery_size=12,
                         title="test <audit> & report")
    path = write_report(tmp / "report.html", text)
    return {"path": path, "text": text, "cal": cal, "flags": flags, "tmp": tmp, "gone": corpus.loc[gone, "image_id"]}


def test_report_is_self_contained_and_complete(report):
    text = report["text"]
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(?:src|href)=\"(?:https?:|//|file:)", text)
    assert "<script" not in text
    # histogram, ROC, per-class bars, and thumbnails for the readable gallery images
    assert len([s for s in re.findall(r'<img class="plot"', text)]) == 3
    assert len(re.findall(r'<img class="thumb"', text)) >= 10
    # the deleted file reached the gallery (it has the lowest score) and its card says it is unreadable
    cards = text.split("<div class='card")[1:]
    gone = [c for c in cards if f"{report['gone']}<br>" in c]
    assert len(gone) == 1 and "unreadable" in gone[0] and "<img" not in gone[0], gone
    assert sum("unreadable" in c for c in cards) == 1
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
