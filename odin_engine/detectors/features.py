"""Penultimate features ``h`` without touching the model: a forward pre-hook on the classifier head.

The head is the model's final ``nn.Linear`` — the last one its forward *calls* (found by one
forward on a blank input with a hook on every ``nn.Linear``), or the module named by
``--head MODULE_NAME``. Its input is ``h`` (CIFAR ResNets: the pooled 64-vector; torchvision
ResNets/ConvNeXt: the pooled vector; ViT/Swin: the CLS token / pooled token into ``heads``), and
its weights ``W`` (C×D) and bias ``b`` give the logits ``z = W·h + b``.

The head is checked once: its output must be the model's output (so nothing rescales the logits
after it). TorchScript archives cannot be hooked; a model without such a head raises
:class:`~odin_engine.errors.ConfigError` (exit 2) when a feature method needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from odin_engine.errors import ConfigError

HEAD_FLAG = "--head MODULE_NAME"


@dataclass(frozen=True)
class Head:
    """The classifier head: its qualified module name, weights ``W`` (C×D) and bias ``b`` (C)."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``z = W·h + b`` in float32."""
        return torch.addmm(self.bias.float(), h.float(), self.weight.float().t())

    def to(self, device) -> "Head":
        return Head(self.name, self.weight.to(device), self.bias.to(device))


def _called_linears(module: nn.Module, input_size: int) -> list[tuple[str, nn.Linear, torch.Tensor]]:
    """(name, module, output) of every ``nn.Linear`` in call order, on one blank input."""
    calls: list[tuple[str, nn.Linear, torch.Tensor]] = []
    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            handles.append(sub.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, m, out.detach()))))
    try:
        with torch.inference_mode():
            out = module(torch.zeros(1, 3, input_size, input_size, device=_device_of(module)))
    finally:
        for h in handles:
            h.remove()
    calls.append(("", None, out))  # type: ignore[arg-type]  # the model's own output, last
    return calls


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def find_head(module: nn.Module, input_size: int, name: str | None = None) -> Head:
    """The classifier head of ``module`` (see the module docstring); ``ConfigError`` when there is none."""
    if isinstance(module, torch.jit.ScriptModule):
        raise ConfigError(
            "a TorchScript archive cannot be hooked, so its penultimate features are not available to the "
            "feature methods (scale, ash_s, react, knn, vim, nci, fdbd, adascale, and `fit`); load the model "
            "as a Python factory (module:function) instead, or use msp, max_logit, energy, gen or odin")
    if name is not None:
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            raise ConfigError(f"{HEAD_FLAG}: the model has no module {name!r}; its nn.Linear modules are "
                              f"{linears[-10:]}") from None
        if not isinstance(sub, nn.Linear):
            raise ConfigError(f"{HEAD_FLAG}: {name!r} is a {type(sub).__name__}, not an nn.Linear")
    calls = _called_linears(module, input_size)
    output = calls.pop()[2]
    if not calls:
        raise ConfigError(
            "the model's forward calls no nn.Linear, so it has no classifier head to take penultimate features "
            "from; the feature methods (scale, ash_s, react, knn, vim, nci, fdbd, adascale) and `fit` need one. "
            "Use msp, max_logit, energy, gen or odin with this model")
    if name is None:
        name, sub, last = calls[-1]
    else:
        found = [c for c in calls if c[0] == name]
        if not found:
            raise ConfigError(f"{HEAD_FLAG}: the model's forward never calls {name!r}")
        last = found[-1][2]
    if tuple(last.shape) != tuple(output.shape) or not torch.allclose(last.float(), output.float(), atol=1e-5):
        raise ConfigError(
            f"the output of {name!r} (the last nn.Linear the forward calls) is not the model's output, so its input "
            f"is not the penultimate feature the feature methods need; name the classifier head with {HEAD_FLAG}")
    bias = sub.bias if sub.bias is not None else torch.zeros(sub.out_features, device=sub.weight.device)
    return Head(name, sub.weight.detach(), bias.detach())


class FeatureTap:
    """Captures the head's input ``h`` (detached, float32) on every forward while installed.

    ``with FeatureTap(module, head.name) as tap: logits = module(x); h = tap.h``
    """

    def __init__(self, module: nn.Module, head_name: str):
        self.sub = module.get_submodule(head_name)
        self.h: torch.Tensor | None = None
        self._handle = None

    def _grab(self, mod, args):
        self.h = args[0].detach().float()

    def __enter__(self) -> "FeatureTap":
        self._handle = self.sub.register_forward_pre_hook(self._grab)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self) -> torch.Tensor | None:
        h, self.h = self.h, None
        return h
