"""odin_engine: ODIN out-of-distribution scoring as pure functions plus thin classes.

No Ray here: the distributed job in ``jobs/`` calls this library.
"""

from .errors import CheckpointError, ConfigError
from .loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, load_model
from .methods import REGISTRY, ScoreMethod, get_method, register
from .odin import baseline_scores, odin_scores, perturbation_direction, perturbed_scores
from .scorer import SCORE_COLUMNS, OdinScorer

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``odin_engine.metrics`` pulls in scikit-learn: imported on first use, so that a scoring
    # worker (which never computes metrics) starts without it.
    if name == "metrics":
        import importlib

        return importlib.import_module(".metrics", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CheckpointError", "ConfigError", "IMAGENET_MEAN", "IMAGENET_STD", "LoadedModel", "OdinScorer",
    "REGISTRY", "SCORE_COLUMNS", "ScoreMethod", "baseline_scores", "get_method", "load_model", "metrics",
    "odin_scores", "perturbation_direction", "perturbed_scores", "register",
]
