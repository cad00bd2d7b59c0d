"""Settings and their defaults, validated once at the edge.

ODIN (:class:`OdinSettings`): temperature ``T > 0`` and magnitude ``ε ∈ [0, 1]`` (pixel units);
the defaults are the values the ODIN paper found for CIFAR-10 DenseNets (T = 1000, ε = 0.0014).
Calibration (:class:`CalibrationSettings`): the target TPR in (0, 1), the score method δ
thresholds, and the confidence of the reported TPR interval.

The objects are frozen and check themselves when built; code that receives one does not check
again. Errors are :class:`~odin_engine.errors.SettingError` and name the *parameter*
(``tpr``, ``temperature``…); the command line maps parameter names to its flags.

Minimum held-out size: δ sits in the lower ``1 − tpr`` tail of the held-out scores, where only
``n·(1 − tpr)`` images lie. We require at least 5 there (the usual rule for a binomial count to
carry information), i.e. **n ≥ ⌈5 / (1 − tpr)⌉** (:func:`min_heldout`,
:func:`check_heldout_size` — the one place that rule and its message live).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from odin_engine import methods
from odin_engine.errors import ConfigError, SettingError

DEFAULT_TEMPERATURE = 1000.0
DEFAULT_EPSILON = 0.0014
DEFAULT_TPR = 0.95
DEFAULT_METHOD = "odin"
MIN_BELOW_THRESHOLD = 5


def validate_temperature(temperature: float, parameter: str = "temperature") -> float:
    t = _number(temperature, parameter)
    if not math.isfinite(t) or t <= 0:
        raise SettingError(parameter, f"{parameter} must be a finite number > 0 (the paper uses 1…1000); "
                                      f"got {temperature!r}")
    return t


def validate_epsilon(epsilon: float, parameter: str = "epsilon") -> float:
    e = _number(epsilon, parameter)
    if not math.isfinite(e) or not 0.0 <= e <= 1.0:
        raise SettingError(parameter, f"{parameter} must be in [0, 1] pixel units (the paper searches 0…0.004); "
                                      f"got {epsilon!r}")
    return e


def validate_tpr(tpr: float, parameter: str = "tpr") -> float:
    t = _number(tpr, parameter)
    if not math.isfinite(t) or not 0.0 < t < 1.0:
        raise SettingError(parameter, f"{parameter} must be a fraction strictly between 0 and 1 (e.g. 0.95); "
                                      f"got {tpr!r}")
    return t


def validate_method(method: str, parameter: str = "method") -> str:
    if method not in methods.TABLE_METHODS:
        raise SettingError(parameter, f"{parameter} must be one of {', '.join(methods.TABLE_METHODS)}; got {method!r}")
    return method


def _number(value: Any, parameter: str) -> float:
    if isinstance(value, bool):
        raise SettingError(parameter, f"{parameter} must be a number; got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingError(parameter, f"{parameter} must be a number; got {value!r}") from None


def min_heldout(tpr: float) -> int:
    """Smallest held-out size with at least 5 expected images below δ: ``ceil(5 / (1 − tpr))``."""
    return int(math.ceil(round(MIN_BELOW_THRESHOLD / (1.0 - validate_tpr(tpr)), 6)))


def check_heldout_size(n: int, tpr: float, what: str = "held-out in-distribution scores") -> None:
    """Refuse fewer than :func:`min_heldout` held-out images, with the one message for it."""
    need = min_heldout(tpr)
    if n < need:
        raise ConfigError(
            f"{n} {what} are too few for a {tpr:g} TPR target: need at least {need} "
            "(= ceil(5 / (1 - tpr)), so that at least 5 held-out images fall below δ)")



def read_tuning_file(path: str | Path) -> Any:
    """The parsed JSON of a ``tuning.json`` (local or object store); a missing or malformed file is a
    :class:`SettingError` of ``tuning``."""
    from odin_engine.io.store import read_bytes

    try:
        raw = read_bytes(str(path))
    except (OSError, ValueError) as exc:
        raise SettingError("tuning", f"tuning file not found: {path} (write one with `odin-audit tune`)") from exc
    try:
        return json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SettingError("tuning", f"tuning file {path} is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class OdinSettings:
    """ODIN's temperature ``T`` and perturbation magnitude ``ε``; ``origin`` says where they came from."""

    temperature: float = DEFAULT_TEMPERATURE
    epsilon: float = DEFAULT_EPSILON
    origin: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", validate_temperature(self.temperature))
        object.__setattr__(self, "epsilon", validate_epsilon(self.epsilon))

    @classmethod
    def from_tuning(cls, path: str | Path, *, expect_model_id: str | None = None) -> "OdinSettings":
        """``T``/``ε`` of a ``tuning.json`` written by ``odin-audit tune`` (local or object store).

        With ``expect_model_id``, a file tuned for another model is refused.
        """
        doc = read_tuning_file(path)
        if not isinstance(doc, dict) or "temperature" not in doc or "epsilon" not in doc:
            raise SettingError("tuning", f"tuning file {path} needs numeric 'temperature' and 'epsilon' fields")
        try:
            settings = cls(doc["temperature"], doc["epsilon"], origin=f"tuning file {path}")
        except SettingError as exc:
            raise SettingError("tuning", f"tuning file {path}: {exc}") from exc
        if expect_model_id and doc.get("model_id") and doc["model_id"] != expect_model_id:
            raise SettingError("tuning", f"tuning file {path} was tuned for model {doc['model_id']}, not "
                                         f"{expect_model_id}: re-run `odin-audit tune`")
        return settings

    @classmethod
    def resolve(cls, tuning: str | Path | None = None, temperature: float | None = None,
                epsilon: float | None = None) -> "OdinSettings":
        """The edge: a tuning file, or explicit ``temperature``/``epsilon`` (they exclude each
        other), else the defaults."""
        if tuning and (temperature is not None or epsilon is not None):
            raise SettingError("tuning", "give either tuning or temperature/epsilon, not both")
        if tuning:
            return cls.from_tuning(tuning)
        explicit = temperature is not None or epsilon is not None
        return cls(DEFAULT_TEMPERATURE if temperature is None else temperature,
                   DEFAULT_EPSILON if epsilon is None else epsilon, origin="flags" if explicit else "defaults")


def validate_fdr(q: float | None, parameter: str = "fdr") -> float | None:
    if q is None:
        return None
    v = _number(q, parameter)
    if not math.isfinite(v) or not 0.0 < v < 1.0:
        raise SettingError(parameter, f"{parameter} must be a false-discovery rate strictly between 0 and 1 "
                                      f"(e.g. 0.1); got {q!r}")
    return v


def validate_conditional(delta: float | None, parameter: str = "conditional") -> float | None:
    if delta is None:
        return None
    v = _number(delta, parameter)
    if not math.isfinite(v) or not 0.0 < v <= 0.5:
        raise SettingError(parameter, f"{parameter} must be in (0, 0.5] (the probability that the held-out draw "
                                      f"breaks the guarantee, e.g. 0.1); got {delta!r}")
    return v


@dataclass(frozen=True)
class CalibrationSettings:
    """Target TPR of δ on in-distribution data, the score column it thresholds, the confidence of
    the reported TPR interval, and the decision rule: ``fdr`` = Q flags by Benjamini–Hochberg at
    false-discovery rate Q on conformal p-values instead of ``score < δ``; ``conditional`` = DELTA
    makes the p-values calibration-conditional (:mod:`odin_engine.decide.conformal`)."""

    tpr: float = DEFAULT_TPR
    method: str = DEFAULT_METHOD
    confidence: float = 0.95
    fdr: float | None = None
    conditional: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tpr", validate_tpr(self.tpr))
        object.__setattr__(self, "method", validate_method(self.method))
        object.__setattr__(self, "confidence", validate_tpr(self.confidence, "confidence"))
        object.__setattr__(self, "fdr", validate_fdr(self.fdr))
        object.__setattr__(self, "conditional", validate_conditional(self.conditional))

    @property
    def min_heldout(self) -> int:
        return min_heldout(self.tpr)

    def check_heldout_size(self, n: int, what: str = "held-out in-distribution scores") -> None:
        """The TPR rule's minimum, and with ``fdr`` the size below which BH could never flag."""
        check_heldout_size(n, self.tpr, what)
        if self.fdr is not None:
            from odin_engine.decide.conformal import check_heldout_for_fdr

            check_heldout_for_fdr(n, self.fdr, self.conditional, what)
