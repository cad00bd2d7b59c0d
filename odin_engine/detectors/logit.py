"""Scores from the logits ``z`` alone (one forward; no features, no fitting).

Higher = more in-distribution for every function here.
"""

from __future__ import annotations

import torch

GEN_GAMMA = 0.1
GEN_TOP = 100


def energy(logits: torch.Tensor) -> torch.Tensor:
    """``E(z) = logsumexp(z)`` (the negative free energy at T = 1, Liu et al. 2020)."""
    return torch.logsumexp(logits.float(), dim=1)


def gen(logits: torch.Tensor, gamma: float = GEN_GAMMA, top: int = GEN_TOP) -> torch.Tensor:
    """GEN (Liu, Lochman & Zach, CVPR 2023): ``−Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ``.

    ``p = softmax(z)``, the sum over the ``M = min(top, C)`` largest probabilities, ``γ = 0.1``.
    In float64: ``(1 − p)^γ`` of a confident image (p → 1) is lost to rounding in float32.
    """
    p = torch.softmax(logits.double(), dim=1)
    m = min(int(top), p.shape[1])
    top_p = torch.topk(p, m, dim=1).values
    return -(top_p.pow(gamma) * (1.0 - top_p).pow(gamma)).sum(dim=1).float()
