"""odin_engine: ODIN out-of-distribution scoring as pure functions plus thin classes.

No Ray here: the distributed job in ``jobs/`` calls this library. The public names below are
imported on first use (PEP 562), so that ``import odin_engine.errors`` or ``odin-audit --help``
does not pay for torch (~2 s), and a scoring worker does not pay for scikit-learn (``metrics``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "CheckpointError": "errors", "ConfigError": "errors",
    "IMAGENET_MEAN": "loading", "IMAGENET_STD": "loading", "LoadedModel": "loading", "load_model": "loading",
    "REGISTRY": "methods", "ScoreMethod": "methods", "get_method": "methods", "register": "methods",
    "baseline_scores": "odin", "odin_scores": "odin", "perturbation_direction": "odin", "perturbed_scores": "odin",
    "SCORE_COLUMNS": "scorer", "OdinScorer": "scorer",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in ("metrics", "loading", "scorer", "odin", "methods", "optimize"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [*_EXPORTS, "metrics"]
