"""The score table: its schema, its reader and the checks on the settings it was scored with.

One row per image (``image_id``, ``uri``, ``status``/``error``, size, ``pred``, the score
columns, provenance; ``label``/``split`` carried from a manifest). Any Parquet dataset in this
schema is a valid input to the decision stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa

from odin_engine.errors import ConfigError

SCHEMA_VERSION = 1
FLOAT_COLUMNS = ("msp", "max_logit", "energy", "odin")
SCORE_METHODS = ("odin", "msp", "energy", "max_logit")
SETTING_COLUMNS = ("model_id", "temperature", "epsilon")


def output_schema(carried: pa.Schema | None = None, metadata: dict | None = None) -> pa.Schema:
    """The ``scores/`` schema; ``carried`` holds the manifest's label/split fields."""
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # null when ok
        pa.field("width", pa.int32()),  # displayed size (after EXIF rotation); null if undecodable
        pa.field("height", pa.int32()),
        pa.field("pred", pa.int64()),  # argmax class of the clean input; null on error
        pa.field("msp", pa.float64()),
        pa.field("max_logit", pa.float64()),
        pa.field("energy", pa.float64()),
        pa.field("odin", pa.float64()),
        pa.field("temperature", pa.float64()),
        pa.field("epsilon", pa.float64()),
        pa.field("model_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC")),
        pa.field("version", pa.string()),  # the listed version of the bytes scored (size:mtime_ns, ETag, …)
    ]
    fields += list(carried or [])
    return pa.schema(fields, metadata=metadata)



def read_scores(path: str | Path) -> pd.DataFrame:
    """All rows of a score job's output: ``DIR/scores/*.parquet`` (or ``DIR/*.parquet``, or one file)."""
    p = Path(path)
    if p.is_dir() and (p / "scores").is_dir():
        p = p / "scores"
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.glob("*.parquet") if not f.name.startswith((".", "_")))
    else:
        raise ConfigError(f"scores not found: {path} (give the score job's --output directory)")
    if not files:
        raise ConfigError(f"no Parquet score files in {p} (give the score job's --output directory)")
    frames = [pd.read_parquet(f) for f in files]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    missing = [c for c in ("image_id", "status", *SETTING_COLUMNS) if c not in df.columns]
    if missing:
        raise ConfigError(f"{path} is not score-job output: columns {missing} are missing")
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        ids = df.loc[dup, "image_id"].astype(str).unique().tolist()
        raise ConfigError(
            f"{path} holds {len(ids)} image_ids more than once (e.g. {ids[:3]}): that score run is not "
            "exactly-once; rerun the same `odin-audit score` command to repair it"
        )
    return df


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"]


def settings_of(df: pd.DataFrame, method: str, what: str) -> dict[str, Any]:
    """The one (model_id, temperature, epsilon) of the ok rows; mixed settings are refused."""
    ok = ok_rows(df)
    if ok.empty:
        raise ConfigError(f"the {what} scores have no row with status 'ok'")
    out: dict[str, Any] = {}
    for col in SETTING_COLUMNS:
        values = ok[col].dropna().unique()
        if len(values) != 1:
            raise ConfigError(
                f"the {what} scores mix several values of {col} ({sorted(map(str, values))[:5]}); "
                "score each setting into its own output directory"
            )
        v = values[0]
        out[col] = float(v) if col != "model_id" else str(v)
    out["method"] = method
    return out


def check_same_settings(corpus: Mapping[str, Any], heldout: Mapping[str, Any]) -> None:
    """Refuse held-out scores computed with a different model, T, ε or method than the corpus's."""
    diffs = []
    for key in (*SETTING_COLUMNS, "method"):
        a, b = corpus.get(key), heldout.get(key)
        same = math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            diffs.append(f"{key}: corpus {a!r} vs held-out {b!r}")
    if diffs:
        raise ConfigError(
            "held-out scores were computed with different settings than the corpus's ("
            + "; ".join(diffs) + "): rescore the held-out set with the same --model/--weights/--temperature/--epsilon"
        )
