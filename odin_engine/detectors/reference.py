"""Fitting on reference images: the scoring pass (with AdaSCALE's perturbed forward) → a
:class:`~odin_engine.detectors.fit.FitAccumulator`. The distributed fit job (``jobs/fit.py``)
runs :func:`accumulate` per worker and merges the partial accumulators."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .fit import DEFAULT_BANK_SIZE, FitAccumulator, FitStats, vim_origin

if TYPE_CHECKING:
    from odin_engine.scorer import OdinScorer


def fit_scorer(model, *, temperature: float, head: str | None = None, device=None, batch_size: int = 256) -> "OdinScorer":
    """A scorer that yields what fitting reads: ``h`` and AdaSCALE's ``h̃`` (ODIN's ε is not needed)."""
    from odin_engine.scorer import OdinScorer

    return OdinScorer(model, temperature=temperature, epsilon=0.0, device=device, batch_size=batch_size,
                      head=head, methods=["scale"])  # a feature method: no head → ConfigError


def new_accumulator(scorer: "OdinScorer", bank_size: int = DEFAULT_BANK_SIZE, seed: int = 0) -> FitAccumulator:
    w, b = scorer.head.weight.cpu().numpy(), scorer.head.bias.cpu().numpy()
    return FitAccumulator(scorer.head.dim, vim_origin(w, b), bank_size, seed)


def accumulate(scorer: "OdinScorer", images, acc: FitAccumulator) -> int:
    """Fold the reference ``images`` (uint8 N×H×W×3) into ``acc``; returns how many."""
    from odin_engine.detectors.passes import run_pass
    from odin_engine.detectors.shaping import adascale_shift_statistic

    n = 0
    for x in scorer.batches(images):
        p = run_pass(scorer.module, x, scorer.std.flatten(), temperature=scorer.temperature, epsilon=0.0,
                     head=scorer.head, adascale=True, autocast_dtype=scorer.autocast_dtype)
        q = adascale_shift_statistic(p.h, p.h_perturbed)
        acc.update(p.h.cpu().numpy(), q.cpu().numpy())
        n += len(x)
    return n


def finish(acc: FitAccumulator, scorer: "OdinScorer", model_id: str, sources: dict | None = None,
           vim_dim: int | None = None) -> FitStats:
    return acc.finish(model_id=model_id, head=scorer.head.name, temperature=scorer.temperature,
                      weight=scorer.head.weight.cpu().numpy(), bias=scorer.head.bias.cpu().numpy(),
                      vim_dim=vim_dim, sources=sources)


def fit_images(model, images, *, temperature: float, head: str | None = None, bank_size: int = DEFAULT_BANK_SIZE,
               device=None, batch_size: int = 256, seed: int = 0, sources: dict | None = None) -> FitStats:
    """In-process fit on an in-memory reference array (tests, notebooks, the benchmark)."""
    scorer = fit_scorer(model, temperature=temperature, head=head, device=device, batch_size=batch_size)
    acc = new_accumulator(scorer, bank_size, seed)
    accumulate(scorer, np.asarray(images), acc)
    return finish(acc, scorer, model.model_id, sources)


def fit_uris(uris, *, spec: str, weights, mean, std, input_size: int, temperature: float, head: str | None,
             model_id: str, bank_size: int, seed: int, resize: str = "crop", batch_size: int = 256,
             unsafe_pickle: bool = False, device=None) -> tuple[FitAccumulator, list[dict[str, str]]]:
    """One worker's share of a fit: read and decode ``uris`` batch by batch (memory: one batch of
    images plus the bank) and fold them into a fresh accumulator. Undecodable files are skipped and
    returned as ``[{"uri", "error"}]``."""
    from odin_engine.errors import ConfigError
    from odin_engine.io.images import ImageDecodeError, decode_image
    from odin_engine.io.store import read_bytes
    from odin_engine.loading import load_model

    model = load_model(spec, weights, mean=mean, std=std, input_size=input_size, unsafe_pickle=unsafe_pickle)
    if model.model_id != model_id:
        raise ConfigError(f"the weights this worker loaded ({model.model_id}) differ from the driver's ({model_id})")
    scorer = fit_scorer(model, temperature=temperature, head=head, device=device, batch_size=batch_size)
    acc = new_accumulator(scorer, bank_size, seed)
    errors: list[dict[str, str]] = []
    for start in range(0, len(uris), batch_size):
        images = []
        for uri in uris[start:start + batch_size]:
            try:
                images.append(decode_image(read_bytes(uri), model.input_size, resize)[0])
            except (ImageDecodeError, OSError) as exc:
                errors.append({"uri": str(uri), "error": str(exc)[:300]})
        if images:
            accumulate(scorer, np.stack(images), acc)
    return acc, errors


def same_source(a: str | None, b: str | None) -> bool:
    """Whether two image-source specs name the same images (paths compared resolved, slices ignored)."""
    if not a or not b:
        return False
    from pathlib import Path

    def norm(s: str) -> str:
        s = str(s).split("[")[0].rstrip("/")
        if s.startswith("file://"):
            s = s[len("file://"):]
        return s if "://" in s else str(Path(s).resolve())

    return norm(a) == norm(b)
