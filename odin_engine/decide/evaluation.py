"""Evaluate detection against labelled OOD sets: MSP, energy and ODIN side by side.

In-distribution (the held-out ID scores) is the positive class and higher scores mean
more in-distribution, as everywhere in :mod:`odin_engine.metrics`. Per OOD set and method:
``fpr_at_tpr`` (FPR at the target TPR, the ODIN paper's FPR@95TPR), ``detection_error``,
``auroc``, ``aupr_in``, ``aupr_out``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from odin_engine.errors import ConfigError
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


def _columns(df: pd.DataFrame, methods: Sequence[str], what: str) -> tuple[dict[str, np.ndarray], int]:
    ok = df[df["status"] == "ok"]
    if ok.empty:
        raise ConfigError(f"the {what} scores have no row with status 'ok'")
    missing = [m for m in methods if m not in ok.columns]
    if missing:
        raise ConfigError(f"the {what} scores have no column(s) {missing}")
    return {m: ok[m].to_numpy(dtype=np.float64) for m in methods}, int(len(df) - len(ok))


def evaluate_frames(
    heldout: pd.DataFrame,
    ood: Mapping[str, pd.DataFrame],
    methods: Sequence[str] = DEFAULT_METHODS,
    tpr: float = 0.95,
) -> dict[str, Any]:
    """Evaluate score-job frames; rows with ``status='error'`` are left out and counted."""
    from odin_engine.decide.calibration import check_same_settings, settings_of

    if not ood:
        raise ConfigError("evaluation needs at least one labelled OOD set")
    h_set = settings_of(heldout, "odin", "held-out")
    id_cols, id_err = _columns(heldout, methods, "held-out")
    ood_cols, errors = {}, {}
    for name, df in ood.items():
        check_same_settings(h_set, settings_of(df, "odin", f"OOD set {name!r}"))
        ood_cols[name], errors[name] = _columns(df, methods, f"OOD set {name!r}")
    out = evaluate_arrays(id_cols, ood_cols, methods, tpr)
    out["n_id_errors"] = id_err
    for name in out["sets"]:
        out["sets"][name]["n_errors"] = errors[name]
    out.update({k: h_set[k] for k in ("model_id", "temperature", "epsilon")})
    return out
