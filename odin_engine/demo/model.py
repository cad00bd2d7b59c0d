"""The built-in demo's classifier: a small CNN for 32×32 RGB, trained in seconds on scikit-learn's digits.

Use it as the model spec ``odin_engine.demo.model:build`` with the weights file that
:func:`train` (or :func:`cached_weights`) writes — a plain ``state_dict``, so it loads with
``torch.load(weights_only=True)`` like any checkpoint. The module carries its own
normalization (``mean``, ``std``: pixels in [0, 1] map to [−1, 1]) and ``input_size`` (32),
which ``odin_engine.load_model`` picks up.

Training is seeded and runs on one CPU thread, so it is deterministic for a given PyTorch build
and CPU; the cache key is a hash of the whole recipe (architecture, data split, optimizer,
epochs, seed, threads, PyTorch version).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from odin_engine.demo import data as demo_data

ARCH_VERSION = 2
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
INPUT_SIZE = 32


class DemoCNN(nn.Module):
    """Three conv–BN–ReLU–max-pool stages (16, 32, 32 channels) and a linear head on the 4×4 map.

    The head sees *where* features are (no global average pooling): a digits model with
    global pooling ranks photo crops as more in-distribution than digits (measured with
    ``tests/test_demo.py``'s recipe), while this one separates them.
    """

    mean = MEAN
    std = STD
    input_size = INPUT_SIZE

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *stage(3, 16), nn.MaxPool2d(2),   # 16×16
            *stage(16, 32), nn.MaxPool2d(2),  # 8×8
            *stage(32, 32), nn.MaxPool2d(2),  # 4×4
            nn.Flatten(),
        )
        self.head = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(num_classes: int = 10) -> DemoCNN:
    """Factory for the spec ``odin_engine.demo.model:build`` (untrained; pass ``--weights``)."""
    return DemoCNN(num_classes)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights (and so the cache key)."""

    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 5e-4
    max_shift: int = 0  # random translation augmentation, pixels (0: none; with 2, photo crops were
                        # flagged less often and less consistently across seeds)
    torch_threads: int = 1  # part of the recipe: float sums (so the weights) depend on the thread count
    split_seed: int = demo_data.SPLIT_SEED
    train_size: int = demo_data.TRAIN_SIZE
    arch_version: int = ARCH_VERSION

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "torch": torch.__version__.split("+")[0]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_input(images_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift <= 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dy, dx = (int(v) for v in torch.randint(0, 2 * max_shift + 1, (2,), generator=gen))
    h, w = x.shape[-2:]
    return pad[..., dy : dy + h, dx : dx + w]


def train(recipe: Recipe = Recipe(), log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """Train :class:`DemoCNN` on the training split of the digits. Returns (state_dict, info).

    ``info`` has the recipe, its key, the wall time and the accuracy on the digits kept out of
    training (the in-distribution images the demo audits).
    """
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.torch_threads)  # tiny convolutions: 1 thread is as fast, and faster on a busy box
    try:
        return _train(recipe, log, t0)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, log, t0: float) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    images, targets = demo_data.digits_rgb()
    train_idx, unseen_idx = demo_data.digit_split(recipe.split_seed)
    train_idx = train_idx[: recipe.train_size]
    x_train, y_train = _to_input(images[train_idx]), torch.from_numpy(targets[train_idx])
    model = DemoCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * -(-len(train_idx) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(train_idx), generator=gen)
        total = 0.0
        for start in range(0, len(order), recipe.batch_size):
            b = order[start : start + recipe.batch_size]
            loss = F.cross_entropy(model(_shift(x_train[b], recipe.max_shift, gen)), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if log:
            log(f"[demo] training epoch {epoch + 1}/{recipe.epochs}: loss {total / len(order):.4f}")
    model.eval()
    with torch.inference_mode():
        pred = model(_to_input(images[unseen_idx])).argmax(1).numpy()
    acc = float(np.mean(pred == targets[unseen_idx]))
    info = {
        "recipe": asdict(recipe),
        "key": recipe.key(),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "unseen_accuracy": acc,
        "n_train": int(len(train_idx)),
        "n_unseen": int(len(unseen_idx)),
        "torch": torch.__version__,
    }
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, info


def default_cache_dir() -> Path:
    """``$ODIN_AUDIT_CACHE`` if set, else ``$XDG_CACHE_HOME/odin-audit``, else ``~/.cache/odin-audit``."""
    if os.environ.get("ODIN_AUDIT_CACHE"):
        return Path(os.environ["ODIN_AUDIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "odin-audit"


def cached_weights(
    recipe: Recipe = Recipe(), cache_dir: str | Path | None = None, *, retrain: bool = False, log=print
) -> tuple[Path, dict]:
    """Path of the trained weights for ``recipe``, training them first if not cached.

    Files: ``<cache>/demo-model-<key>.pt`` (a plain state_dict) and ``…-<key>.json`` (info,
    with ``"cached": true`` when read back). Written atomically, so concurrent runs are safe.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = recipe.key()
    weights, meta = cache / f"demo-model-{key}.pt", cache / f"demo-model-{key}.json"
    if not retrain and weights.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        info["cached"] = True
        return weights, info
    cache.mkdir(parents=True, exist_ok=True)
    state, info = train(recipe, log=log)
    pid = os.getpid()
    tmp_w, tmp_m = weights.with_suffix(f".pt.{pid}.tmp"), meta.with_suffix(f".json.{pid}.tmp")
    torch.save(state, tmp_w)
    tmp_m.write_text(json.dumps(info, indent=2))
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta)
    info["cached"] = False
    return weights, info
