"""``OdinScorer``: a thin class over :func:`odin_engine.detectors.passes.run_pass` and the registry.

It turns images into normalized batches on the right device, runs one scoring pass per chunk
(ODIN's forward + input gradient + perturbed forward, the head's input ``h`` taken on the way)
and returns numpy columns ``pred`` and one per method of :data:`odin_engine.methods.TABLE_METHODS`
(NaN where a method is not computed: no classifier head, or a fitted method without a fit).
"""

from __future__ import annotations

import copy
import logging
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .detectors.features import Head, find_head
from .detectors.fit import FitStats
from .detectors.passes import ScoringPass, run_pass
from .methods import METHOD_SETS, REGISTRY, TABLE_METHODS, get_method, parse_methods
from .loading import LoadedModel
from .odin import perturbation_direction, perturbed_scores, baseline_scores
from .optimize import optimize_for_inference
from .settings import validate_epsilon, validate_temperature

SCORE_COLUMNS = ("pred", *TABLE_METHODS)  # one column per score-table method
_AUTOCAST = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger(__name__)


def to_unit_tensor(images) -> torch.Tensor:
    """uint8 N×H×W×3 (RGB) array, or float N×3×H×W in [0,1] → float32 N×3×H×W in [0,1]."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be N×H×W×3 RGB; got shape {images.shape}")
            return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("images must be a uint8 numpy array N×H×W×3 or a float tensor N×3×H×W in [0,1]")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be N×3×H×W; got shape {tuple(images.shape)}")
    return images.float()


class OdinScorer:
    """Score images with every registered method from the pass ODIN already runs.

    ``score(images)`` → ``{"pred", <one array per method>}`` as 1-D numpy arrays (NaN where a
    method is not computed). Each image's scores are independent of the batch it rides in.

    ``head``: the classifier head's module name (default: found, :func:`find_head`); ``fit``: the
    reference statistics of the fitted methods; ``methods``: the methods to compute — names and
    the words ``"default"`` (every table method this model and fit allow except the on-request
    ones, :data:`~odin_engine.methods.ON_REQUEST_METHODS`: AdaSCALE's extra forward) and ``"all"``
    (AdaSCALE included); default ``["default"]``; naming one that cannot be computed is a
    ``ConfigError``. ``params``: ``{method: hyperparameter}`` overriding the defaults (``tune``'s choice).
    """

    def __init__(
        self,
        model: LoadedModel,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        device: str | torch.device | None = None,
        *,
        batch_size: int = 256,
        energy_temperature: float = 1.0,
        autocast: str | None = None,
        optimize: bool = True,
        head: str | None = None,
        fit: FitStats | None = None,
        methods: Sequence[str] | None = None,
        params: dict | None = None,
    ) -> None:
        self.model = model
        self.temperature = validate_temperature(temperature)
        self.epsilon = validate_epsilon(epsilon)
        self.energy_temperature = validate_temperature(energy_temperature)
        if autocast not in _AUTOCAST:
            raise ConfigError(f"autocast must be one of none, bf16, fp16; got {autocast!r}")
        self.autocast_dtype = _AUTOCAST[autocast]
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # a private copy: the caller's LoadedModel keeps its device and layout
        module: nn.Module = copy.deepcopy(model.module).to(self.device)
        self.head: Head | None = None
        self.head_note = ""
        words = parse_methods(methods, "methods") or ("default",)
        named = [m for m in words if m not in METHOD_SETS]  # named explicitly: must be computable
        must = head is not None or fit is not None or any(REGISTRY[m].needs_features for m in named)
        try:
            self.head = find_head(module, model.input_size, head)
        except ConfigError as exc:
            if must:
                raise
            self.head_note = str(exc)
        self.module = optimize_for_inference(module, self.device) if optimize else module
        if self.head is not None:
            try:
                sub = self.module.get_submodule(self.head.name)
            except AttributeError:
                sub = None
            if not isinstance(sub, nn.Linear):  # the rewrite lost the head's name: hook the plain model
                log.info("head %s not found after optimization; scoring the unoptimized model", self.head.name)
                self.module = module
            else:
                bias = sub.bias if sub.bias is not None else torch.zeros(sub.out_features, device=self.device)
                self.head = Head(self.head.name, sub.weight.detach(), bias.detach())
        if fit is not None:
            fit.check_model(model.model_id, self.head.name, self.temperature if "adascale" in named else None)
        self.fit = fit
        available = [m for m, meth in REGISTRY.items()
                     if (self.head is not None or not meth.needs_features) and (fit is not None or not meth.needs_fit)
                     and not (m == "adascale" and fit is not None and not fit.same_temperature(self.temperature))]
        missing = [m for m in named if m not in available]
        if missing:
            from .methods import require_fit

            for m in missing:
                require_fit(m, fit is not None, "method")
            raise ConfigError(f"method(s) {missing} cannot be computed with this model and fit")
        chosen: list[str] = []
        for w in words:
            if w in METHOD_SETS:
                chosen += [m for m in TABLE_METHODS if m in available and (w == "all" or not REGISTRY[m].on_request)]
            else:
                chosen.append(w)
        self.methods = list(dict.fromkeys(chosen))
        self.params = dict(params or {})  # {method: hyperparameter value} (tune's choice); default otherwise
        for name in self.params:
            get_method(name)
        self.mean = torch.tensor(model.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(model.std, device=self.device).view(1, 3, 1, 1)

    def normalize(self, unit: torch.Tensor) -> torch.Tensor:
        """``(p − mean) / std`` on the scorer's device, channels-last where that is faster."""
        x = (unit.to(self.device, non_blocking=True) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else x

    def batches(self, images) -> Iterator[torch.Tensor]:
        """Normalized chunks of ``batch_size``; converted chunk by chunk to bound memory."""
        to_unit_tensor(images[:0])  # validate the whole input's type and shape up front
        for start in range(0, len(images), self.batch_size):
            yield self.normalize(to_unit_tensor(images[start : start + self.batch_size]))

    def run_pass(self, x: torch.Tensor) -> ScoringPass:
        """One scoring pass over a normalized batch (what every method reads)."""
        return run_pass(self.module, x, self.std.flatten(), temperature=self.temperature, epsilon=self.epsilon,
                        head=self.head, fit=self.fit, adascale="adascale" in self.methods,
                        energy_temperature=self.energy_temperature, autocast_dtype=self.autocast_dtype)

    def passes(self, images) -> Iterator[ScoringPass]:
        for x in self.batches(images):
            yield self.run_pass(x)

    def score(self, images) -> dict[str, np.ndarray]:
        columns = [*SCORE_COLUMNS, *(m for m in self.methods if m not in SCORE_COLUMNS)]
        parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
        for p in self.passes(images):
            parts["pred"].append(p.pred.cpu().numpy())
            n = p.pred.shape[0]
            for c in columns[1:]:
                if c in self.methods:
                    parts[c].append(REGISTRY[c].score(p, self.params.get(c)).detach().float().cpu().numpy())
                else:
                    parts[c].append(np.full(n, np.nan, np.float32))
        return {
            c: (np.concatenate(v) if v else np.empty(0, dtype=np.int64 if c == "pred" else np.float32))
            for c, v in parts.items()
        }

    def score_grid(self, images, temperatures, epsilons) -> dict[str, np.ndarray]:
        """ODIN scores for every (T, ε): one gradient per T, reused for every ε.

        Returns ``{"odin": array[len(T), len(ε), N], "msp": …, "pred": …}``.
        The sign of ∂L/∂x depends on T but not on ε, so the grid costs
        ``|T| · (1 forward + 1 backward) + |T|·|ε| forwards``.
        """
        temps = [validate_temperature(t) for t in temperatures]
        eps = [validate_epsilon(e) for e in epsilons]
        grid, msp, pred = [], [], []
        for x in self.batches(images):
            per_t = []
            for t in temps:
                direction, first = perturbation_direction(self.module, x, self.std.flatten(), t, self.autocast_dtype)
                scores = perturbed_scores(self.module, x, direction, t, eps, self.autocast_dtype)
                per_t.append(torch.stack(scores).cpu().numpy())
            grid.append(np.stack(per_t))
            msp.append(baseline_scores(first.logits)["msp"].cpu().numpy())
            pred.append(first.pred.cpu().numpy())
        return {
            "odin": np.concatenate(grid, axis=2) if grid else np.empty((len(temps), len(eps), 0), np.float32),
            "msp": np.concatenate(msp) if msp else np.empty(0, np.float32),
            "pred": np.concatenate(pred) if pred else np.empty(0, np.int64),
        }
