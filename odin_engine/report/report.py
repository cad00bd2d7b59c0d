"""A self-contained HTML audit report: every plot and thumbnail is embedded as a base64 PNG.

Sections: the calibrated threshold and the decision; the score runs (how many images each
holds, how many were scored by this run and how many reused from an earlier one); score
histograms of the held-out in-distribution set vs the corpus with δ marked, on a readable scale
(:func:`display_scale`); ROC curves per labelled OOD set (MSP, energy, ODIN) with the evaluation
table; per-class outlier rates; a gallery of the most anomalous corpus images with their scores;
the images that could not be scored. Plots use matplotlib's Agg backend (no display needed); the
page has no script and loads nothing from the network.

The report is drawn from aggregates only — histogram counts in fixed bins, per-class counts, a
bounded top-k gallery, the first error rows — so its cost does not grow with the corpus.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

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


@dataclass(frozen=True)
class DisplayScale:
    """How scores are drawn: ``x = forward(score)``, monotone, with δ at 0."""

    label: str
    note: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


def display_scale(method: str, delta: float, temperature: float = 1.0) -> DisplayScale:
    """A readable axis for ``method``'s scores, with δ at 0.

    ODIN and MSP are softmax probabilities; at temperature T they squeeze towards ``1/C`` (at
    T = 1000 every ODIN score lies in about 0.1000–0.1020 for 10 classes). Plotted as
    ``T·ln(score/δ)`` they are in the model's logit units again (``T·ln softmax`` is a logit minus
    ``T·logsumexp(f/T)``). Energy and max-logit already are in logit units: ``score − δ``.
    Every transform is increasing, so order, threshold and flags are unchanged.
    """
    d = float(delta)
    if method in ("odin", "msp") and d > 0:
        t = float(temperature) if method == "odin" else 1.0
        tl = f"{t:g}·" if t != 1.0 else ""
        return DisplayScale(
            f"{tl}ln({method} score / δ)   (0 = δ; higher = more in-distribution)",
            (f"{method} scores are softmax probabilities" + (f" at temperature T = {t:g}" if t != 1.0 else "")
             + f"; they squeeze into a narrow band near 1/(number of classes) (here δ = {d:.6g}). The axis shows "
             f"{tl}ln(score/δ), which is in the model's logit units: 0 is the threshold, −1 means one logit unit "
             "below it. The transform is increasing, so the order of images, the threshold and the flags are "
             "those of the raw scores."),
            lambda s: t * np.log(np.asarray(s, np.float64) / d),
            lambda x: d * np.exp(np.asarray(x, np.float64) / t))
    return DisplayScale(
        f"{method} score − δ   (0 = δ; higher = more in-distribution)",
        f"{method} scores are in logit units; the axis shows score − δ (δ = {d:.6g}), so 0 is the threshold.",
        lambda s: np.asarray(s, np.float64) - d,
        lambda x: np.asarray(x, np.float64) + d)


def histogram_edges(scale: DisplayScale, heldout: np.ndarray, lo: float, hi: float, bins: int = 60) -> np.ndarray:
    """Raw-score bin edges that are equally wide on ``scale``, covering the held-out scores and the
    corpus range ``[lo, hi]`` (the corpus side is counted while flagging, in these fixed bins)."""
    h = np.asarray(heldout, np.float64)
    lows = [v for v in ((float(h.min()) if h.size else np.inf), lo) if np.isfinite(v)]
    highs = [v for v in ((float(h.max()) if h.size else -np.inf), hi) if np.isfinite(v)]
    raw_lo, raw_hi = (min(lows), max(highs)) if lows else (0.0, 1.0)
    x_lo, x_hi = float(scale.forward(np.array([raw_lo]))[0]), float(scale.forward(np.array([raw_hi]))[0])
    if not x_hi > x_lo:
        x_hi = x_lo + 1e-9
    edges = scale.inverse(np.linspace(x_lo, x_hi, bins + 1))
    edges[0], edges[-1] = raw_lo, max(raw_hi, edges[-2])
    return np.maximum.accumulate(edges)


def counts_from_quantiles(quantiles, n: int, edges: np.ndarray) -> np.ndarray:
    """Approximate counts of ``n`` scores in bins ``edges`` from their evenly spaced quantiles.

    F(x) = the quantile levels interpolated at x (piecewise linear between quantiles); bin i gets
    n·(F(edges[i+1]) − F(edges[i])). Used for a frozen calibration's held-out histogram.
    """
    q = np.asarray(quantiles, np.float64)
    if q.size < 2 or n <= 0:
        return np.zeros(len(edges) - 1)
    e = np.asarray(edges, np.float64)
    cdf = np.interp(e, q, np.linspace(0.0, 1.0, q.size))
    cdf[e <= q[0]], cdf[e >= q[-1]] = 0.0, 1.0  # tied quantiles at either end: all of their mass inside
    return n * np.diff(cdf)


def histogram_png(edges: np.ndarray, heldout: np.ndarray, corpus: np.ndarray, scale: DisplayScale) -> str:
    """Both count vectors (in bins ``edges`` of raw scores) as densities on ``scale``'s axis."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = scale.forward(np.asarray(edges, np.float64))
    for counts, label in ((heldout, "held-out in-distribution"), (corpus, "corpus")):
        counts = np.asarray(counts, np.float64)
        n = counts.sum()
        if n:
            widths = np.diff(x)
            dens = np.divide(counts, n * widths, out=np.zeros_like(counts), where=widths > 0)
            ax.stairs(dens, x, fill=True, alpha=0.5, label=f"{label} (n={int(n)})")
    ax.axvline(0.0, color="crimson", lw=2, label="δ")
    ax.set_xlabel(scale.label)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _png(fig)


def p_value_histogram_png(levels: np.ndarray, counts: np.ndarray, bins: int = 20) -> str:
    """The corpus's conformal p-values (``counts`` per level ``levels``) in ``bins`` equal bins of [0, 1]:
    flat for in-distribution images, a spike near 0 for outliers."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    edges = np.linspace(0.0, 1.0, bins + 1)
    c = np.asarray(counts, np.float64)
    h = np.bincount(np.clip(np.searchsorted(edges, levels, side="left") - 1, 0, bins - 1), weights=c,
                    minlength=bins)
    ax.stairs(h, edges, fill=True, alpha=0.6, color="steelblue", label="corpus")
    if c.sum():
        ax.axhline(c.sum() / bins, color="grey", ls="--", lw=1, label="uniform (all in-distribution)")
    ax.set_xlabel("conformal p-value")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return _png(fig)


def bh_png(levels: np.ndarray, counts: np.ndarray, q: float, p_threshold: float | None) -> str:
    """Sorted p-values p_(i) against i (log–log) with the Benjamini–Hochberg line i·q/m; BH flags every
    image up to the last crossing below the line."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    c = np.asarray(counts, np.int64)
    m = int(c.sum())
    seen = c > 0
    if m:
        i = np.cumsum(c)[seen]
        start = i - c[seen] + 1
        v = np.asarray(levels, np.float64)[seen]
        x = np.column_stack([start, i]).ravel()
        ax.plot(x, np.repeat(v, 2), color="steelblue", lw=1.5, label="sorted p-values p₍ᵢ₎")
        grid = np.geomspace(1, m, 200)
        ax.plot(grid, grid * q / m, color="crimson", lw=1.2, label=f"BH line i·{q:g}/m")
        if p_threshold is not None:
            ax.axhline(p_threshold, color="crimson", ls=":", lw=1, label=f"flag p ≤ {p_threshold:.3g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("i (rank of the p-value)")
    ax.set_ylabel("p-value")
    ax.legend(fontsize=8)
    return _png(fig)


def _p_value_section(decision: Mapping[str, Any], levels: np.ndarray, counts: np.ndarray) -> str:
    from odin_engine.decide.conformal import heldout_needed

    q = float(decision["fdr_q"])
    parts = ["<h2>Conformal p-values</h2>",
             f"<p class='note'>Each scored image's p-value ({_esc(decision['p_value'])}) is the share of held-out "
             "in-distribution images that score no higher: p = (1 + #{held-out scores ≤ score}) / (n + 1). For "
             "in-distribution images it is uniform; outliers pile up near 0. "
             + ("Benjamini–Hochberg flagged the images below the line" if decision["rule"] == "fdr" else
                f"The TPR rule decided; BH at FDR {q:g} is shown for comparison") + ".</p>",
             _img_tag(p_value_histogram_png(levels, counts), "p-value histogram"),
             _img_tag(bh_png(levels, counts, q, decision.get("fdr_p_threshold")), "Benjamini-Hochberg plot")]
    est, pi0 = decision.get("estimated_outliers"), decision.get("storey_pi0")
    parts.append(_table([
        ["decided by", decision["rule_text"]],
        ["flagged by the TPR rule (score < δ ⇔ p ≤ " + f"{decision['tpr_p_threshold']:.4g})", decision["n_flagged_tpr"]],
        [f"flagged by BH at FDR {q:g}", decision["n_flagged_fdr"]],
        [f"estimated outliers (Storey's π̂₀ at λ = {decision['storey_lambda']:g}: m·(1 − π̂₀))",
         "n/a" if est is None else f"{est} (π̂₀ = {pi0:.4f})"],
        ["smallest possible p-value", f"{decision['min_p_value']:.4g} (n = {decision['n_heldout']} held-out images)"],
        [f"BH at {q:g} flags anything only if at least this many images reach the smallest p-value",
         decision.get("bh_min_count")],
    ], ["field", "value"]))
    rows = [[f"{100 * r['share']:g}% of the corpus", r["n_heldout"]]
            for r in heldout_needed(q, conditional=decision.get("conditional_delta"))]
    parts.append("<p class='note'>Resolution: held-out images needed for BH at "
                 f"FDR {q:g} to be able to flag when a given share of the corpus reaches the smallest p-value "
                 f"(this audit has {decision['n_heldout']}).</p>")
    parts.append(_table(rows, ["share of the corpus at the smallest p-value", "held-out images needed"]))
    return "".join(parts)


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


def _runs_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name, r in runs.items():
        c = r.get("counts", {})
        scored, reused = r.get("scored_this_run"), r.get("already_done")
        rows.append([name, c.get("total", ""), c.get("ok", ""), c.get("error", ""), scored, reused,
                     "yes" if r.get("exactly_once") else "NO"])
    return _table(rows, ["set", "images", "ok", "errors", "scored by this run", "reused from earlier runs",
                         "exactly once"])


def render_report(
    *,
    calibration: Mapping[str, Any],
    summary: Mapping[str, Any],
    histogram: Mapping[str, Any],
    gallery: Any,
    errors: Sequence[tuple[str, str]] = (),
    evaluation: Mapping[str, Any] | None = None,
    roc_scores: Mapping[str, Any] | None = None,
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    image_loader: ImageLoader | None = default_image_loader,
    title: str = "odin-audit report",
    extra_html: str = "",
    p_values: tuple[np.ndarray, np.ndarray] | None = None,
) -> str:
    """The report as one HTML string (see the module docstring).

    ``histogram``: ``{"edges": raw-score bin edges, "heldout": counts, "corpus": counts}``;
    ``gallery``: the lowest-scoring ok corpus rows (a ``pyarrow.Table`` or DataFrame with
    ``image_id, uri, score, margin, rank, is_outlier[, pred]``), ascending; ``errors``: the first
    error rows as ``(image_id, message)``; ``roc_scores``: as returned by
    :func:`odin_engine.decide.evaluation.evaluate_tables`; ``runs``: the score runs
    (``counts``, ``scored_this_run``, ``already_done``, ``exactly_once``); ``extra_html``: a
    trusted HTML fragment (e.g. :func:`odin_engine.report.history.history_plot_html`) shown after
    the score distributions; ``p_values``: ``(levels, counts)`` — the corpus's ok images per conformal
    p-value level (with ``calibration["decision"]``, :func:`odin_engine.decide.conformal.decision_summary`).
    """
    method = calibration["method"]
    delta = float(calibration["delta"])
    scale = display_scale(method, delta, float(calibration.get("temperature") or 1.0))
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
        ["decided by", (calibration.get("decision") or {}).get("rule_text", "TPR rule: score < δ")],
        ["outliers" + (" (score < δ)" if s.get("rule", "tpr") == "tpr" else " (Benjamini–Hochberg)"),
         f"{s['n_outliers']} ({100 * (s['outlier_rate'] or 0):.2f}% of scored)"],
    ], ["field", "value"]))

    if runs:
        resumed = sum(int(r.get("already_done") or 0) for r in runs.values())
        parts.append("<h2>Score runs</h2>")
        parts.append(_runs_table(runs))
        parts.append("<p class='note'>Every image of each set is audited, whichever run scored it"
                     + (f": {resumed} images were scored by an earlier run of this audit and reused "
                        "(resumed), not scored again." if resumed else ".") + "</p>")

    parts.append("<h2>Score distributions</h2>")
    edges = np.asarray(histogram["edges"], np.float64)
    parts.append(_img_tag(histogram_png(edges, histogram["heldout"], histogram["corpus"], scale), "score histograms"))
    parts.append(f"<p class='note'>Images left of the red line (score &lt; δ) are flagged as outliers. "
                 f"{_esc(scale.note)}</p>")
    decision = calibration.get("decision") or {}
    if p_values is not None and decision.get("p_value"):
        parts.append(_p_value_section(decision, *p_values))
    if extra_html:
        parts.append(extra_html)

    if evaluation and roc_scores:
        parts.append("<h2>Labelled OOD sets</h2><div class='rocs'>")
        methods = list(evaluation["methods"])
        for name, per_method in roc_scores["ood"].items():
            parts.append(_img_tag(roc_png({m: roc_scores["heldout"][m] for m in methods},
                                          {m: per_method[m] for m in methods}, f"ROC: held-out ID vs {name}"),
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

    worst = gallery.to_pylist() if hasattr(gallery, "to_pylist") else gallery.to_dict("records")
    parts.append(f"<h2>Most anomalous images ({len(worst)} lowest scores)</h2>"
                 "<p class='note'>Red frame: flagged; green: kept.</p><div class='gallery'>")
    for r in worst:
        pred = r.get("pred")
        cap = (f"#{int(r['rank'])} {_esc(r['image_id'])}<br>{method}={float(r['score']):.5g}"
               f"<br>margin={float(r['margin']):.3g}" + (f"<br>pred={int(pred)}" if pred is not None and pred == pred else "")
               + (f"<br>p={float(r['p_value']):.3g}" if r.get("p_value") is not None else ""))
        thumb = "<div class='missing'>no image</div>"
        if image_loader is not None:
            try:
                thumb = _img_tag(array_png(image_loader(str(r["uri"]))), str(r["image_id"]), cls="thumb")
            except Exception as exc:  # noqa: BLE001 - a thumbnail that cannot be read is shown as such
                thumb = f"<div class='missing' title='{_esc(exc)}'>unreadable</div>"
        is_out = bool(r["is_outlier"])
        cap += "<br><b>outlier</b>" if is_out else "<br>kept"
        parts.append(f"<div class='card{' outlier' if is_out else ''}'>{thumb}<div>{cap}</div></div>")
    parts.append("</div>")

    n_err = int(s["n_error"])
    parts.append(f"<h2>Images that could not be scored ({n_err})</h2>")
    if n_err:
        parts.append(_table([[i, e] for i, e in errors], ["image_id", "error"]))
        if n_err > len(errors):
            parts.append(f"<p class='note'>… and {n_err - len(errors)} more (the rows of flags/ with "
                         "status = 'error').</p>")
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
