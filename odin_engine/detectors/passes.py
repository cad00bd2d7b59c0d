"""One scoring pass over a normalized batch: everything every registered method reads.

``run_pass`` runs what ODIN already runs — a forward with the input gradient, and the forward on
``x̃ = x − ε·g`` — and takes, on the way, the head's input ``h`` (forward pre-hook, no second
clean forward). AdaSCALE reuses ODIN's gradient ``g`` and adds one forward on its own perturbed
input (:func:`odin_engine.detectors.shaping.adascale_perturb`) only when it is asked for.
Methods then compute their scores from the :class:`ScoringPass` (cheap tensor math on ``h``
and the logits).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from odin_engine.odin import _autocast, _wide, max_tempered_softmax, perturbation_direction, perturbed_scores

from .features import FeatureTap, Head
from .fit import FitStats
from .shaping import adascale_perturb


@dataclass
class ScoringPass:
    logits: torch.Tensor  # N×C float32, clean input
    pred: torch.Tensor  # N
    odin: torch.Tensor  # N: max softmax(f(x̃)/T)
    h: torch.Tensor | None  # N×D penultimate features (None: no head)
    h_perturbed: torch.Tensor | None  # N×D features of AdaSCALE's perturbed input (None: not asked for)
    head: Head | None
    fit: FitStats | None
    energy_temperature: float = 1.0


def run_pass(model, x: torch.Tensor, std: torch.Tensor, *, temperature: float, epsilon: float,
             head: Head | None = None, fit: FitStats | None = None, adascale: bool = False,
             energy_temperature: float = 1.0, autocast_dtype: torch.dtype | None = None) -> ScoringPass:
    """Logits, ODIN, ``h`` (when ``head``) and AdaSCALE's ``h̃`` (when ``adascale``) for ``x``."""
    adascale = adascale and head is not None
    tap = FeatureTap(model, head.name) if head is not None else contextlib.nullcontext()
    with tap:
        h = h_pert = None
        if epsilon == 0.0 and not adascale:
            with torch.inference_mode(), _autocast(x.device, autocast_dtype):
                logits = _wide(model(x))
            h = tap.take() if head is not None else None
            odin = max_tempered_softmax(logits, temperature)
            pred = logits.argmax(dim=1)
        else:
            direction, first = perturbation_direction(model, x, std, temperature, autocast_dtype, keep_grad=adascale)
            h = tap.take() if head is not None else None
            logits, pred = first.logits, first.pred
            if epsilon == 0.0:
                odin = max_tempered_softmax(logits, temperature)
            else:
                (odin,) = perturbed_scores(model, x, direction, temperature, [epsilon], autocast_dtype)
            if adascale:
                with torch.inference_mode(), _autocast(x.device, autocast_dtype):
                    model(adascale_perturb(x, first.grad))
                h_pert = tap.take()
    return ScoringPass(logits=logits, pred=pred, odin=odin, h=h, h_perturbed=h_pert, head=head, fit=fit,
                       energy_temperature=energy_temperature)
