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
* a directory — every ``.png/.jpg/.jpeg/.bmp/.gif/.webp/.tif(f)`` file under it, sorted by path.
* a manifest — ``.csv``, ``.parquet`` or ``.jsonl`` with a ``uri`` (or ``path``) column of local
  files (relative paths resolve against the manifest's folder); an optional ``[start:stop]``
  slice works here too.
Images are converted to RGB and, when not already ``input_size`` square, resized with
Pillow bilinear.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .metrics import auroc, fpr_at_tpr
from .scorer import OdinScorer, validate_epsilon, validate_temperature

PAPER_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
PAPER_EPSILONS = tuple(float(e) for e in np.round(np.linspace(0.0, 0.004, 21), 6))
DEFAULT_TEMPERATURE = 1000.0
DEFAULT_EPSILON = 0.0014
TUNING_VERSION = 1
MODES = ("paper", "id-only")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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


def load_tuning(path: str | Path, *, expect_model_id: str | None = None) -> tuple[float, float]:
    """``(T, ε)`` from a ``tuning.json`` written by ``odin-audit tune``.

    With ``expect_model_id``, a file tuned for another model is refused.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tuning file not found: {p} (write one with `odin-audit tune`)")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tuning file {p} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or "temperature" not in doc or "epsilon" not in doc:
        raise ConfigError(f"tuning file {p} needs numeric 'temperature' and 'epsilon' fields")
    try:
        t = validate_temperature(doc["temperature"])
        e = validate_epsilon(doc["epsilon"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tuning file {p}: {exc}") from exc
    if expect_model_id and doc.get("model_id") and doc["model_id"] != expect_model_id:
        raise ConfigError(
            f"tuning file {p} was tuned for model {doc['model_id']}, not {expect_model_id}: re-run `odin-audit tune`"
        )
    return t, e


# --------------------------------------------------------------------------- image sources
_SLICE = re.compile(r"^(?P<path>.+?)(?::(?P<key>[A-Za-z_][A-Za-z0-9_]*))?\[(?P<slice>[-0-9: ]*)\]$")


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
    if ".npz:" in spec:
        path, key = spec.rsplit(":", 1)
        return path, key, None
    return spec, None, None


def _resize(img, size: int) -> np.ndarray:
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _read_files(paths: Sequence[Path], size: int, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                out[i] = _resize(im, size)
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"{what}: cannot read image {p}: {exc}") from exc
    return out


def load_source(spec: str, input_size: int) -> np.ndarray:
    """Images of a tuning source as uint8 N×S×S×3 (see the module docstring for the forms)."""
    path_s, key, sl = split_source(str(spec))
    path = Path(path_s)
    if not path.exists():
        raise ConfigError(f"image source not found: {path_s}")
    if path.is_dir():
        if sl is not None:
            raise ConfigError(f"{spec}: slices apply to .npz files and manifests, not directories")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        return _read_files(files, input_size, str(spec))
    suffix = path.suffix.lower()
    if suffix == ".npz":
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
            from PIL import Image

            arr = np.stack([_resize(Image.fromarray(a), input_size) for a in arr])
        return np.ascontiguousarray(arr)
    if suffix in (".csv", ".parquet", ".jsonl", ".json"):
        import pandas as pd

        df = (pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path) if suffix == ".parquet"
              else pd.read_json(path, lines=True))
        col = "uri" if "uri" in df.columns else "path" if "path" in df.columns else None
        if col is None:
            raise ConfigError(f"manifest {path} needs a 'uri' or 'path' column; it has {list(df.columns)}")
        uris = df[col].astype(str).tolist()
        if sl is not None:
            uris = uris[sl]
        files = []
        for u in uris:
            if "://" in u and not u.startswith("file://"):
                raise ConfigError(f"manifest {path}: tuning reads local files only; got {u}")
            p = Path(u[len("file://"):] if u.startswith("file://") else u)
            files.append(p if p.is_absolute() else path.parent / p)
        if not files:
            raise ConfigError(f"{spec} selects no images")
        return _read_files(files, input_size, str(spec))
    raise ConfigError(f"unknown image source {spec!r}: give a directory, a .npz[start:stop] or a .csv/.parquet/.jsonl manifest")


def describe_source(spec: str, n: int) -> dict[str, Any]:
    return {"source": str(spec), "n": int(n)}
