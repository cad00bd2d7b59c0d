"""Frozen calibration: reuse an earlier audit's δ on later nights, and refuse one made for other settings.

A ``calibration.json`` holds δ and the statistics of the held-out set it came from (``n_heldout``,
``order_statistic_k``, the TPR interval) together with the settings its scores were computed with.
δ only means something for scores computed the same way, so a calibration is reused only when
this run's settings equal the recorded ones: ``model_id`` (architecture + weights digest), ``T``,
``ε``, the score ``method``, and — recorded since this module exists (:func:`with_scoring_settings`)
— the input normalization (``mean``/``std``), ``input_size`` and ``resize`` policy. Calibrations
written before that lack the last four; they still load, and those settings are reported as
unchecked rather than refused.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any, Mapping

from odin_engine.decide.calibration import CALIBRATION_VERSION
from odin_engine.errors import ConfigError
from odin_engine.io.store import resolve

CALIBRATION_FILE = "calibration.json"
# what a calibration is only valid for; the first four have been recorded since version 1
SETTING_KEYS = ("model_id", "temperature", "epsilon", "method", "mean", "std", "input_size", "resize", "fit_id")
SCORING_KEYS = ("mean", "std", "input_size", "resize")
REQUIRED_KEYS = ("delta", "n_heldout", "order_statistic_k", "target_tpr", "model_id", "temperature", "epsilon",
                 "method")
FIX = ("recalibrate on held-out in-distribution images (CLI: --heldout instead of --calibration), "
       "or use the calibration made for this model and these settings")


def with_scoring_settings(calibration: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """``calibration`` plus the input settings of the score run it was made from.

    ``config``: the score run's configuration (``score_corpus(...)["config"]``, or the ``config``
    of its ``_odin_job.json``), which holds ``mean``, ``std``, ``input_size`` and ``resize``.
    """
    missing = [k for k in SCORING_KEYS if k not in config]
    if missing:
        raise ValueError(f"the score run's config lacks {missing}")
    return {**calibration, **{k: config[k] for k in SCORING_KEYS}}


def read_calibration(uri: str) -> dict[str, Any]:
    """Load a ``calibration.json`` (local path or ``s3://``/``gs://``/``file://`` URI; a directory
    means the ``calibration.json`` of its current result) and check it holds what a frozen calibration needs."""
    fs, path = resolve(str(uri))
    try:
        from pyarrow import fs as pafs

        if fs.get_file_info(path).type == pafs.FileType.Directory:  # an output directory: its current result's
            from odin_engine.io.results import current
            from odin_engine.io.store import Store

            path = posixpath.join(current(Store(str(uri))).path, CALIBRATION_FILE)
        with fs.open_input_stream(path) as fh:
            raw = fh.read()
    except FileNotFoundError as exc:
        raw = _through_pointer(str(uri))  # DIR/calibration.json of an object store: DIR's current result's
        if raw is not None:
            return _checked(raw, uri)
        raise ConfigError(f"calibration not found: {uri} (an audit with a held-out set writes "
                          f"{CALIBRATION_FILE} into its output directory)") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read calibration {uri}: {exc}") from exc
    return _checked(raw, uri)


def _through_pointer(uri: str) -> bytes | None:
    """``DIR/calibration.json`` where ``DIR`` publishes whole results (object stores have no link at
    that path): the bytes of the current result's ``calibration.json``, or None."""
    from odin_engine.io.results import read_pointer
    from odin_engine.io.store import Store

    parent, name = uri.rstrip("/").rsplit("/", 1) if "/" in uri.rstrip("/") else ("", uri)
    if name != CALIBRATION_FILE or not parent:
        return None
    try:
        out = Store(parent)
        pointer = read_pointer(out)
        return out.join(pointer["path"]).read_bytes(CALIBRATION_FILE) if pointer else None
    except (OSError, ValueError, ConfigError):
        return None


def _checked(raw: bytes, uri: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"calibration {uri} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"calibration {uri} is not a JSON object")
    version = doc.get("version", CALIBRATION_VERSION)
    if not isinstance(version, int) or version > CALIBRATION_VERSION:
        raise ConfigError(f"calibration {uri} has version {version!r}; this odin-audit reads up to "
                          f"{CALIBRATION_VERSION}: upgrade odin-audit or recalibrate")
    missing = [k for k in REQUIRED_KEYS if doc.get(k) is None]
    if missing:
        raise ConfigError(f"calibration {uri} lacks {missing}: it is not a calibration.json written by odin-audit")
    delta, n, k = doc["delta"], doc["n_heldout"], doc["order_statistic_k"]
    if not (isinstance(delta, (int, float)) and math.isfinite(delta)) or not (
            isinstance(n, int) and isinstance(k, int) and 1 <= k <= n):
        raise ConfigError(f"calibration {uri} holds an impossible threshold (delta={delta!r}, "
                          f"n_heldout={n!r}, order_statistic_k={k!r})")
    held = doc.get("heldout_scores_sorted")
    if held is not None and not (isinstance(held, list) and len(held) == n and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in held) and held == sorted(held)):
        raise ConfigError(f"calibration {uri}: heldout_scores_sorted must be the n_heldout = {n} held-out scores, "
                          "sorted ascending: the file is damaged; recalibrate")
    return doc


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_calibration(calibration: Mapping[str, Any], expect: Mapping[str, Any], where: str = "calibration") -> list[str]:
    """Refuse ``calibration`` unless every setting in ``expect`` equals the recorded one.

    ``expect``: this run's settings, keys among :data:`SETTING_KEYS` (``None`` values are skipped).
    Raises ``ConfigError`` naming each difference and the fix. Returns the expected settings the
    calibration does not record (older files), which could not be checked.
    """
    unknown = [k for k in expect if k not in SETTING_KEYS]
    if unknown:
        raise ValueError(f"cannot check settings {unknown}; known: {list(SETTING_KEYS)}")
    diffs, unchecked = [], []
    for key in SETTING_KEYS:
        want = expect.get(key)
        if want is None:
            continue
        if calibration.get(key) is None:
            unchecked.append(key)
        elif not _same(calibration[key], want):
            diffs.append(f"{key}: {calibration[key]!r} there vs {want!r} now")
    if diffs:
        raise ConfigError(f"{where} was made for other settings than this run ({'; '.join(diffs)}): {FIX}")
    return unchecked


def load_frozen_calibration(uri: str, expect: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`read_calibration` + :func:`check_calibration`; the result records where it came from.

    Returns the calibration with ``frozen_from`` (``uri``) and ``settings_unchecked`` (settings
    this run has but the file does not record) added.
    """
    cal = read_calibration(uri)
    unchecked = check_calibration(cal, expect, where=f"calibration {uri}")
    return {**cal, "frozen_from": str(uri), "settings_unchecked": unchecked}
