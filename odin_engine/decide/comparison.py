"""Compare every available detector (and its one hyperparameter) on the user's validation data.

For the held-out in-distribution set and each labelled OOD set, one scoring pass per batch
(:meth:`OdinScorer.passes`: logits, ``h``, AdaSCALE's ``h̃``) is kept; every method of the
registry that this model and fit allow is then scored at every value of its hyperparameter grid
from those passes (cheap tensor math, no further forward). ODIN's (T, ε) comes from the paper
grid search (:func:`odin_engine.decide.tuning.tune_paper`), which reuses one gradient per T.

Metrics (ID = positive): FPR at the target TPR — the share of OOD images whose score reaches the
threshold that keeps ``tpr`` of the held-out ID images (the ODIN paper's definition) — and AUROC
(scikit-learn). Per method, the value with the lowest mean FPR over the OOD sets (ties: higher
mean AUROC, then the grid's order) is its entry; the winner is the entry with the lowest mean FPR
(ties: higher mean AUROC, then the registry's order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from odin_engine.methods import REGISTRY

if TYPE_CHECKING:
    from odin_engine.scorer import OdinScorer

CHUNK = 512  # images per method evaluation (KNN holds CHUNK × bank similarities)


def _cached_passes(scorer: "OdinScorer", images) -> list:
    """The scoring passes of a set, moved to the CPU (what every method reads)."""
    import dataclasses

    out = []
    for p in scorer.passes(images):
        out.append(dataclasses.replace(
            p, logits=p.logits.cpu(), pred=p.pred.cpu(), odin=p.odin.cpu(),
            h=None if p.h is None else p.h.cpu(), h_perturbed=None if p.h_perturbed is None else p.h_perturbed.cpu(),
            head=None if p.head is None else p.head.to("cpu")))
    return out


def _scores(method: str, passes: list, value: Any) -> np.ndarray:
    m = REGISTRY[method]
    return np.concatenate([m.score(p, value).detach().float().numpy() for p in passes]) if passes else np.empty(0)


def _value_key(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def compare_methods(scorer: "OdinScorer", id_images, ood_images: Mapping[str, Any], tpr: float = 0.95,
                    odin: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The comparison table (``rows``: one per method × value), each method's best value (``best``)
    and the ``winner``. ``odin``: :func:`tune_paper`'s result, entered as ODIN's row."""
    from odin_engine.metrics import auroc, fpr_at_tpr

    id_passes = _cached_passes(scorer, id_images)
    ood_passes = {name: _cached_passes(scorer, imgs) for name, imgs in ood_images.items()}
    names = list(ood_passes)
    rows: list[dict[str, Any]] = []
    for method in scorer.methods:
        if method == "odin" and odin is not None:
            rows.append({"method": "odin", "param": "(T, ε)", "value": [odin["temperature"], odin["epsilon"]],
                         "fpr": {n: odin["ood_sets"][n]["fpr_at_tpr"] for n in names},
                         "auroc": {n: odin["ood_sets"][n]["auroc"] for n in names}})
            continue
        spec = REGISTRY[method].param
        values = (spec.grid or (spec.default,)) if spec is not None and spec.default is not None else (None,)
        for value in values:
            s_id = _scores(method, id_passes, value)
            row = {"method": method, "param": spec.name if spec and spec.default is not None else None,
                   "value": _value_key(value), "fpr": {}, "auroc": {}}
            for n in names:
                s_ood = _scores(method, ood_passes[n], value)
                ok_id, ok_ood = np.isfinite(s_id), np.isfinite(s_ood)
                row["fpr"][n] = float(fpr_at_tpr(s_id[ok_id], s_ood[ok_ood], tpr))
                row["auroc"][n] = float(auroc(s_id[ok_id], s_ood[ok_ood]))
            rows.append(row)
    for row in rows:
        row["mean_fpr"] = float(np.mean(list(row["fpr"].values())))
        row["mean_auroc"] = float(np.mean(list(row["auroc"].values())))
    order = {m: i for i, m in enumerate(scorer.methods)}
    best: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        cur = best.get(row["method"])
        if cur is None or (row["mean_fpr"], -row["mean_auroc"]) < (cur["mean_fpr"], -cur["mean_auroc"]):
            best[row["method"]] = row
    winner = min(best.values(), key=lambda r: (r["mean_fpr"], -r["mean_auroc"], order[r["method"]]))
    return {
        "criterion": f"minimize mean FPR at {tpr:g} TPR over the OOD sets (ID positive; ties: higher mean AUROC)",
        "tpr": float(tpr), "ood_sets": names, "rows": rows,
        "best": {m: {"value": r["value"], "mean_fpr": r["mean_fpr"], "mean_auroc": r["mean_auroc"],
                     "fpr": r["fpr"], "auroc": r["auroc"]} for m, r in best.items()},
        "winner": {"method": winner["method"], "value": winner["value"], "mean_fpr": winner["mean_fpr"],
                   "mean_auroc": winner["mean_auroc"]},
        "not_compared": {m: ("needs --fit" if REGISTRY[m].needs_fit and scorer.fit is None else "needs a classifier head")
                         for m in REGISTRY if m not in scorer.methods},
    }


def format_table(comparison: Mapping[str, Any]) -> str:
    """The per-method table (each method at its best value): FPR@TPR and AUROC per OOD set, in %."""
    names = comparison["ood_sets"]
    tpr = comparison["tpr"]
    head = f"{'method':<10} {'value':<14}" + "".join(f" {n[:12] + ' FPR':>17} {'AUROC':>7}" for n in names) + \
        f" {'mean FPR':>9} {'mean AUROC':>10}"
    lines = [f"FPR at {100 * tpr:g}% TPR (ID positive) and AUROC, in %; each method at its best value", head]
    win = comparison["winner"]["method"]
    for m, r in sorted(comparison["best"].items(), key=lambda kv: (kv[1]["mean_fpr"], -kv[1]["mean_auroc"])):
        value = "" if r["value"] is None else str(r["value"]).replace(" ", "")
        cells = "".join(f" {100 * r['fpr'][n]:>17.2f} {100 * r['auroc'][n]:>7.2f}" for n in names)
        lines.append(f"{m + (' *' if m == win else ''):<10} {value[:14]:<14}{cells} {100 * r['mean_fpr']:>9.2f} "
                     f"{100 * r['mean_auroc']:>10.2f}")
    for m, why in comparison.get("not_compared", {}).items():
        lines.append(f"{m:<10} not compared: {why}")
    return "\n".join(lines)
