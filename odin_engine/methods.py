"""The one registry of scoring methods. Every method: higher score = more in-distribution.

A method maps a normalized batch to one score per image::

    fn(model, x, std, *, temperature, epsilon, energy_temperature) -> Tensor[N]

``needs_input_gradient`` tells callers (tuning, cost estimates) whether it runs a backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ConfigError
from .odin import baseline_scores, odin_scores


@dataclass(frozen=True)
class ScoreMethod:
    name: str
    formula: str
    needs_input_gradient: bool
    fn: Callable[..., torch.Tensor]


REGISTRY: dict[str, ScoreMethod] = {}


def register(method: ScoreMethod) -> ScoreMethod:
    if method.name in REGISTRY:
        raise ValueError(f"scoring method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> ScoreMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown scoring method {name!r}; choose one of {sorted(REGISTRY)}") from None


def _baseline(column: str):
    def fn(model, x, std, *, temperature=1.0, epsilon=0.0, energy_temperature=1.0):
        with torch.inference_mode():
            logits = model(x)
        return baseline_scores(logits, energy_temperature)[column]

    return fn


def _odin(model, x, std, *, temperature, epsilon, energy_temperature=1.0):
    return odin_scores(model, x, std, temperature, epsilon, energy_temperature)["odin"]


register(ScoreMethod("msp", "max softmax(f(x))", False, _baseline("msp")))
register(ScoreMethod("max_logit", "max f(x)", False, _baseline("max_logit")))
register(ScoreMethod("energy", "T_e · logsumexp(f(x)/T_e)", False, _baseline("energy")))
register(ScoreMethod("odin", "max softmax(f(x − ε·sign(∇ₓCE(f(x)/T, ŷ))/std)/T)", True, _odin))
