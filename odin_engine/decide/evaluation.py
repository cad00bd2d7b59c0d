"""Evaluate detection against labelled OOD sets: MSP, energy and ODIN side by side.

In-distribution (the held-out ID scores) is the positive class and higher scores mean
more in-distribution, as everywhere in :mod:`odin_engine.metrics`. Per OOD set and method:
``fpr_at_tpr`` (FPR at the target TPR, the ODIN paper's FPR@95TPR), ``detection_error``,
``auroc``, ``aupr_in``, ``aupr_out``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from odin_engine.errors import ConfigError
from odin_engine.io.scores import NOT_OK, OK, ScoreTable, check_same_settings
from odin_engine.metrics import all_metrics, threshold_at_tpr

DEFAULT_METHODS = ("msp", "energy", "odin")


def evaluate_arrays(
    id_scores: Mapping[str, np.ndarray],
    ood_scores: Mapping[str, Mapping[str, np.ndarray]],
    methods: Sequence[str] = DEFAULT_METHODS,
    tpr: float = 0.95,
) -> dict[str, Any]:
    """``id_scores[method]`` vs ``ood_scores[set][method]`` → ``{"sets": {set: {method: metrics}}}``."""
    sets: dict[str, Any] = {}
    for name, per_method in ood_scores.items():
        entry: dict[str, Any] = {"n": int(len(next(iter(per_method.values())))), "metrics": {}}
        for m in methods:
            entry["metrics"][m] = all_metrics(id_scores[m], per_method[m], tpr)
            entry["metrics"][m]["threshold"] = threshold_at_tpr(id_scores[m], tpr)
        sets[name] = entry
    return {
        "tpr": float(tpr),
        "methods": list(methods),
        "n_id": int(len(next(iter(id_scores.values())))),
        "sets": sets,
    }


def computed_methods(table: ScoreTable) -> list[str]:
    """The score-table methods whose column every ok row of ``table`` has (those scored; a fitted
    method scored without a fit is null)."""
    from odin_engine.methods import TABLE_METHODS

    present = [m for m in TABLE_METHODS if m in table.columns]
    ok = table.read(present, OK)
    return [m for m in present if ok.num_rows and ok.column(m).null_count == 0]


def method_scores(table: ScoreTable, methods: Sequence[str], what: str) -> tuple[dict[str, np.ndarray], int]:
    """The ok rows' ``methods`` columns (only those and ``status`` are read) and the error count."""
    table.require(methods, what)
    ok = table.read(list(methods), OK)
    if ok.num_rows == 0:
        raise ConfigError(f"the {what} have no row with status 'ok'")
    return ({m: ok.column(m).to_numpy(zero_copy_only=False).astype(np.float64) for m in methods},
            table.count(NOT_OK))


def evaluate_tables(
    heldout: ScoreTable,
    ood: Mapping[str, ScoreTable],
    methods: Sequence[str] = DEFAULT_METHODS,
    tpr: float = 0.95,
    heldout_cols: tuple[dict[str, np.ndarray], int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate score tables; rows with ``status='error'`` are left out and counted.

    Returns ``(evaluation, scores)``: the evaluation document and the score arrays it used
    (``{"heldout": {method: array}, "ood": {set: {method: array}}}``, for the report's ROC
    curves). Labelled sets are held in memory (their method columns only); the corpus is not read.
    """
    if not ood:
        raise ConfigError("evaluation needs at least one labelled OOD set")
    h_set = heldout.settings("held-out scores")
    if h_set is None:
        raise ConfigError("the held-out scores have no row with status 'ok'")
    id_cols, id_err = heldout_cols or method_scores(heldout, methods, "held-out scores")
    ood_cols, errors = {}, {}
    for name, table in ood.items():
        what = f"OOD set {name!r}"
        check_same_settings(h_set, table.settings(f"{what} scores") or h_set, what)
        ood_cols[name], errors[name] = method_scores(table, methods, f"{what} scores")
    out = evaluate_arrays(id_cols, ood_cols, methods, tpr)
    out["n_id_errors"] = id_err
    for name in out["sets"]:
        out["sets"][name]["n_errors"] = errors[name]
    out.update({k: h_set[k] for k in ("model_id", "temperature", "epsilon")})
    return out, {"heldout": id_cols, "ood": ood_cols}
