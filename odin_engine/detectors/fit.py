"""The fitted statistics of the reference (in-distribution) set: one typed object, one file.

:class:`FitAccumulator` streams over reference batches of penultimate features ``h`` and keeps,
in memory that does not grow with the reference set:

* ``n``, ``Σh`` (→ the mean μ for NCI/fDBD) and ``Σ (h − u)(h − u)ᵀ`` (→ ViM's principal subspace),
  exact, in float64;
* a **bank** of at most ``bank_size`` features drawn uniformly without replacement (reservoir
  sampling, Vitter's algorithm R), each with its AdaSCALE statistic ``Q'``. Partial accumulators
  (one per worker) merge into a uniform sample of the union (:meth:`FitAccumulator.merge`: the
  count taken from each side is hypergeometric).

:meth:`FitAccumulator.finish` → :class:`FitStats`: the mean, ViM's origin/residual basis/α, ReAct's
clip (percentiles of the bank's activations; p = 90 by default), the L2-normalized KNN bank and AdaSCALE's
sorted reference ``Q'``. α, the clip and ``Q'`` come from the bank: exact when the reference fits
in it, a uniform-sample estimate otherwise. Saved as one ``.npz`` (arrays + a JSON header that
binds it to the model id, head and settings it was fitted with).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from odin_engine.errors import ConfigError

FIT_VERSION = 1
DEFAULT_BANK_SIZE = 50_000
VIM_DIM_FRACTION = 0.5
QUANTILE_GRID = np.linspace(0.0, 100.0, 201)


@dataclass
class FitStats:
    """What the fitted methods (react, knn, vim, nci, fdbd, adascale) need, bound to one model."""

    model_id: str
    head: str
    temperature: float  # AdaSCALE's perturbation shares ODIN's gradient at this T
    n_reference: int
    mean: np.ndarray  # D: μ
    vim_origin: np.ndarray  # D: u = −pinv(W)·b
    vim_residual: np.ndarray  # D×(D−dim): R
    vim_alpha: float
    activation_quantiles: np.ndarray  # 201: percentiles 0, 0.5, …, 100 of the bank's activations (ReAct)
    bank: np.ndarray  # M×D, L2-normalized rows (KNN)
    adascale_q: np.ndarray  # M, sorted reference Q'
    sources: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def react_clip(self, percentile: float = 90.0) -> float:
        """ReAct's ``c``: the ``percentile``-th percentile of the reference activations."""
        return float(np.interp(percentile, QUANTILE_GRID, self.activation_quantiles))

    def header(self) -> dict[str, Any]:
        return {"version": FIT_VERSION, "model_id": self.model_id, "head": self.head,
                "temperature": self.temperature, "n_reference": self.n_reference, "dim": self.dim,
                "bank_rows": int(self.bank.shape[0]), "vim_alpha": self.vim_alpha,
                "vim_dim": int(self.dim - self.vim_residual.shape[1]), "react_clip_p90": self.react_clip(90.0),
                "sources": self.sources}

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, header=np.frombuffer(json.dumps(self.header()).encode(), np.uint8), mean=self.mean,
                 vim_origin=self.vim_origin, vim_residual=self.vim_residual, bank=self.bank,
                 adascale_q=self.adascale_q, activation_quantiles=self.activation_quantiles)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "fit") -> "FitStats":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                head = json.loads(bytes(z["header"]).decode())
                arrays = {k: z[k] for k in ("mean", "vim_origin", "vim_residual", "bank", "adascale_q",
                                                "activation_quantiles")}
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{source} is not a fit written by `odin-audit fit` ({exc})") from exc
        if head.get("version") != FIT_VERSION:
            raise ConfigError(f"{source}: fit version {head.get('version')} is not supported (expected {FIT_VERSION}); "
                              "rerun `odin-audit fit`")
        return cls(model_id=head["model_id"], head=head["head"], temperature=float(head["temperature"]),
                   n_reference=int(head["n_reference"]), vim_alpha=float(head["vim_alpha"]),
                   sources=head.get("sources", {}), **arrays)

    def same_temperature(self, temperature: float) -> bool:
        """AdaSCALE's reference ``Q'`` was measured with ODIN's gradient at the fit's T: only a scorer at
        that T computes ``adascale`` (the other fitted methods do not depend on T)."""
        return bool(np.isclose(self.temperature, temperature, rtol=1e-9, atol=0.0))

    def check_model(self, model_id: str, head: str, temperature: float | None = None, source: str = "--fit") -> None:
        """Refuse a fit of another model or head — or, when ``temperature`` is given, of another T
        (exit 2, saying what to rerun)."""
        diffs = []
        if self.model_id != model_id:
            diffs.append(f"model {self.model_id} vs {model_id}")
        if self.head != head:
            diffs.append(f"head {self.head!r} vs {head!r}")
        if temperature is not None and not self.same_temperature(temperature):
            diffs.append(f"temperature {self.temperature:g} vs {temperature:g} (adascale)")
        if diffs:
            raise ConfigError(f"{source} was fitted for another model or settings ({'; '.join(diffs)}): "
                              "rerun `odin-audit fit` with this --model/--weights/--head/--temperature")


def load_fit(path: str) -> FitStats:
    """Read a fit file (local path or bucket URI)."""
    from odin_engine.io.store import read_bytes

    try:
        data = read_bytes(str(path))
    except (OSError, FileNotFoundError) as exc:
        raise ConfigError(f"--fit {path}: cannot read it ({exc}); write one with `odin-audit fit`") from exc
    return FitStats.from_bytes(data, f"--fit {path}")


class FitAccumulator:
    """Streaming reference statistics (see the module docstring). Bounded memory: ``bank_size × D``."""

    def __init__(self, dim: int, origin: np.ndarray, bank_size: int = DEFAULT_BANK_SIZE, seed: int = 0):
        if bank_size < 1:
            raise ConfigError(f"--bank-size must be >= 1; got {bank_size}")
        self.dim, self.bank_size = int(dim), int(bank_size)
        self.origin = np.asarray(origin, np.float64)
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)
        self.bank = np.zeros((0, dim), np.float32)
        self.q = np.zeros(0, np.float32)
        self.rng = np.random.default_rng(seed)

    def update(self, h: np.ndarray, q: np.ndarray) -> None:
        h = np.asarray(h, np.float32)
        q = np.asarray(q, np.float32)
        h64 = h.astype(np.float64)
        self.sum += h64.sum(axis=0)
        c = h64 - self.origin
        self.scatter += c.T @ c
        # reservoir (algorithm R): item t (0-based) fills slot t while the bank is not full, else
        # replaces slot j ~ U{0..t} when j < bank_size; later items of the batch win, as in sequence
        t = self.n + np.arange(len(h))
        fill = t < self.bank_size
        if fill.any():
            self.bank = np.concatenate([self.bank, h[fill]])
            self.q = np.concatenate([self.q, q[fill]])
        rest = np.flatnonzero(~fill)
        if rest.size:
            j = (self.rng.random(rest.size) * (t[rest] + 1)).astype(np.int64)
            hit = j < self.bank_size
            self.bank[j[hit]] = h[rest[hit]]
            self.q[j[hit]] = q[rest[hit]]
        self.n += len(h)

    def merge(self, other: "FitAccumulator") -> "FitAccumulator":
        """Fold ``other`` in; the bank stays a uniform sample of everything seen by both."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.sum, self.scatter, self.bank, self.q = other.n, other.sum, other.scatter, other.bank, other.q
            return self
        size = min(self.bank_size, self.n + other.n)
        take_self = int(self.rng.hypergeometric(self.n, other.n, size))
        take_self = min(max(take_self, size - len(other.bank)), len(self.bank))
        a = self.rng.choice(len(self.bank), take_self, replace=False)
        b = self.rng.choice(len(other.bank), size - take_self, replace=False)
        self.bank = np.concatenate([self.bank[a], other.bank[b]])
        self.q = np.concatenate([self.q[a], other.q[b]])
        self.n += other.n
        self.sum += other.sum
        self.scatter += other.scatter
        return self

    def finish(self, *, model_id: str, head: str, temperature: float, weight: np.ndarray, bias: np.ndarray,
               vim_dim: int | None = None, sources: dict | None = None) -> FitStats:
        if self.n == 0:
            raise ConfigError("the reference set has no usable images; `fit` needs in-distribution images")
        d = self.dim
        k = int(vim_dim) if vim_dim is not None else max(1, int(round(d * VIM_DIM_FRACTION)))
        if not 0 < k < d:
            raise ConfigError(f"the ViM principal dimension must be in 1..{d - 1}; got {k}")
        cov = self.scatter / self.n
        eigval, eigvec = np.linalg.eigh(cov)  # ascending
        residual = eigvec[:, np.argsort(eigval)[::-1][k:]]  # the D − k smallest directions
        bank64 = self.bank.astype(np.float64)
        logits = bank64 @ np.asarray(weight, np.float64).T + np.asarray(bias, np.float64)
        vnorm = np.linalg.norm((bank64 - self.origin) @ residual, axis=1)
        alpha = float(logits.max(axis=1).mean() / max(vnorm.mean(), 1e-12))
        norms = np.linalg.norm(bank64, axis=1, keepdims=True)
        return FitStats(
            model_id=model_id, head=head, temperature=float(temperature), n_reference=int(self.n),
            mean=(self.sum / self.n).astype(np.float32), vim_origin=self.origin.astype(np.float32),
            vim_residual=residual.astype(np.float32), vim_alpha=alpha,
            activation_quantiles=np.percentile(self.bank, QUANTILE_GRID).astype(np.float64),
            bank=(bank64 / np.maximum(norms, 1e-12)).astype(np.float32),
            adascale_q=np.sort(self.q).astype(np.float32), sources=dict(sources or {}))


def vim_origin(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """ViM's origin ``u = −pinv(W)·b``."""
    return -np.linalg.pinv(np.asarray(weight, np.float64)) @ np.asarray(bias, np.float64)


def describe(stats: FitStats) -> dict[str, Any]:
    out = stats.header()
    out.pop("version")
    return out


