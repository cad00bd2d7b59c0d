"""Settings and their defaults, validated once at the edge.

ODIN: temperature ``T > 0`` and magnitude ``ε ∈ [0, 1]`` (pixel units); the defaults are the
values the ODIN paper found for CIFAR-10 DenseNets (T = 1000, ε = 0.0014). Calibration: the
target TPR in (0, 1) and the score method that δ thresholds.
"""

from __future__ import annotations

import math

from odin_engine.errors import ConfigError
from odin_engine.io.scores import SCORE_METHODS

DEFAULT_TEMPERATURE = 1000.0
DEFAULT_EPSILON = 0.0014
DEFAULT_TPR = 0.95


def validate_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(f"temperature must be a finite number > 0 (the paper uses 1…1000); got {temperature!r}")
    return t


def validate_epsilon(epsilon: float) -> float:
    e = float(epsilon)
    if not math.isfinite(e) or not 0.0 <= e <= 1.0:
        raise ConfigError(
            f"epsilon must be in [0, 1] pixel units (the paper searches 0…0.004); got {epsilon!r}"
        )
    return e


def validate_tpr(tpr: float) -> float:
    t = float(tpr)
    if not math.isfinite(t) or not 0.0 < t < 1.0:
        raise ConfigError(f"--tpr must be a fraction strictly between 0 and 1 (e.g. 0.95); got {tpr!r}")
    return t


def validate_method(method: str) -> str:
    if method not in SCORE_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(SCORE_METHODS)}; got {method!r}")
    return method
