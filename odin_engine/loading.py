"""Model specs → ``LoadedModel``: architecture, weights, normalization and a stable id.

Specs
-----
``cifar_resnet20|32|44|56``   built-in CIFAR ResNet (ImageNet mean/std, 32×32 input)
``torchvision:<name>``        any torchvision classifier; weights from a local state_dict
                              file, or ``"DEFAULT"`` for torchvision's published weights
``torchscript:<path>``        a TorchScript archive (runs TorchScript code: naming it is the opt-in)
``<python.module>:<factory>`` your own ``nn.Module`` factory (imports your code: naming it is the opt-in)

Checkpoints are always read with ``torch.load(weights_only=True)``. A file that needs
arbitrary pickled objects is refused unless ``unsafe_pickle=True`` (CLI ``--unsafe-pickle``).
"""

from __future__ import annotations

import hashlib
import importlib
import math
import operator
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .models.cifar_resnet import CifarResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
_CIFAR_SPEC = re.compile(r"^cifar_resnet(\d+)$")
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save: zip archive (PyTorch ≥ 1.6) or binary pickle
UNSAFE_PICKLE_FLAG = "--unsafe-pickle (Python: load_model(..., unsafe_pickle=True))"


@dataclass
class LoadedModel:
    """A classifier ready for scoring: eval mode, parameters frozen."""

    module: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    input_size: int
    model_id: str
    spec: str

    def check_class_names(self, names: Sequence[str] | str) -> list[str]:
        """``names`` (a list, or one comma-separated string) → the list, one non-empty name per class
        in the model's class order; ``ConfigError`` when the count differs from ``num_classes``."""
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
        if len(names) != self.num_classes:
            raise ConfigError(
                f"class_names has {len(names)} names but the model has {self.num_classes} classes "
                f"(CLI: --class-names): give one name per class, in the order of the model's outputs"
            )
        blank = [i for i, n in enumerate(names) if not n]
        if blank:
            raise ConfigError(f"class_names has empty names at positions {blank[:20]} (CLI: --class-names)")
        return names

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "model_id": self.model_id,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
            "input_size": self.input_size,
        }


def _triple(name: str, value: Sequence[float] | str | None) -> tuple[float, float, float] | None:
    """``mean``/``std`` → three floats in pixel units [0, 1] (``std`` > 0), or ``ConfigError`` saying what to fix."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be three numbers like 0.485,0.456,0.406 (CLI: --{name}); got {value!r}") from exc
    if len(out) != 3:
        raise ConfigError(f"{name} must have 3 values (R,G,B) (CLI: --{name}); got {len(out)}")
    shown = ",".join(f"{v:g}" for v in out)
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{name} must be finite numbers (CLI: --{name}); got {shown}")
    if name == "std" and any(v <= 0 for v in out):
        raise ConfigError(f"std values must be > 0 (CLI: --std): the input is divided by them; got {shown}")
    if any(v < 0 or v > 1 for v in out):
        hint = ""
        if all(0 <= v <= 255 for v in out):
            hint = (" These look like 0–255 units: divide by 255, i.e. "
                    + ",".join(f"{v / 255:.4g}" for v in out) + ".")
        raise ConfigError(
            f"{name} must be in [0, 1] pixel units (CLI: --{name}): the model sees pixels scaled to [0, 1] "
            f"before (x - mean) / std; got {shown}.{hint}"
        )
    return out  # type: ignore[return-value]


def _input_size(value: Any) -> int:
    """The square input side: an integer ≥ 1 (``0`` is refused, not mistaken for "not given")."""
    if isinstance(value, bool):
        size = 0
    elif isinstance(value, str):
        size = int(value) if value.strip().isdigit() else 0
    elif isinstance(value, float):
        size = int(value) if value.is_integer() else 0
    else:
        try:
            size = operator.index(value)
        except TypeError:
            size = 0
    if size < 1:
        raise ConfigError(f"input_size must be an integer >= 1 (CLI: --input-size), the model's square input side "
                          f"in pixels (e.g. 32 for CIFAR models, 224 for ImageNet ones); got {value!r}")
    return size


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted (name, dtype, shape, bytes): stable for weights built in memory."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_checkpoint_bytes(path: Path) -> None:
    """Refuse a file that is neither a zip archive (``torch.save``'s format since PyTorch 1.6) nor a
    binary pickle (the legacy format), naming what it looks like instead."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(_CHECKPOINT_MAGIC):
        return
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes), not a PyTorch checkpoint")
    text = head.lstrip().lower()
    if text.startswith(b"<"):
        what = "an HTML/XML page: did a download save an error or sign-in page instead of the weights?"
    elif text.startswith(b"version https://git-lfs"):
        what = "a Git LFS pointer: fetch the real file (git lfs pull)"
    elif len(head) > 9 and head[8:10] == b'{"':
        what = "a safetensors file: load it with safetensors and torch.save(state_dict) it"
    else:
        what = "expected a zip archive (PK…) or a pickle (\\x80…) written by torch.save"
    shown = head[:24].decode("utf-8", "backslashreplace")
    raise CheckpointError(f"{path} is not a PyTorch checkpoint (starts with {shown!r}): {what}")


def read_checkpoint(path: str | Path, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state_dict with ``weights_only=True``; strip ``module.`` prefixes.

    Accepts a bare state_dict or a dict holding one under ``state_dict`` / ``model_state_dict``
    / ``model`` / ``net``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    _check_checkpoint_bytes(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not unsafe_pickle:
            raise CheckpointError(
                f"{path} needs arbitrary pickled objects to load, which can execute code. "
                f"Re-save it as a plain state_dict, or if you trust the file pass {UNSAFE_PICKLE_FLAG}. "
                f"(torch said: {str(exc).splitlines()[0]})"
            ) from exc
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (a mapping of tensor names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def apply_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``; only ``num_batches_tracked`` buffers may be missing."""
    own = module.state_dict()
    shape_mismatch = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if shape_mismatch or missing or unexpected:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape_mismatch)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", … ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"{title} keys: {shown}")
        raise CheckpointError(f"weights {source} do not fit the architecture; " + "; ".join(parts))
    module.load_state_dict(state, strict=False)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _infer_num_classes(module: nn.Module, input_size: int) -> int:
    with torch.inference_mode():
        out = module(torch.zeros(1, 3, input_size, input_size))
    if out.ndim != 2:
        raise ConfigError(f"the model must return N×C logits; it returned shape {tuple(out.shape)}")
    return int(out.shape[1])


def _build(spec: str, weights: str | Path | None, unsafe_pickle: bool, options: dict[str, Any]):
    """Returns (module, default mean, default std, default input size, weights digest)."""
    m = _CIFAR_SPEC.match(spec)
    if m:
        module = CifarResNet(depth=int(m.group(1)), num_classes=int(options.pop("num_classes", 10)))
        if weights is None:
            raise ConfigError(f"{spec} needs --weights: a checkpoint file such as resnet20-12fca82f.th")
        apply_state_dict(module, read_checkpoint(weights, unsafe_pickle), str(weights))
        return module, IMAGENET_MEAN, IMAGENET_STD, 32, sha256_file(weights)

    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ConfigError(f"unknown torchvision classifier {name!r}; see torchvision.models.list_models()")
        if weights == "DEFAULT":
            w = torchvision.models.get_model_weights(name).DEFAULT
            module = torchvision.models.get_model(name, weights=w)
            size = int(getattr(w.transforms(), "crop_size", [224])[0])
            return module, IMAGENET_MEAN, IMAGENET_STD, size, f"torchvision-{w}"
        module = torchvision.models.get_model(name, weights=None, **options.pop("model_kwargs", {}))
        if weights is None:
            raise ConfigError(f"{spec} needs --weights: a local state_dict file, or DEFAULT to download")
        apply_state_dict(module, read_checkpoint(weights, unsafe_pickle), str(weights))
        return module, IMAGENET_MEAN, IMAGENET_STD, 224, sha256_file(weights)

    if spec.startswith("torchscript:"):
        path = Path(spec.split(":", 1)[1])
        if not path.is_file():
            raise ConfigError(f"TorchScript file not found: {path}")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise ConfigError(f"{path} is not a TorchScript archive: {exc}") from exc
        return module, None, None, None, sha256_file(path)

    if ":" in spec:
        mod_name, factory_name = spec.rsplit(":", 1)
        try:
            factory = getattr(importlib.import_module(mod_name), factory_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import model factory {spec!r}: {exc}") from exc
        module = factory(**options.pop("factory_kwargs", {}))
        if not isinstance(module, nn.Module):
            raise ConfigError(f"factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
        if weights is not None:
            apply_state_dict(module, read_checkpoint(weights, unsafe_pickle), str(weights))
            digest = sha256_file(weights)
        else:
            digest = state_dict_digest(module.state_dict())
        return (module, getattr(module, "mean", None), getattr(module, "std", None),
                getattr(module, "input_size", None), digest)

    raise ConfigError(
        f"unknown model spec {spec!r}; use cifar_resnet20|32|44|56, torchvision:<name>, "
        "torchscript:<path> or <python.module>:<factory>"
    )


def load_model(
    spec: str,
    weights: str | Path | None = None,
    *,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    input_size: int | None = None,
    unsafe_pickle: bool = False,
    **options: Any,
) -> LoadedModel:
    """Build the model named by ``spec``, load ``weights``, freeze it, and attach its normalization.

    ``mean``/``std`` override the spec's defaults; a model with no known normalization
    (TorchScript, factories without ``.mean``/``.std``) must be given both.
    """
    module, d_mean, d_std, d_size, digest = _build(spec, weights, unsafe_pickle, dict(options))
    mean_t = _triple("mean", mean) or _triple("mean", d_mean)
    std_t = _triple("std", std) or _triple("std", d_std)
    if mean_t is None or std_t is None:
        raise ConfigError(
            f"model {spec!r} has no known input normalization: pass mean and std "
            "(CLI: --mean r,g,b --std r,g,b, in [0,1] pixel units)"
        )
    if input_size is None and d_size is None:
        raise ConfigError(f"model {spec!r} has no known input size: pass input_size (CLI: --input-size N)")
    size = _input_size(input_size if input_size is not None else d_size)
    module = _freeze(module)
    arch = spec if not spec.startswith("torchscript:") else "torchscript"
    return LoadedModel(
        module=module,
        mean=mean_t,
        std=std_t,
        num_classes=_infer_num_classes(module, size),
        input_size=size,
        model_id=f"{arch}@sha256:{digest[:16]}",
        spec=spec,
    )
