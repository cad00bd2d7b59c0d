"""odin_engine: ODIN out-of-distribution scoring as pure functions plus thin classes.

No Ray here: the distributed job in ``jobs/`` calls this library. Names that need torch
(``load_model``, ``OdinScorer``, ``odin_scores``, …) and scikit-learn (``metrics``) are imported
on first use, so that the decision stage (score table, calibration, flagging, report) and
``--help`` start without them.
"""

from .errors import CheckpointError, ConfigError
from .methods import REGISTRY, ScoreMethod, get_method, register

__version__ = "0.1.0"

_LAZY = {
    "IMAGENET_MEAN": ".loading", "IMAGENET_STD": ".loading", "LoadedModel": ".loading", "load_model": ".loading",
    "baseline_scores": ".odin", "odin_scores": ".odin", "perturbation_direction": ".odin",
    "perturbed_scores": ".odin", "SCORE_COLUMNS": ".scorer", "OdinScorer": ".scorer",
}


def __getattr__(name: str):
    import importlib

    if name == "metrics":
        return importlib.import_module(".metrics", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError", "ConfigError", "IMAGENET_MEAN", "IMAGENET_STD", "LoadedModel", "OdinScorer",
    "REGISTRY", "SCORE_COLUMNS", "ScoreMethod", "baseline_scores", "get_method", "load_model", "metrics",
    "odin_scores", "perturbation_direction", "perturbed_scores", "register",
]
