"""Reproduce the ODIN comparison on the CIFAR-10 test bed.

    python -m benchmarks.reproduce --data ../shared/data [--limit N] [--json out.json]

Prints (markdown) the accuracy of each CIFAR ResNet on the CIFAR-10 test set, then for
ResNet-20 and every OOD set in ``<data>/ood/`` plus synthetic Gaussian (N(0.5, 1) clipped
to [0, 1]) and Uniform (U[0, 1]) noise, both seed 0 and quantized to uint8:
FPR@95TPR (in-distribution positive), detection error, AUROC, AUPR-In and AUPR-Out for
MSP, energy and ODIN (T=1000, ε=0.0014).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import odin_engine as oe

METHODS = ("msp", "energy", "odin")
METRICS = ("fpr_at_tpr", "detection_error", "auroc", "aupr_in", "aupr_out")
HEADERS = ("FPR@95TPR", "Det. err", "AUROC", "AUPR-In", "AUPR-Out")


def synthetic_sets(n: int) -> dict[str, np.ndarray]:
    shape = (n, 32, 32, 3)
    gauss = np.clip(np.random.default_rng(0).normal(0.5, 1.0, shape), 0, 1)
    unif = np.random.default_rng(0).uniform(0.0, 1.0, shape)
    to_u8 = lambda a: np.round(a * 255).astype(np.uint8)  # noqa: E731
    return {"Gaussian (synthetic)": to_u8(gauss), "Uniform (synthetic)": to_u8(unif)}


def stratified(n_total: int, limit: int | None, per_class: int = 1000) -> np.ndarray:
    if not limit or limit >= n_total:
        return np.arange(n_total)
    k = max(1, limit // (n_total // per_class))
    return np.concatenate([np.arange(c * per_class, c * per_class + k) for c in range(n_total // per_class)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--temperature", type=float, default=1000.0)
    ap.add_argument("--epsilon", type=float, default=0.0014)
    ap.add_argument("--limit", type=int, default=None, help="images per set (stratified for CIFAR-10); default all")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if not (args.data / "cifar10_test_jpeg_yoongikim.npz").is_file():
        print(f"error: {args.data} does not hold the test bed (cifar10_test_jpeg_yoongikim.npz)", file=sys.stderr)
        return 2
    t0 = time.time()
    cifar = np.load(args.data / "cifar10_test_jpeg_yoongikim.npz")
    idx = stratified(len(cifar["labels"]), args.limit)
    id_images, labels = cifar["images"][idx], cifar["labels"][idx]
    result: dict = {"settings": {"temperature": args.temperature, "epsilon": args.epsilon,
                                 "id_images": int(len(idx))}, "accuracy": {}, "ood": {}}

    print(f"## Accuracy on the CIFAR-10 test set (JPEG), {len(idx)} images\n")
    print("| model | accuracy |\n|---|---:|")
    id_scores = None
    for depth in (20, 32, 44, 56):
        weights = next((args.data / "weights").glob(f"resnet{depth}-*.th"), None)
        if weights is None:
            continue
        model = oe.load_model(f"cifar_resnet{depth}", weights)
        if depth == 20:
            scorer = oe.OdinScorer(model, temperature=args.temperature, epsilon=args.epsilon)
            id_scores = scorer.score(id_images)
            pred = id_scores["pred"]
        else:
            pred = oe.OdinScorer(model, epsilon=0.0).score(id_images)["pred"]
        acc = float(np.mean(pred == labels))
        result["accuracy"][f"resnet{depth}"] = acc
        print(f"| ResNet-{depth} | {100 * acc:.2f}% |")

    ood_sets = {p.stem: np.load(p)["images"] for p in sorted((args.data / "ood").glob("*.npz"))}
    ood_sets.update(synthetic_sets(10_000))
    print(f"\n## ResNet-20, T={args.temperature:g}, ε={args.epsilon:g}; ID = CIFAR-10 test ({len(idx)} images)\n")
    print("All figures in %. FPR@95TPR: share of OOD images scoring ≥ the threshold that keeps 95% of ID.\n")
    print("| OOD set | N | method | " + " | ".join(HEADERS) + " |")
    print("|---|---:|---|" + "---:|" * len(HEADERS))
    for name, images in ood_sets.items():
        if args.limit:
            images = images[: args.limit]
        ood_scores = scorer.score(images)
        result["ood"][name] = {"n": int(len(images))}
        for method in METHODS:
            m = oe.metrics.all_metrics(id_scores[method], ood_scores[method])
            result["ood"][name][method] = m
            cells = " | ".join(f"{100 * m[k]:.1f}" for k in METRICS)
            print(f"| {name} | {len(images)} | {method.upper() if method != 'energy' else 'Energy'} | {cells} |")
    result["seconds"] = round(time.time() - t0, 1)
    print(f"\n(took {result['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
