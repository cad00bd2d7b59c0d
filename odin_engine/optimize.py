"""Exact-in-real-arithmetic rewrites that make the eval-mode model cheaper to run.

* Conv→BatchNorm folding (``torch.fx.experimental.optimization.fuse``): in eval mode
  ``BN(conv(x)) = conv'(x)`` with ``w' = w·γ/√(σ²+ε_bn)`` and ``b' = β − μ·γ/√(σ²+ε_bn)``.
  It removes a pass over every activation in the forward *and* the input-gradient backward.
* channels-last memory format on CPU, where oneDNN convolutions prefer it.

Models that torch.fx cannot trace (data-dependent control flow, TorchScript) run unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Return an eval-mode copy with Conv/BN pairs folded, or ``module`` itself if it cannot be traced."""
    if isinstance(module, torch.jit.ScriptModule):
        return module
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(module.eval(), inplace=False)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "leave it alone"
        log.info("BatchNorm folding skipped (%s: %s)", type(exc).__name__, exc)
        return module
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused.eval()


def optimize_for_inference(module: nn.Module, device: torch.device) -> nn.Module:
    """BN folding everywhere; channels-last weights on CPU."""
    module = fold_batchnorm(module)
    if device.type == "cpu" and not isinstance(module, torch.jit.ScriptModule):
        module = module.to(memory_format=torch.channels_last)
    return module
