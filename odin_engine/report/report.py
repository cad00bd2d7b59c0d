"""A self-contained HTML audit report: every plot and thumbnail is embedded as a base64 PNG.

Sections: run metadata and the calibrated threshold; score histograms of the held-out
in-distribution set vs the corpus with δ marked; ROC curves per labelled OOD set (MSP, energy,
ODIN) with the evaluation table; per-class outlier rates; a gallery of the most anomalous corpus
images with their scores; the images that could not be scored. Plots use matplotlib's Agg
backend (no display needed); the page has no script and loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

ImageLoader = Callable[[str], np.ndarray]
THUMB = 96


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _mpl()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(b64: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def array_png(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def default_image_loader(uri: str) -> np.ndarray:
    """Read and decode ``uri`` (local or object store) the way the score job does, at thumbnail size."""
    from odin_engine.io.store import read_bytes
    from odin_engine.io.images import decode_image

    return decode_image(read_bytes(uri), THUMB, "crop")[0]


def _esc(v: Any) -> str:
    if isinstance(v, float):
        return html.escape(f"{v:.6g}")
    return html.escape(str(v))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def histogram_png(heldout: np.ndarray, corpus: np.ndarray, delta: float, method: str) -> str:
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    both = np.concatenate([heldout, corpus]) if len(corpus) else heldout
    lo, hi = float(np.min(both)), float(np.max(both))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-9, 50)
    ax.hist(heldout, bins=bins, alpha=0.55, density=True, label=f"held-out in-distribution (n={len(heldout)})")
    if len(corpus):
        ax.hist(corpus, bins=bins, alpha=0.55, density=True, label=f"corpus (n={len(corpus)})")
    ax.axvline(delta, color="crimson", lw=2, label=f"δ = {delta:.6g}")
    ax.set_xlabel(f"{method} score (higher = more in-distribution)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _png(fig)


def roc_png(id_scores: Mapping[str, np.ndarray], ood_scores: Mapping[str, np.ndarray], title: str) -> str:
    from sklearn.metrics import roc_curve

    plt = _mpl()
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    for m, s_id in id_scores.items():
        s_ood = ood_scores[m]
        y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
        fpr, tpr, _ = roc_curve(y, np.r_[s_id, s_ood])
        ax.plot(fpr, tpr, label=m)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.axhline(0.95, ls="--", lw=0.8, color="grey")
    ax.set_xlabel("FPR (OOD accepted)")
    ax.set_ylabel("TPR (ID kept)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def class_rates_png(per_class: Sequence[Mapping[str, Any]]) -> str:
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 3.0))
    labels = [str(c.get("class_name", c["pred"])) for c in per_class]
    ax.bar(labels, [100 * c["outlier_rate"] for c in per_class], color="steelblue")
    ax.set_ylabel("outliers (%)")
    ax.set_xlabel("predicted class")
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    return _png(fig)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.plot{max-width:100%;display:block;margin:8px 0}.rocs img{display:inline-block;margin:4px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{width:120px;font-size:11px;word-break:break-all}
.card img{width:96px;height:96px;image-rendering:pixelated;border:3px solid #2a7}.card.outlier img{border-color:#c33}.missing{width:96px;height:96px;
background:#eee;display:flex;align-items:center;justify-content:center;color:#888}.note{color:#555;font-size:13px}
"""


def render_report(
    *,
    calibration: Mapping[str, Any],
    heldout: pd.DataFrame,
    flags: pd.DataFrame,
    summary: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None = None,
    ood: Mapping[str, pd.DataFrame] | None = None,
    metadata: Mapping[str, Any] | None = None,
    gallery_size: int = 24,
    image_loader: ImageLoader | None = default_image_loader,
    title: str = "odin-audit report",
) -> str:
    """The report as one HTML string (see the module docstring)."""
    method = calibration["method"]
    delta = float(calibration["delta"])
    h_ok = heldout[heldout["status"] == "ok"][method].to_numpy(np.float64)
    ok = flags[flags["status"] == "ok"]
    c_scores = ok["score"].to_numpy(np.float64)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"]

    s = summary["overall"]
    lo, hi = calibration["tpr_ci"]
    parts.append("<h2>Decision</h2>")
    parts.append(_table([
        ["method", method], ["model_id", calibration["model_id"]],
        ["temperature T", calibration["temperature"]], ["epsilon ε", calibration["epsilon"]],
        ["threshold δ", delta], ["target TPR", calibration["target_tpr"]],
        ["achieved TPR on held-out", calibration["achieved_tpr"]],
        ["TPR on new ID data, 95% interval", f"[{lo:.4f}, {hi:.4f}]"],
        ["held-out images (ok / errors)", f"{calibration['n_heldout']} / {calibration.get('n_heldout_errors', 0)}"],
        ["corpus images (ok / errors)", f"{s['n_ok']} / {s['n_error']}"],
        ["outliers (score < δ)", f"{s['n_outliers']} ({100 * (s['outlier_rate'] or 0):.2f}% of scored)"],
    ], ["field", "value"]))

    parts.append("<h2>Score distributions</h2>")
    parts.append(_img_tag(histogram_png(h_ok, c_scores, delta, method), "score histograms"))
    parts.append("<p class='note'>Images left of the red line (score &lt; δ) are flagged as outliers.</p>")

    if evaluation and ood:
        parts.append("<h2>Labelled OOD sets</h2><div class='rocs'>")
        methods = list(evaluation["methods"])
        h_all = heldout[heldout["status"] == "ok"]
        for name, df in ood.items():
            d_ok = df[df["status"] == "ok"]
            parts.append(_img_tag(
                roc_png({m: h_all[m].to_numpy(np.float64) for m in methods},
                        {m: d_ok[m].to_numpy(np.float64) for m in methods}, f"ROC: held-out ID vs {name}"),
                f"ROC curve {name}"))
        parts.append("</div>")
        rows = []
        for name, entry in evaluation["sets"].items():
            for m in methods:
                r = entry["metrics"][m]
                rows.append([name, entry["n"], m, *(f"{100 * r[k]:.2f}" for k in
                                                   ("fpr_at_tpr", "detection_error", "auroc", "aupr_in", "aupr_out"))])
        tpr_pct = f"{100 * evaluation['tpr']:g}"
        parts.append(_table(rows, ["OOD set", "n", "method", f"FPR@{tpr_pct}TPR %", "detection error %",
                                   "AUROC %", "AUPR-In %", "AUPR-Out %"]))

    per_class = summary.get("per_class") or []
    if per_class:
        parts.append("<h2>Outlier rate per predicted class</h2>")
        parts.append(_img_tag(class_rates_png(per_class), "per-class outlier rates"))
        parts.append(_table([[c.get("class_name", c["pred"]), c["n"], c["n_outliers"], f"{100 * c['outlier_rate']:.2f}"]
                             for c in per_class], ["predicted class", "images", "outliers", "outlier %"]))

    worst = ok.sort_values(["score", "image_id"]).head(gallery_size)
    parts.append(f"<h2>Most anomalous images ({len(worst)} lowest scores)</h2>"
                 "<p class='note'>Red frame: flagged (score &lt; δ); green: kept.</p><div class='gallery'>")
    for _, r in worst.iterrows():
        cap = (f"#{int(r['rank'])} {_esc(r['image_id'])}<br>{method}={float(r['score']):.5g}"
               f"<br>margin={float(r['margin']):.3g}" + (f"<br>pred={int(r['pred'])}" if "pred" in r and pd.notna(r["pred"]) else ""))
        thumb = "<div class='missing'>no image</div>"
        if image_loader is not None:
            try:
                thumb = _img_tag(array_png(image_loader(str(r["uri"]))), str(r["image_id"]), cls="thumb")
            except Exception as exc:  # noqa: BLE001 - a thumbnail that cannot be read is shown as such
                thumb = f"<div class='missing' title='{_esc(exc)}'>unreadable</div>"
        is_out = bool(r["is_outlier"]) if pd.notna(r["is_outlier"]) else False
        cap += "<br><b>outlier</b>" if is_out else "<br>kept (score ≥ δ)"
        parts.append(f"<div class='card{' outlier' if is_out else ''}'>{thumb}<div>{cap}</div></div>")
    parts.append("</div>")

    err = flags[flags["status"] != "ok"]
    parts.append(f"<h2>Images that could not be scored ({len(err)})</h2>")
    if len(err):
        parts.append(_table([[r["image_id"], r.get("error", "")] for _, r in err.head(200).iterrows()],
                            ["image_id", "error"]))
        if len(err) > 200:
            parts.append(f"<p class='note'>… and {len(err) - 200} more (see flags/flags.parquet).</p>")
    else:
        parts.append("<p class='note'>none</p>")

    if metadata:
        parts.append("<h2>Run metadata</h2>")
        parts.append(_table([[k, v if not isinstance(v, (dict, list)) else _compact(v)] for k, v in metadata.items()],
                            ["field", "value"]))
    parts.append("</body></html>")
    return "".join(parts)


def _compact(v: Any) -> str:
    import json

    return json.dumps(v, default=str)[:2000]


def write_report(path: str | Path, html_text: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(html_text, encoding="utf-8")
    tmp.replace(p)
    return p
