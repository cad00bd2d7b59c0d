"""Cost of the full paper tuning grid: one shared gradient per T vs scoring every (T, ε) separately.

    python -m benchmarks.tuning_cost [--data ../shared/data] [--images 256] [--separate-pairs-per-t 2 | --separate-all]

Shared: ``OdinScorer.score_grid(images, 10 T, 21 ε)`` — per T one forward + one input-gradient
backward, then one forward per ε (``|T|·(F+B) + |T|·|ε|·F``). Separate: ``score(images)`` once
per pair (``F+B+F`` per pair with ε > 0; ``F`` when ε = 0), with the scorer built once (model
copy + BN folding, outside the timing) and only (T, ε) changed per pair — so that the baseline
pays for scoring, not for set-up the grid does not repeat either. The operation count predicts
the ratio ``(|T|·(F+B) + |T|·|ε|·F) / (n₀·F + n₊·(2F+B))`` with ``B ≈ 2F``; it is printed beside
the measured one.

Timing is interleaved per T — ``score_grid(images, [T], 21 ε)`` (the same operations the whole-grid
call does for that T), then that T's separately scored pairs — so that background load on the
machine hits both paths alike. The separate path is timed on a subset of pairs (per T: ε = 0 and
two ε > 0 values, rotating over the ε grid) and **extrapolated linearly**: the mean time of
the timed ε > 0 pairs × the number of ε > 0 pairs in the grid, plus the mean time of the timed
ε = 0 pairs × the number of ε = 0 pairs (a pair's cost does not depend on the values of T or ε,
only on whether ε = 0). ``--separate-all`` times all 210 pairs instead. The timed pairs' scores
are checked against the grid's. Prints both times and the ratio (target ≤ 0.4).
Model: ResNet-20 with the test-bed weights and CIFAR-10 images when ``--data`` exists, else a
randomly initialized ResNet-20 on random images (the cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from odin_engine.loading import load_model
from odin_engine.scorer import OdinScorer
from odin_engine.decide.tuning import PAPER_EPSILONS, PAPER_TEMPERATURES
from odin_engine.settings import validate_epsilon, validate_temperature

REPO = Path(__file__).resolve().parents[1]


def _model_and_images(data: Path, n: int):
    w = data / "weights" / "resnet20-12fca82f.th"
    npz = data / "cifar10_test_jpeg_yoongikim.npz"
    if w.is_file() and npz.is_file():
        imgs = np.load(npz)["images"]
        step = max(1, len(imgs) // n)
        return load_model("cifar_resnet20", w), imgs[::step][:n], f"test-bed ResNet-20 + CIFAR-10 from {data}"
    from odin_engine.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp()) / "rn20.pt"
    torch.save(CifarResNet(20).state_dict(), path)
    imgs = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return load_model("cifar_resnet20", path), imgs, f"random ResNet-20 + random images ({data} not found)"


def _with_settings(base: OdinScorer, temperature: float, epsilon: float) -> OdinScorer:
    """``base`` (its module already copied and BN-folded) scoring at another (T, ε)."""
    scorer = copy.copy(base)
    scorer.temperature, scorer.epsilon = validate_temperature(temperature), validate_epsilon(epsilon)
    return scorer


def _predicted_ratio(n_t: int, n_eps: int, n_zero: int, n_nonzero: int, backward: float = 2.0) -> float:
    """Shared / separate in forward-pass units, a backward costing ``backward`` forwards."""
    return (n_t * (1 + backward) + n_t * n_eps) / (n_zero + n_nonzero * (2 + backward))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="test-bed folder (relative paths: from the repo root)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--separate-pairs-per-t", type=int, default=2,
                    help="ε > 0 pairs timed separately per T (plus the ε = 0 pair), then extrapolated")
    ap.add_argument("--separate-all", action="store_true", help="time all 210 pairs separately (no extrapolation)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    data = Path(args.data)
    data = data if data.is_absolute() else REPO / data
    model, imgs, what = _model_and_images(data, args.images)
    temps, eps = list(PAPER_TEMPERATURES), list(PAPER_EPSILONS)
    pairs = [(t, e) for t in temps for e in eps]
    print(f"{what}; {len(imgs)} images, grid {len(temps)} T × {len(eps)} ε = {len(pairs)} pairs, device {args.device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    # one scorer (model copy + BN folding) for each path, built before any timing
    grid_scorer = OdinScorer(model, device=args.device, batch_size=args.batch_size)
    pair_scorer = OdinScorer(model, device=args.device, batch_size=args.batch_size)
    grid_scorer.score_grid(imgs[: min(32, len(imgs))], temps[:1], eps[:2])  # warm-up
    pair_scorer.score(imgs[: min(32, len(imgs))])
    # Interleaved per T: the shared grid for this T, then the separately scored pairs of this T,
    # so that background load on the machine hits both paths alike.
    nonzero_eps = [e for e in eps if e > 0.0]
    per_t = max(1, args.separate_pairs_per_t)
    shared_t, times, max_diff = {}, {}, 0.0
    for i, t in enumerate(temps):
        _sync(args.device)
        t0 = time.perf_counter()
        g = grid_scorer.score_grid(imgs, [t], eps)["odin"][0]
        _sync(args.device)
        shared_t[t] = time.perf_counter() - t0
        if args.separate_all:
            mine = [(t, e) for e in eps]
        else:
            mine = [(t, 0.0)] + [(t, nonzero_eps[(i * per_t + k) % len(nonzero_eps)]) for k in range(per_t)]
        for _, e in mine:
            _sync(args.device)
            t1 = time.perf_counter()
            s = _with_settings(pair_scorer, t, e).score(imgs)["odin"]
            _sync(args.device)
            times[(t, e)] = time.perf_counter() - t1
            max_diff = max(max_diff, float(np.max(np.abs(s - g[eps.index(e)]))))
        print(f"T={t:g}: shared {shared_t[t]:.2f} s; separate pairs timed: "
              + ", ".join(f"ε={e:g} {times[(t, e)]:.2f} s" for _, e in mine), flush=True)
    shared_s = sum(shared_t.values())
    t_zero = [v for (t, e), v in times.items() if e == 0.0]
    t_nonzero = [v for (t, e), v in times.items() if e > 0.0]
    n_zero = sum(1 for _, e in pairs if e == 0.0)
    n_nonzero = len(pairs) - n_zero
    if args.separate_all:
        separate_s = sum(times.values())
        how = "measured on all pairs"
    else:
        separate_s = n_zero * float(np.mean(t_zero)) + n_nonzero * float(np.mean(t_nonzero))
        how = (f"extrapolated linearly from {len(t_zero)} ε=0 pairs (mean {np.mean(t_zero):.3f} s) and "
               f"{len(t_nonzero)} ε>0 pairs (mean {np.mean(t_nonzero):.3f} s) to {n_zero} + {n_nonzero} pairs")
    ratio = shared_s / separate_s
    predicted = _predicted_ratio(len(temps), len(eps), n_zero, n_nonzero)
    print(f"shared gradient (score_grid), all {len(pairs)} pairs: {shared_s:.2f} s")
    print(f"separate scoring per pair (scorer built once): {separate_s:.2f} s ({how})")
    print(f"ratio shared / separate: {ratio:.3f} (target ≤ 0.4; operation count with backward ≈ 2 forwards "
          f"predicts {predicted:.3f}); max |Δ score| on timed pairs: {max_diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "what": what, "images": len(imgs), "pairs": len(pairs), "device": args.device,
            "torch_threads": torch.get_num_threads(), "shared_s": shared_s, "separate_s": separate_s,
            "separate_how": how, "shared_per_t": {str(k): v for k, v in shared_t.items()}, "timed_pairs": [[t, e, v] for (t, e), v in times.items()], "ratio": ratio,
            "predicted_ratio": predicted, "max_abs_diff": max_diff,
        }, indent=2) + "\n")
    return 0 if ratio <= 0.4 else 1


if __name__ == "__main__":
    sys.exit(main())
