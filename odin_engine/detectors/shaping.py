"""Activation shaping: reshape the penultimate features ``h`` (N×D), re-apply the head, take the energy.

With ``W``, ``b`` the head and ``E(z) = logsumexp(z)``:

* SCALE (Xu et al., ICLR 2024): ``h' = h · exp(Σh / Σ_{top-k} h)``, ``k = D − round(D·p/100)``, p = 85;
  score ``E(W·h' + b)``.
* ASH-S (Djurisic et al., ICLR 2023): keep the ``k`` largest entries of ``h`` (same ``k`` rule,
  p = 90), zero the rest, multiply by ``exp(Σh / Σkept)``; score ``E(W·h' + b)``.
* ReAct (Sun, Guo & Li, NeurIPS 2021): ``h' = min(h, c)`` with ``c`` the 90th percentile of the
  reference activations (every entry of every reference ``h``); score ``E(W·h' + b)``.
* AdaSCALE (Regmi, 2025): SCALE with a per-image percentile ``p(x)`` chosen from how much the
  image's features move under a small input perturbation (:func:`adascale_percentile`); the
  scale is computed on ``relu(h)``: ``h' = h · exp(Σ relu(h) / Σ_{top-k(x)} relu(h))``.
"""

from __future__ import annotations

import torch

from .features import Head
from .logit import energy

SCALE_P = 85.0
ASH_P = 90.0
REACT_P = 90.0
ADASCALE_RANGE = (75.0, 85.0)  # [p_min, p_max] (OpenOOD's adascale_a default)
ADASCALE_K1 = 5.0  # % of D: the top features whose perturbed activation enters C_o
ADASCALE_K2 = 1.0  # % of D: the top features whose shift |h − h̃| enters Q
ADASCALE_LAMBDA = 10.0
ADASCALE_FRACTION = 0.05  # o: share of input elements perturbed (those with the smallest |∇|)
ADASCALE_STEP = 0.5  # perturbation step in normalized input units


def kept_count(dim: int, percentile: float | torch.Tensor) -> torch.Tensor | int:
    """``k = D − round(D·p/100)``, at least 1."""
    if isinstance(percentile, torch.Tensor):
        return (dim - torch.round(dim * percentile / 100.0)).long().clamp(min=1)
    return max(1, dim - int(round(dim * float(percentile) / 100.0)))


def topk_sum(h: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """``Σ`` of the ``k`` largest entries per row (``k`` a scalar or one per row)."""
    if isinstance(k, torch.Tensor):
        kmax = int(k.max())
        values = torch.topk(h, kmax, dim=1).values
        mask = torch.arange(kmax, device=h.device)[None, :] < k[:, None]
        return (values * mask).sum(dim=1)
    return torch.topk(h, int(k), dim=1).values.sum(dim=1)


def scale(h: torch.Tensor, head: Head, percentile: float = SCALE_P) -> torch.Tensor:
    """SCALE: ``E(W·(h·exp(Σh / Σ_{top-k} h)) + b)``."""
    h = h.float()
    r = h.sum(dim=1) / topk_sum(h, kept_count(h.shape[1], percentile))
    return energy(head.logits(h * torch.exp(r)[:, None]))


def ash_s(h: torch.Tensor, head: Head, percentile: float = ASH_P) -> torch.Tensor:
    """ASH-S: keep the top-k of ``h``, zero the rest, multiply by ``exp(Σh / Σkept)``; energy."""
    h = h.float()
    k = kept_count(h.shape[1], percentile)
    values, index = torch.topk(h, k, dim=1)
    pruned = torch.zeros_like(h).scatter_(1, index, values)
    r = h.sum(dim=1) / values.sum(dim=1)
    return energy(head.logits(pruned * torch.exp(r)[:, None]))


def react(h: torch.Tensor, head: Head, clip: float) -> torch.Tensor:
    """ReAct: ``E(W·min(h, c) + b)``."""
    return energy(head.logits(h.float().clamp(max=float(clip))))


# --------------------------------------------------------------------------- AdaSCALE
def adascale_perturb(x: torch.Tensor, grad: torch.Tensor, fraction: float = ADASCALE_FRACTION,
                     step: float = ADASCALE_STEP) -> torch.Tensor:
    """``x̃ = x − step · sign(g) · m``: ``m`` marks the ``fraction`` of each image's input elements with
    the smallest ``|g|``. ``g`` is ODIN's input gradient ``∂CE(f(x)/T, ŷ)/∂x`` (shared), so ``−sign(g)``
    raises the predicted class's tempered softmax — the reference code's ``+sign(∂z_ŷ/∂x)``
    direction up to the mean-logit term."""
    n = x.shape[0]
    flat = grad.reshape(n, -1).abs()
    count = max(1, int(flat.shape[1] * fraction))
    index = torch.topk(flat, count, dim=1, largest=False).indices
    mask = torch.zeros_like(flat).scatter_(1, index, 1.0).view_as(grad)
    sign = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
    return x.detach() - step * sign * mask.to(x.dtype)


def adascale_shift_statistic(h: torch.Tensor, h_perturbed: torch.Tensor, k1: float = ADASCALE_K1,
                             k2: float = ADASCALE_K2, lam: float = ADASCALE_LAMBDA) -> torch.Tensor:
    """``Q' = Σ_{i ∈ top-k1(h)} relu(h̃)_i + λ · Σ_{i ∈ top-k2(h)} |h − h̃|_i`` with ``k = max(1, ⌊D·k%/100⌋)``."""
    h, hp = h.float(), h_perturbed.float()
    d = h.shape[1]
    i1 = torch.topk(h, max(1, int(d * k1 / 100)), dim=1).indices
    i2 = torch.topk(h, max(1, int(d * k2 / 100)), dim=1).indices
    return torch.relu(hp).gather(1, i1).sum(dim=1) + lam * (h - hp).abs().gather(1, i2).sum(dim=1)


def adascale_percentile(q: torch.Tensor, reference_q: torch.Tensor,
                        p_range: tuple[float, float] = ADASCALE_RANGE) -> torch.Tensor:
    """``p(x) = p_min + (1 − F(Q'(x)))·(p_max − p_min)``, ``F`` the empirical CDF of the reference ``Q'``
    (``reference_q`` sorted): an image whose features move more than the reference's gets a lower
    percentile, i.e. more of its activations enter the scale."""
    ref = reference_q.to(q.device, torch.float32).contiguous()
    cdf = torch.searchsorted(ref, q.float().contiguous(), right=True).float() / max(1, ref.numel())
    lo, hi = p_range
    return lo + (1.0 - cdf) * (hi - lo)


def adascale(h: torch.Tensor, head: Head, percentile: torch.Tensor) -> torch.Tensor:
    """AdaSCALE-A: ``E(W·(h·exp(Σ relu(h) / Σ_{top-k(x)} relu(h))) + b)``, ``k(x) = D − round(D·p(x)/100)``."""
    h = h.float()
    x = torch.relu(h)
    r = x.sum(dim=1) / topk_sum(x, kept_count(h.shape[1], percentile))
    return energy(head.logits(h * torch.exp(r)[:, None]))
