"""Every detector's FPR at 95% TPR and AUROC on the test bed, at the default hyperparameters.

    python -m benchmarks.detectors_testbed [--data ../shared/data] [--ood-limit N] [--device cpu]

ResNet-20 (CIFAR-10). Fit (``odin_engine.detectors.reference.fit_images``, the same code the fit
job runs per worker): CIFAR-10 test images 0–4,999. In-distribution: images 5,000–9,999. OOD: every
``ood/*.npz`` of the test bed (the first ``--ood-limit`` images of each, all by default). Scores:
one ``OdinScorer`` (T = 1000, ε = 0.0014) with the fit; FPR at 95% TPR is the ODIN paper's
definition (ID positive: the share of OOD images whose score reaches the threshold that keeps 95%
of the ID images); AUROC by scikit-learn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import odin_engine as oe
from odin_engine.detectors.reference import fit_images
from odin_engine.methods import TABLE_METHODS
from odin_engine.metrics import auroc, fpr_at_tpr


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--ood-limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)
    model = oe.load_model("cifar_resnet20", args.data / "weights" / "resnet20-12fca82f.th")
    with np.load(args.data / "cifar10_test_jpeg_yoongikim.npz") as z:
        cifar = z["images"]
    t0 = time.perf_counter()
    fit = fit_images(model, cifar[:5000], temperature=1000.0, device=args.device, batch_size=args.batch_size)
    t_fit = time.perf_counter() - t0
    scorer = oe.OdinScorer(model, 1000.0, 0.0014, device=args.device, batch_size=args.batch_size, fit=fit,
                           methods=["all"])
    t0 = time.perf_counter()
    ident = scorer.score(cifar[5000:10000])
    ood = {}
    for path in sorted((args.data / "ood").glob("*.npz")):
        with np.load(path) as z:
            ood[path.stem] = scorer.score(z["images"][:args.ood_limit])
    t_score = time.perf_counter() - t0
    names = list(ood)
    print(f"model {model.model_id}; fit on CIFAR-10 test 0–4,999 ({t_fit:.0f} s); ID: 5,000–9,999; OOD: "
          + ", ".join(f"{n} ({len(ood[n]['odin']):,})" for n in names) + f"; scoring {t_score:.0f} s")
    print("FPR at 95% TPR (ID positive) / AUROC, in %, default hyperparameters")
    print("| method | " + " | ".join(f"{n} FPR95 | {n} AUROC" for n in names) + " | mean FPR95 | mean AUROC |")
    print("|---|" + "---:|" * (2 * len(names) + 2))
    rows = []
    for m in TABLE_METHODS:
        fpr = [fpr_at_tpr(ident[m], ood[n][m], 0.95) for n in names]
        auc = [auroc(ident[m], ood[n][m]) for n in names]
        rows.append((np.mean(fpr), -np.mean(auc), m, fpr, auc))
    for mean_fpr, neg_auc, m, fpr, auc in sorted(rows):
        cells = " | ".join(f"{100 * f:.1f} | {100 * a:.1f}" for f, a in zip(fpr, auc))
        print(f"| {m} | {cells} | {100 * mean_fpr:.1f} | {100 * -neg_auc:.1f} |")


if __name__ == "__main__":
    main()
