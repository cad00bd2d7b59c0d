"""Choose ODIN's temperature T and perturbation ε on validation data.

Two criteria
------------
``paper`` (Liang et al. 2018): grid ``T ∈ {1,2,5,10,20,50,100,200,500,1000}`` × 21 values of
``ε ∈ linspace(0, 0.004, 21)``; pick the pair minimizing FPR at the target TPR (95%) of held-out
in-distribution (ID) images against held-out OOD images (the mean over OOD sets when several are
given; ties → higher mean AUROC, then the smaller T and ε). Needs OOD examples, and the result is
tuned to *those* OOD examples.

``id-only`` (the Generalized-ODIN criterion, Hsu et al. 2020): with no OOD examples, fix T
(default 1000) and pick ``ε* = argmax_ε mean_{x ∈ ID} S_odin(x̃; T, ε)``. The perturbation is
designed to raise ID scores more than OOD scores, so the ε that raises ID scores most is a proxy
for the ε that separates best. Trade-off: it needs no OOD data and cannot overfit to one OOD
type, but it never looks at OOD images, so nothing guarantees the chosen ε also lowers FPR; it
tends to choose large ε (the mean ID score often keeps rising up to the grid's end), and T is not
tuned at all. Prefer ``paper`` whenever a few hundred representative OOD images exist.

Cost: the gradient sign at a given T does not depend on ε, so :meth:`OdinScorer.score_grid`
computes it once per T and reuses it for all 21 ε: ``|T|·(forward+backward) + |T|·|ε|`` forwards
instead of ``|T|·|ε|·(forward+backward+forward)``.

Image sources (``load_source``)
-------------------------------
* ``path.npz`` or ``path.npz[start:stop]`` / ``path.npz[start:stop:step]`` — an ``.npz`` whose
  ``images`` array is uint8 N×H×W×3 RGB; the optional Python slice picks rows
  (``cifar.npz[0:10000:10]`` = every 10th image). ``path.npz:key[...]`` reads array ``key``.
* a directory or a ``.csv``/``.parquet`` manifest (local, ``file://``, ``s3://``) — listed and
  decoded exactly as ``odin-audit score --input`` does (:mod:`odin_engine.io.corpus`,
  :mod:`odin_engine.io.images`, sorted by ``image_id``); an optional ``[start:stop[:step]]`` slice
  picks rows of that sorted list. Files that cannot be decoded are left out and reported.
``.npz`` images not already ``input_size`` square are centre-cropped and resized with Pillow
BILINEAR (the score job's ``crop`` policy).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from odin_engine.errors import ConfigError
from odin_engine.settings import DEFAULT_TEMPERATURE, OdinSettings, validate_epsilon, validate_temperature

if TYPE_CHECKING:  # annotations only: the scorer (torch) is imported by whoever builds one
    from odin_engine.scorer import OdinScorer

PAPER_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
PAPER_EPSILONS = tuple(float(e) for e in np.round(np.linspace(0.0, 0.004, 21), 6))
TUNING_VERSION = 1
MODES = ("paper", "id-only")


# --------------------------------------------------------------------------- criteria
def tune_paper(
    scorer: OdinScorer,
    id_images,
    ood_images: Mapping[str, Any],
    temperatures: Sequence[float] = PAPER_TEMPERATURES,
    epsilons: Sequence[float] = PAPER_EPSILONS,
    tpr: float = 0.95,
) -> dict[str, Any]:
    """Grid-search (T, ε) minimizing the mean FPR@``tpr`` over the OOD sets."""
    from odin_engine.metrics import auroc, fpr_at_tpr  # sklearn: imported only where tuning runs

    if not ood_images:
        raise ConfigError("paper-mode tuning needs at least one OOD set (--ood); use --mode id-only without OOD data")
    temps = [validate_temperature(t) for t in temperatures]
    eps = [validate_epsilon(e) for e in epsilons]
    t0 = time.perf_counter()
    id_grid = scorer.score_grid(id_images, temps, eps)
    ood_grid = {name: scorer.score_grid(imgs, temps, eps) for name, imgs in ood_images.items()}
    seconds = time.perf_counter() - t0
    for name, g in [("held-out ID", id_grid), *ood_grid.items()]:
        if g["odin"].shape[2] == 0:
            raise ConfigError(f"the {name} set has no images")
    names = list(ood_grid)
    fpr = np.zeros((len(temps), len(eps), len(names)))
    auc = np.zeros_like(fpr)
    for i in range(len(temps)):
        for j in range(len(eps)):
            for s, name in enumerate(names):
                fpr[i, j, s] = fpr_at_tpr(id_grid["odin"][i, j], ood_grid[name]["odin"][i, j], tpr)
                auc[i, j, s] = auroc(id_grid["odin"][i, j], ood_grid[name]["odin"][i, j])
    mean_fpr, mean_auc = fpr.mean(axis=2), auc.mean(axis=2)
    # lexicographic: lowest mean FPR, then highest mean AUROC, then smallest T, then smallest ε
    order = sorted(
        ((mean_fpr[i, j], -mean_auc[i, j], temps[i], eps[j], i, j) for i in range(len(temps)) for j in range(len(eps)))
    )
    bi, bj = order[0][4], order[0][5]
    msp_fpr = {n: fpr_at_tpr(id_grid["msp"], ood_grid[n]["msp"], tpr) for n in names}
    return {
        "mode": "paper",
        "criterion": f"minimize mean FPR at {tpr:g} TPR over the OOD sets (ties: higher mean AUROC)",
        "temperature": temps[bi],
        "epsilon": eps[bj],
        "objective": float(mean_fpr[bi, bj]),
        "tpr": float(tpr),
        "n_heldout": int(id_grid["odin"].shape[2]),
        "ood_sets": {n: {"n": int(ood_grid[n]["odin"].shape[2]),
                         "fpr_at_tpr": float(fpr[bi, bj, s]),
                         "auroc": float(auc[bi, bj, s]),
                         "msp_fpr_at_tpr": float(msp_fpr[n])} for s, n in enumerate(names)},
        "grid": {
            "temperatures": temps,
            "epsilons": eps,
            "mean_fpr_at_tpr": mean_fpr.tolist(),
            "mean_auroc": mean_auc.tolist(),
        },
        "scoring_seconds": seconds,
    }


def tune_id_only(
    scorer: OdinScorer,
    id_images,
    temperature: float = DEFAULT_TEMPERATURE,
    epsilons: Sequence[float] = PAPER_EPSILONS,
) -> dict[str, Any]:
    """Generalized-ODIN criterion: at fixed T pick ε maximizing the mean ID ODIN score (ties → smaller ε)."""
    t = validate_temperature(temperature)
    eps = [validate_epsilon(e) for e in epsilons]
    t0 = time.perf_counter()
    grid = scorer.score_grid(id_images, [t], eps)
    seconds = time.perf_counter() - t0
    if grid["odin"].shape[2] == 0:
        raise ConfigError("the held-out ID set has no images")
    means = grid["odin"][0].astype(np.float64).mean(axis=1)
    best = int(np.flatnonzero(means == means.max())[0])
    return {
        "mode": "id-only",
        "criterion": "maximize the mean in-distribution ODIN score over ε at fixed T (Generalized ODIN, Hsu et al. 2020)",
        "temperature": t,
        "epsilon": eps[best],
        "objective": float(means[best]),
        "n_heldout": int(grid["odin"].shape[2]),
        "grid": {"temperatures": [t], "epsilons": eps, "mean_id_score": [means.tolist()]},
        "scoring_seconds": seconds,
    }


# --------------------------------------------------------------------------- tuning.json
def tuning_document(result: Mapping[str, Any], model_id: str, sources: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "version": TUNING_VERSION,
        "temperature": float(result["temperature"]),
        "epsilon": float(result["epsilon"]),
        "mode": result["mode"],
        "model_id": model_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": dict(sources),
        **{k: v for k, v in result.items() if k not in ("temperature", "epsilon", "mode")},
    }


def _tuning_doc(path: str | Path) -> dict[str, Any]:
    from odin_engine.settings import read_tuning_file

    doc = read_tuning_file(path)
    return doc if isinstance(doc, dict) else {}


def tuned_method(path: str | Path) -> str | None:
    """The method a ``tuning.json`` chose (``None`` in files written before methods were compared)."""
    return _tuning_doc(path).get("method")


def tuned_params(path: str | Path | None) -> dict[str, Any]:
    """``{method: value}`` of the hyperparameters a ``tuning.json`` chose (empty without a comparison)."""
    if not path:
        return {}
    params = _tuning_doc(path).get("params") or {}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k != "odin"}


def load_tuning(path: str | Path, *, expect_model_id: str | None = None) -> tuple[float, float]:
    """``(T, ε)`` from a ``tuning.json`` (:meth:`odin_engine.settings.OdinSettings.from_tuning`)."""
    s = OdinSettings.from_tuning(path, expect_model_id=expect_model_id)
    return s.temperature, s.epsilon


def resolve_settings(tuning: str | Path | None, temperature: float | None,
                     epsilon: float | None) -> tuple[float, float, str]:
    """(T, ε, where they came from): a thin adapter over :meth:`OdinSettings.resolve`."""
    s = OdinSettings.resolve(tuning, temperature, epsilon)
    return s.temperature, s.epsilon, s.origin


# --------------------------------------------------------------------------- image sources
_SLICE = re.compile(r"^(?P<path>.+?)(?::(?P<key>[A-Za-z_][A-Za-z0-9_]*))?\[(?P<slice>[^\[\]]*)\]$")


def parse_slice(text: str) -> slice:
    parts = [p.strip() for p in text.split(":")]
    if len(parts) not in (2, 3):
        raise ConfigError(f"slice [{text}] must look like [start:stop] or [start:stop:step]")
    try:
        vals = [int(p) if p else None for p in parts]
    except ValueError as exc:
        raise ConfigError(f"slice [{text}] must hold integers") from exc
    if len(vals) == 3 and vals[2] is not None and vals[2] <= 0:
        raise ConfigError(f"slice [{text}]: step must be > 0")
    return slice(*vals)


def split_source(spec: str) -> tuple[str, str | None, slice | None]:
    """``'a.npz:key[0:10]'`` → ``('a.npz', 'key', slice(0, 10))``."""
    m = _SLICE.match(spec)
    if m:
        return m.group("path"), m.group("key"), parse_slice(m.group("slice"))
    if spec.endswith("]") and "[" in spec:
        raise ConfigError(f"{spec}: the slice must look like [start:stop] or [start:stop:step] with integers")
    if ".npz:" in spec:
        path, key = spec.rsplit(":", 1)
        return path, key, None
    return spec, None, None


def _resize_array(arr: np.ndarray, size: int, policy: str) -> np.ndarray:
    """An in-memory uint8 H×W×3 array → size×size×3, by the score job's rules (crop or stretch, BILINEAR)."""
    from PIL import Image

    if arr.shape[:2] == (size, size):
        return arr
    img = Image.fromarray(arr)
    w, h = img.size
    if policy == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_source(spec: str, input_size: int, policy: str = "crop") -> tuple[np.ndarray, list[dict[str, str]]]:
    """Images of a tuning source as uint8 N×S×S×3, plus the files that could not be decoded.

    Directories and manifests are listed by :func:`odin_engine.io.corpus.load_corpus` and decoded by
    :func:`odin_engine.io.images.decode_image`, exactly as the score job does; undecodable files are
    left out and returned as ``[{"image_id", "error"}]`` (the caller reports them).
    """
    from odin_engine.io.corpus import load_corpus
    from odin_engine.io.store import read_bytes
    from odin_engine.io.images import ImageDecodeError, decode_image

    path_s, key, sl = split_source(str(spec))
    if path_s.lower().endswith(".npz"):
        path = Path(path_s)
        if not path.is_file():
            raise ConfigError(f"image source not found: {path_s}")
        with np.load(path, allow_pickle=False) as z:
            k = key or "images"
            if k not in z.files:
                raise ConfigError(f"{path} has no array {k!r}; it has {z.files}")
            arr = z[k]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ConfigError(f"{path}[{k}] must be uint8 N×H×W×3 RGB; got {arr.dtype} {arr.shape}")
        if sl is not None:
            arr = arr[sl]
        if arr.shape[0] == 0:
            raise ConfigError(f"{spec} selects no images")
        if arr.shape[1:3] != (input_size, input_size):
            arr = np.stack([_resize_array(a, input_size, policy) for a in arr])
        return np.ascontiguousarray(arr), []
    if key is not None:
        raise ConfigError(f"{spec}: ':key' applies to .npz files only")
    corpus = load_corpus(path_s)
    ids = corpus.table.column("image_id").to_pylist()
    uris = corpus.table.column("uri").to_pylist()
    if sl is not None:
        ids, uris = ids[sl], uris[sl]
    if not uris:
        raise ConfigError(f"{spec} selects no images")
    images, errors = [], []
    for image_id, uri in zip(ids, uris):
        try:
            images.append(decode_image(read_bytes(uri), input_size, policy)[0])
        except (ImageDecodeError, OSError) as exc:
            errors.append({"image_id": str(image_id), "error": str(exc)})
    if not images:
        raise ConfigError(f"none of the {len(uris)} images of {spec} could be decoded (first: {errors[0]['error']})")
    return np.stack(images), errors
