"""The ODIN math as pure functions on tensors (Liang, Li & Srikant, ICLR 2018).

Notation: ``f`` is the classifier, ``x`` the *normalized* input ``(p - mean) / std``
for pixels ``p`` in [0, 1], ``T`` the temperature and ``ε`` the perturbation
magnitude in [0, 1] pixel units.

1. ``ŷ = argmax f(x)`` from the untempered logits;
2. ``L = CE(f(x) / T, ŷ)``, summed over the batch so that every image's gradient
   is its own (a mean would scale it by 1/N and couple it to the batch);
3. ``g = sign(∂L/∂x)`` with zero mapped to +1, then divided per channel by ``std``
   (one pixel-unit step in normalized coordinates);
4. ``x̃ = x − ε·g``;  ``S_odin = max softmax(f(x̃) / T)``.  Higher = more in-distribution.

The first forward pass also yields, at no extra cost, the baseline scores
``msp = max softmax(f(x))``, ``max_logit = max f(x)`` and
``energy = T_e · logsumexp(f(x) / T_e)`` (the *negative* free energy of Liu et al.
2020, so that higher also means more in-distribution).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FirstPass:
    """What one forward pass over the clean input gives."""

    logits: torch.Tensor  # N×C, float32
    pred: torch.Tensor  # N, int64
    grad: torch.Tensor | None = None  # ∂L/∂x (float32), kept only when asked for (AdaSCALE shares it)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Promote half-precision results to float32; keep float32/float64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def baseline_scores(logits: torch.Tensor, energy_temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """MSP, max logit and energy from untempered logits (all: higher = more in-distribution)."""
    logits = _wide(logits)
    return {
        "msp": torch.softmax(logits, dim=1).amax(dim=1),
        "max_logit": logits.amax(dim=1),
        "energy": energy_temperature * torch.logsumexp(logits / energy_temperature, dim=1),
    }


def max_tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``max softmax(logits / T)`` in float32."""
    return torch.softmax(_wide(logits) / temperature, dim=1).amax(dim=1)


def perturbation_direction(
    model: Model,
    x: torch.Tensor,
    std: torch.Tensor,
    temperature: float,
    autocast_dtype: torch.dtype | None = None,
    keep_grad: bool = False,
) -> tuple[torch.Tensor, FirstPass]:
    """Steps 1–3: the per-channel-scaled gradient sign ``g`` and the clean first pass.

    ``g = where(∂L/∂x ≥ 0, +1, −1) / std`` with ``L = Σ_i CE(f(x_i)/T, argmax f(x_i))``.
    Only the input gradient is computed: parameters must not require grad.
    The sign is taken on an fp32 gradient even when the forward runs under autocast.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), _autocast(x.device, autocast_dtype):
        logits = model(x)
    logits = _wide(logits)
    pred = logits.detach().argmax(dim=1)
    loss = F.cross_entropy(logits / temperature, pred, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    grad = _wide(grad)
    sign = torch.where(grad >= 0, 1.0, -1.0).to(grad.dtype)
    direction = sign / std.to(sign).view(1, -1, 1, 1)
    return direction, FirstPass(logits=logits.detach(), pred=pred, grad=grad if keep_grad else None)


def perturb(x: torch.Tensor, direction: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Step 4a: ``x̃ = x − ε·g`` (normalized coordinates)."""
    return x.detach() - epsilon * direction.to(x.dtype)


@torch.inference_mode()
def perturbed_scores(
    model: Model,
    x: torch.Tensor,
    direction: torch.Tensor,
    temperature: float,
    epsilons: Sequence[float],
    autocast_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Step 4b for several ε sharing one gradient sign: ``[max softmax(f(x − ε·g)/T) for ε]``."""
    out = []
    for eps in epsilons:
        with _autocast(x.device, autocast_dtype):
            logits = model(perturb(x, direction, eps))
        out.append(max_tempered_softmax(logits, temperature))
    return out


def odin_scores(
    model: Model,
    x: torch.Tensor,
    std: torch.Tensor,
    temperature: float,
    epsilon: float,
    energy_temperature: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """All scores for a normalized batch ``x``: ``pred``, ``msp``, ``max_logit``, ``energy``, ``odin``.

    Two forward passes and one input-only backward. With ``ε = 0`` the second
    pass is skipped: ``S_odin = max softmax(f(x)/T)`` from the first.
    """
    if epsilon == 0.0:
        with torch.inference_mode(), _autocast(x.device, autocast_dtype):
            logits = _wide(model(x))
        odin = max_tempered_softmax(logits, temperature)
        pred = logits.argmax(dim=1)
    else:
        direction, first = perturbation_direction(model, x, std, temperature, autocast_dtype)
        logits, pred = first.logits, first.pred
        (odin,) = perturbed_scores(model, x, direction, temperature, [epsilon], autocast_dtype)
    return {"pred": pred, **baseline_scores(logits, energy_temperature), "odin": odin}
