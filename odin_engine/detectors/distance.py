"""Feature-distance scores: the penultimate ``h`` against statistics of the reference set.

With ``W``, ``b`` the head (``w_c`` its rows), ``z = W·h + b``, ``ŷ = argmax z`` and ``μ`` the
reference mean of ``h``:

* KNN (Sun et al., ICML 2022): ``−‖ĥ − b̂_(k)‖``, the distance from the L2-normalized ``ĥ`` to its
  k-th nearest L2-normalized reference feature (k = 50).
* ViM (Wang et al., CVPR 2022): origin ``u = −pinv(W)·b``; ``R`` spans the residual of the principal
  subspace (dimension D/2 by default) of the reference ``h − u``; ``α = mean max-logit / mean
  ‖Rᵀ(h − u)‖`` on the reference; score ``logsumexp(z) − α·‖Rᵀ(h − u)‖``.
* NCI (Liu & Qin, 2023): ``w_ŷ·(h − μ) / ‖h − μ‖ + α·‖h‖₁`` with α = 1e-4.
* fDBD (Liu & Qin, ICML 2024): ``(1/(C−1)) Σ_{c≠ŷ} (z_ŷ − z_c) / ‖w_ŷ − w_c‖`` divided by ``‖h − μ‖``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .features import Head
from .logit import energy

KNN_K = 50
NCI_ALPHA = 1e-4


def knn(h: torch.Tensor, bank: torch.Tensor, k: int = KNN_K) -> torch.Tensor:
    """``−‖ĥ − b̂_(k)‖``; ``bank`` holds L2-normalized reference features (M×D). Uses
    ``‖a − b‖² = 2 − 2·a·b`` for unit vectors: the k-th nearest is the k-th largest similarity."""
    q = F.normalize(h.float(), dim=1)
    k = min(int(k), bank.shape[0])
    sims = q @ bank.to(q.device, torch.float32).t()
    kth = torch.topk(sims, k, dim=1).values[:, -1]
    return -torch.sqrt((2.0 - 2.0 * kth).clamp(min=0.0))


def vim(h: torch.Tensor, logits: torch.Tensor, origin: torch.Tensor, residual: torch.Tensor,
        alpha: float) -> torch.Tensor:
    """``logsumexp(z) − α·‖Rᵀ(h − u)‖``; ``residual`` is R (D×(D−dim)), ``origin`` is u."""
    r = (h.float() - origin.to(h.device, torch.float32)) @ residual.to(h.device, torch.float32)
    return energy(logits) - float(alpha) * r.norm(dim=1)


def nci(h: torch.Tensor, logits: torch.Tensor, head: Head, mean: torch.Tensor,
        alpha: float = NCI_ALPHA) -> torch.Tensor:
    """``w_ŷ·(h − μ)/‖h − μ‖ + α·‖h‖₁``."""
    h = h.float()
    centred = h - mean.to(h.device, torch.float32)
    w = head.weight.float()[logits.argmax(dim=1)]
    return (w * centred).sum(dim=1) / centred.norm(dim=1) + alpha * h.abs().sum(dim=1)


def fdbd(h: torch.Tensor, logits: torch.Tensor, head: Head, mean: torch.Tensor) -> torch.Tensor:
    """``mean_{c≠ŷ} (z_ŷ − z_c)/‖w_ŷ − w_c‖ / ‖h − μ‖``."""
    z = logits.float()
    w = head.weight.float()
    pred = z.argmax(dim=1)
    gap = z.gather(1, pred[:, None]) - z  # N×C, 0 at ŷ
    dist = torch.cdist(w[pred], w)  # N×C: ‖w_ŷ − w_c‖, 0 at ŷ
    ratio = torch.where(dist > 0, gap / dist.clamp(min=1e-12), torch.zeros_like(gap))
    c = z.shape[1]
    return ratio.sum(dim=1) / max(1, c - 1) / (h.float() - mean.to(h.device, torch.float32)).norm(dim=1)
