"""The one registry of scoring methods. Every method: higher score = more in-distribution.

A method maps a normalized batch to one score per image::

    fn(model, x, std, *, temperature, epsilon, energy_temperature) -> Tensor[N]

``needs_input_gradient`` tells callers (tuning, cost estimates) whether it runs a backward.

:data:`TABLE_METHODS` — the methods registered here, in this order — are the score columns of
the score table (:mod:`odin_engine.io.scores`): the scorer computes all of them from one
forward (+ one backward for ODIN). This module imports torch only when a method is *called*, so
the decision stage (schema, calibration, flagging) reads the list without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class ScoreMethod:
    name: str
    formula: str
    needs_input_gradient: bool
    fn: Callable[..., Any]


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
        import torch

        from .odin import baseline_scores

        with torch.inference_mode():
            logits = model(x)
        return baseline_scores(logits, energy_temperature)[column]

    return fn


def _odin(model, x, std, *, temperature, epsilon, energy_temperature=1.0):
    from .odin import odin_scores

    return odin_scores(model, x, std, temperature, epsilon, energy_temperature)["odin"]


register(ScoreMethod("msp", "max softmax(f(x))", False, _baseline("msp")))
register(ScoreMethod("max_logit", "max f(x)", False, _baseline("max_logit")))
register(ScoreMethod("energy", "T_e · logsumexp(f(x)/T_e)", False, _baseline("energy")))
register(ScoreMethod("odin", "max softmax(f(x − ε·sign(∇ₓCE(f(x)/T, ŷ))/std)/T)", True, _odin))

#: the score-table columns, one per built-in method (methods registered later are not in the table)
TABLE_METHODS: tuple[str, ...] = tuple(REGISTRY)
