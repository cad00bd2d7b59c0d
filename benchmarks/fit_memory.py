"""Peak memory of a fit: 50,000 vs 5,000 reference images (target ≤ 1.3×).

    python -m benchmarks.fit_memory [--sizes 5000,50000] [--bank-size 50000]

Each size runs in a fresh process (peak RSS from ``getrusage``): the fit's accumulator
(:class:`~odin_engine.detectors.fit.FitAccumulator`, what every fit worker runs) fed the
scoring pass of a model batch by batch, images generated per batch (as the fit job decodes them
per batch), then ``finish``. The model is a small CNN with a 64-wide head (ResNet-20's ``D``) so
that 50,000 images fit in minutes on a 2-core box: the model's own memory does not depend on
how many images pass through it; what could grow with the reference set is the accumulator
(bounded by ``--bank-size``) — that is what this measures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import numpy as np
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def one(n: int, bank_size: int, batch: int = 512) -> dict:
    from odin_engine.detectors.reference import accumulate, finish, fit_scorer, new_accumulator
    from odin_engine.loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel

    torch.manual_seed(0)
    module = Small().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    model = LoadedModel(module, IMAGENET_MEAN, IMAGENET_STD, 10, 32, "small@sha256:0", "small")
    scorer = fit_scorer(model, temperature=1000.0, device="cpu", batch_size=batch)
    acc = new_accumulator(scorer, bank_size)
    rng = np.random.default_rng(0)
    for start in range(0, n, batch):
        accumulate(scorer, rng.integers(0, 256, (min(batch, n - start), 32, 32, 3), np.uint8), acc)
    stats = finish(acc, scorer, model.model_id)
    return {"n": n, "bank_rows": int(stats.bank.shape[0]), "fit_bytes": len(stats.to_bytes()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000,50000")
    ap.add_argument("--bank-size", type=int, default=50_000)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.bank_size)))
        return
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        out = subprocess.run([sys.executable, "-m", "benchmarks.fit_memory", "--one", str(n), "--bank-size",
                              str(args.bank_size)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| reference images | bank rows | fit file | peak RSS |")
    print("|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n']:,} | {r['bank_rows']:,} | {r['fit_bytes'] / 2**20:.1f} MiB | {r['peak_rss_mib']:.0f} MiB |")
    print(f"peak RSS ratio {results[-1]['n']:,} vs {results[0]['n']:,} images: "
          f"{results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.3f}×")


if __name__ == "__main__":
    main()
