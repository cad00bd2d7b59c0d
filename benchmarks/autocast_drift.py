"""How far autocast (bf16/fp16) forward passes move ODIN scores from fp32.

    python -m benchmarks.autocast_drift --data ../shared/data [--images 2000] [--dtype bf16] [--device cpu]

Under autocast the engine still casts logits to fp32 before ``/T`` and the cross-entropy,
and takes the sign of an fp32 input gradient, so only the network's own arithmetic is in
reduced precision. Prints: share of gradient signs that agree with fp32, max and mean
|ΔS_odin|, Spearman rank correlation, and FPR@95TPR against tin_crop for both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import odin_engine as oe
from odin_engine.odin import perturbation_direction

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    model = oe.load_model("cifar_resnet20", args.data / "weights" / "resnet20-12fca82f.th")
    d = np.load(args.data / "cifar10_test_jpeg_yoongikim.npz")
    step = max(1, len(d["images"]) // args.images)
    id_imgs = d["images"][::step][: args.images]
    ood_imgs = np.load(args.data / "ood" / "tin_crop.npz")["images"][: args.images]

    full = oe.OdinScorer(model, device=args.device)
    half = oe.OdinScorer(model, device=args.device, autocast=args.dtype)
    x = next(full.batches(id_imgs[:256]))
    d32, _ = perturbation_direction(full.module, x, full.std.flatten(), full.temperature)
    d16, _ = perturbation_direction(full.module, x, full.std.flatten(), full.temperature, DTYPES[args.dtype])
    sign_agree = float((torch.sign(d32) == torch.sign(d16)).float().mean())

    s32 = {k: full.score(v)["odin"] for k, v in (("id", id_imgs), ("ood", ood_imgs))}
    s16 = {k: half.score(v)["odin"] for k, v in (("id", id_imgs), ("ood", ood_imgs))}
    both32, both16 = np.r_[s32["id"], s32["ood"]], np.r_[s16["id"], s16["ood"]]
    delta = np.abs(both32 - both16)
    print(f"device {args.device}, autocast {args.dtype}, {len(id_imgs)} ID + {len(ood_imgs)} tin_crop images, "
          f"T={full.temperature:g}, ε={full.epsilon:g}")
    print("| measure | value |\n|---|---:|")
    print(f"| gradient signs equal to fp32 | {100 * sign_agree:.2f}% |")
    print(f"| max abs ΔS_odin | {delta.max():.3e} |")
    print(f"| mean abs ΔS_odin | {delta.mean():.3e} |")
    print(f"| mean S_odin (fp32) | {both32.mean():.6f} |")
    print(f"| Spearman ρ (fp32 vs {args.dtype}) | {spearmanr(both32, both16).statistic:.5f} |")
    print(f"| FPR@95TPR fp32 | {100 * oe.metrics.fpr_at_tpr(s32['id'], s32['ood']):.2f}% |")
    print(f"| FPR@95TPR {args.dtype} | {100 * oe.metrics.fpr_at_tpr(s16['id'], s16['ood']):.2f}% |")


if __name__ == "__main__":
    main()
