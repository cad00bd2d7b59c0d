"""Flag corpus images whose score falls below the calibrated threshold δ.

Every corpus row is kept. For ``status == 'ok'`` rows: ``score`` (the calibrated method's
column), ``is_outlier = score < δ``, ``margin = score − δ`` (negative = outlier; the further
below 0 the more anomalous) and ``rank`` (1 = the most anomalous, i.e. the lowest score; ties
share the smallest rank). Rows with ``status == 'error'`` keep their error and get
``is_outlier``, ``margin``, ``rank`` and ``score`` null: an image that could not be scored is
never reported as "in distribution" nor as "outlier".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from odin_engine.errors import ConfigError

FLAG_COLUMNS = ("score", "is_outlier", "margin", "rank")


def flag(corpus: pd.DataFrame, delta: float, method: str = "odin") -> pd.DataFrame:
    """Return a copy of ``corpus`` with ``score``, ``is_outlier``, ``margin``, ``rank`` added."""
    if method not in corpus.columns:
        raise ConfigError(f"the corpus scores have no {method!r} column")
    df = corpus.copy()
    ok = (df["status"] == "ok").to_numpy()
    raw = pd.to_numeric(df[method], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ok & ~np.isfinite(raw)
    if bad.any():
        ids = df.loc[bad, "image_id"].astype(str).tolist()[:5]
        raise ValueError(f"{int(bad.sum())} rows have status 'ok' but no finite {method} score (e.g. {ids})")
    score = pd.array(np.where(ok, raw, np.nan), dtype="Float64")
    score[~ok] = pd.NA
    df["score"] = score
    df["margin"] = df["score"] - float(delta)
    df["is_outlier"] = (df["score"] < float(delta)).astype("boolean")
    df.loc[~ok, "is_outlier"] = pd.NA
    df["rank"] = df["score"].rank(method="min", ascending=True, na_option="keep").astype("Int64")
    return df


def summarize(flags: pd.DataFrame, class_names: list[str] | None = None) -> dict[str, Any]:
    """Outlier counts and rates overall and per predicted class (rates over ``ok`` rows)."""
    ok = flags[flags["status"] == "ok"]
    n_out = int(ok["is_outlier"].sum())
    overall = {
        "n_rows": int(len(flags)),
        "n_ok": int(len(ok)),
        "n_error": int(len(flags) - len(ok)),
        "n_outliers": n_out,
        "outlier_rate": (n_out / len(ok)) if len(ok) else None,
    }
    per_class = []
    if "pred" in ok.columns and len(ok):
        for pred, g in ok.groupby(ok["pred"].astype("int64"), sort=True):
            n_o = int(g["is_outlier"].sum())
            row = {"pred": int(pred), "n": int(len(g)), "n_outliers": n_o, "outlier_rate": n_o / len(g)}
            if class_names and 0 <= int(pred) < len(class_names):
                row["class_name"] = class_names[int(pred)]
            per_class.append(row)
    return {"overall": overall, "per_class": per_class}


def write_flags(flags: pd.DataFrame, output_dir: str | Path) -> Path:
    """Write ``<output_dir>/flags/flags.parquet`` (atomically: temp file + rename)."""
    d = Path(output_dir) / "flags"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "flags.parquet"
    tmp = d / ".flags.parquet.tmp"
    flags.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path
