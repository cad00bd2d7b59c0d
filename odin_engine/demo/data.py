"""The built-in demo's images, made from data that ships inside scikit-learn (no download).

* **In-distribution:** ``sklearn.datasets.load_digits`` (1,797 handwritten digits, 8×8, values
  0…16), scaled to 0…255, upsampled bilinearly to 32×32 and repeated over R, G, B.
  A seeded permutation splits them once: the first :data:`TRAIN_SIZE` train the demo model
  (:mod:`odin_engine.demo.model`); the rest are never seen in training and feed the held-out
  calibration set and the corpus.
* **Out-of-distribution:** random square crops of the two photos bundled with scikit-learn
  (``china.jpg``, ``flower.jpg``, via ``load_sample_images``) resized to 32×32, and noise
  images (uniform, and Gaussian clipped to [0, 255]) — the "natural image" and "noise" OOD
  kinds of the ODIN paper.

:func:`write_demo_images` writes them as PNG files plus a corpus manifest (CSV) whose
``label`` column is the ground truth (``id`` or ``ood``) and whose ``image_id`` names the
kind (``id/digit-…``, ``ood/photo-china-…``, ``ood/noise-uniform-…``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
TRAIN_SIZE = 1000
N_DIGITS = 1797  # len(load_digits().images)
SPLIT_SEED = 0


def digits_rgb(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All of scikit-learn's digits as uint8 N×size×size×3 RGB, and their labels (0…9)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in gray])
    return np.repeat(up[..., None], 3, axis=3), d.target.astype(np.int64)


def digit_split(seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices into :func:`digits_rgb`: (train, unseen). ``unseen`` is never used for training."""
    order = np.random.default_rng(seed).permutation(N_DIGITS)
    return order[:TRAIN_SIZE], order[TRAIN_SIZE:]


def photo_crops(n: int, seed: int = 1, size: int = SIZE) -> tuple[np.ndarray, list[str]]:
    """``n`` random square crops (side 24…160 px) of scikit-learn's sample photos, resized to ``size``."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    names = [Path(f).stem for f in bunch.filenames]  # china, flower
    rng = np.random.default_rng(seed)
    out, which = [], []
    for i in range(n):
        k = i % len(bunch.images)
        img = bunch.images[k]
        side = int(rng.integers(24, 161))
        y = int(rng.integers(0, img.shape[0] - side + 1))
        x = int(rng.integers(0, img.shape[1] - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop.convert("RGB")))
        which.append(names[k])
    return (np.stack(out) if out else np.empty((0, size, size, 3), np.uint8)), which


def noise_images(n: int, seed: int = 2, size: int = SIZE) -> tuple[np.ndarray, list[str]]:
    """``n`` noise images, alternately uniform on 0…255 and Gaussian (mean 128, sd 64) clipped."""
    rng = np.random.default_rng(seed)
    out, kinds = [], []
    for i in range(n):
        if i % 2 == 0:
            out.append(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
            kinds.append("uniform")
        else:
            out.append(np.clip(rng.normal(128.0, 64.0, size=(size, size, 3)), 0, 255).astype(np.uint8))
            kinds.append("gaussian")
    return (np.stack(out) if out else np.empty((0, size, size, 3), np.uint8)), kinds


@dataclass
class DemoImages:
    """Where :func:`write_demo_images` put things, and how many of each."""

    root: Path
    heldout_dir: Path
    corpus_dir: Path
    corpus_manifest: Path
    counts: dict[str, int]


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def write_demo_images(
    root: str | Path,
    *,
    n_heldout: int = 400,
    n_corpus_id: int = 300,
    n_corpus_ood: int = 200,
    seed: int = SPLIT_SEED,
) -> DemoImages:
    """Write the demo's PNG files under ``root`` and return where they are.

    ``root/heldout/``  ``n_heldout`` unseen digits (calibration: the in-distribution reference)
    ``root/corpus/``   ``n_corpus_id`` other unseen digits + ``n_corpus_ood`` OOD images
                       (half photo crops, half noise)
    ``root/corpus.csv`` manifest: ``path,image_id,label`` with label ``id`` or ``ood`` (paths
                       relative to ``root``, so the folder can be moved or uploaded whole)
    """
    root = Path(root)
    images, targets = digits_rgb()
    _, unseen = digit_split(seed)
    if n_heldout < 1 or n_corpus_id < 0 or n_corpus_ood < 0:
        raise ValueError("n_heldout must be >= 1 and the corpus counts >= 0")
    if n_heldout + n_corpus_id > len(unseen):
        raise ValueError(
            f"only {len(unseen)} digits are kept out of training: n_heldout + n_corpus_id must be "
            f"<= {len(unseen)}; got {n_heldout} + {n_corpus_id}"
        )
    heldout_idx = unseen[:n_heldout]
    corpus_idx = unseen[n_heldout : n_heldout + n_corpus_id]
    heldout_dir, corpus_dir = root / "heldout", root / "corpus"
    for i in heldout_idx:
        _save(images[i], heldout_dir / f"digit-{int(targets[i])}-{int(i):04d}.png")

    rows: list[tuple[str, str, str]] = []
    for i in corpus_idx:
        rel = f"id/digit-{int(targets[i])}-{int(i):04d}.png"
        rows.append((rel, rel, "id"))
    n_photo = n_corpus_ood // 2
    photos, names = photo_crops(n_photo, seed=seed + 1)
    for j, (arr, name) in enumerate(zip(photos, names)):
        rel = f"ood/photo-{name}-{j:04d}.png"
        _save(arr, corpus_dir / rel)
        rows.append((rel, rel, "ood"))
    noise, kinds = noise_images(n_corpus_ood - n_photo, seed=seed + 2)
    for j, (arr, kind) in enumerate(zip(noise, kinds)):
        rel = f"ood/noise-{kind}-{j:04d}.png"
        _save(arr, corpus_dir / rel)
        rows.append((rel, rel, "ood"))
    for i in corpus_idx:
        _save(images[i], corpus_dir / f"id/digit-{int(targets[i])}-{int(i):04d}.png")

    manifest = root / "corpus.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "label"])
        for rel, image_id, label in rows:
            w.writerow([f"corpus/{rel}", image_id, label])  # relative to the manifest's folder
    counts = {
        "heldout_id": int(len(heldout_idx)),
        "corpus_id": int(len(corpus_idx)),
        "corpus_ood_photo": int(n_photo),
        "corpus_ood_noise": int(n_corpus_ood - n_photo),
    }
    return DemoImages(root, heldout_dir, corpus_dir, manifest, counts)


def write_ood_sets(root: str | Path, n_each: int = 100, seed: int = SPLIT_SEED) -> dict[str, Path]:
    """Labelled OOD sets for evaluation, separate from the corpus (other crops, other noise).

    Writes ``root/ood-photos/`` and ``root/ood-noise/`` (``n_each`` PNG files each) and returns
    ``{"photos": dir, "noise": dir}``; ``n_each == 0`` writes nothing and returns ``{}``.
    """
    root = Path(root)
    if n_each <= 0:
        return {}
    photos, names = photo_crops(n_each, seed=seed + 101)
    noise, kinds = noise_images(n_each, seed=seed + 102)
    out = {"photos": root / "ood-photos", "noise": root / "ood-noise"}
    for j, (arr, name) in enumerate(zip(photos, names)):
        _save(arr, out["photos"] / f"photo-{name}-{j:04d}.png")
    for j, (arr, kind) in enumerate(zip(noise, kinds)):
        _save(arr, out["noise"] / f"noise-{kind}-{j:04d}.png")
    return out


def image_kind(image_id: str) -> str:
    """``id/digit-3-0042.png`` → ``digit``; ``ood/photo-china-0001.png`` → ``photo``; noise → ``noise``."""
    name = image_id.rsplit("/", 1)[-1]
    return name.split("-", 1)[0]
