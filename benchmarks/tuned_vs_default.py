"""Tuned vs default ODIN vs MSP on the real test bed (ResNet-20, CIFAR-10 JPEG test set, real OOD sets).

    python -m benchmarks.tuned_vs_default [--data ../shared/data] [--tuning tuning.json] [--json out.json]

Tunes (T, ε) on one part of the data with the paper's criterion (full 10 × 21 grid, minimum FPR@95TPR
against one OOD set) and with the ID-only criterion (fixed T = 1000), then evaluates on *disjoint*
images: the rest of the CIFAR-10 test set and of the tuning OOD set, and the other OOD sets.
Defaults (image sources are ``FILE.npz[start:stop:step]``, relative to ``--data``):

* tune:     ID ``cifar10_test_jpeg_yoongikim.npz[0:10000:10]`` (1,000 images, 100 per class — the
            file is sorted by class), OOD ``tin_crop=ood/tin_crop.npz[0:1000]``;
* evaluate: ID ``cifar10_test_jpeg_yoongikim.npz[1:10000:5]`` (2,000, disjoint from the tuning
            images), OOD ``tin_crop[1000:3000]``, ``mnist_test_pad[0:2000]``, ``photo_crops[0:2000]``.

``--tuning FILE`` skips the paper-mode search and uses a ``tuning.json`` from ``odin-audit tune``.
Prints a Markdown table (percent) and exits 1 if tuned ODIN's FPR@95TPR does not beat MSP's on
every evaluation set. ``../shared/data`` is resolved against the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from odin_engine.loading import load_model
from odin_engine.metrics import all_metrics
from odin_engine.scorer import OdinScorer
from odin_engine.decide.tuning import load_source, load_tuning, tune_id_only, tune_paper, tuning_document

REPO = Path(__file__).resolve().parents[1]
ID_FILE = "cifar10_test_jpeg_yoongikim.npz"
DEFAULTS = {
    "tune_id": f"{ID_FILE}[0:10000:10]",
    "tune_ood": "tin_crop=ood/tin_crop.npz[0:1000]",
    "eval_id": f"{ID_FILE}[1:10000:5]",
    "eval_ood": ["tin_crop=ood/tin_crop.npz[1000:3000]", "mnist_test_pad=ood/mnist_test_pad.npz[0:2000]",
                 "photo_crops=ood/photo_crops.npz[0:2000]"],
}
KEYS = ("fpr_at_tpr", "detection_error", "auroc", "aupr_in", "aupr_out")


def _named(spec: str) -> tuple[str, str]:
    name, _, src = spec.partition("=")
    return name, src


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="test-bed folder (relative paths: from the repo root)")
    ap.add_argument("--weights", default="weights/resnet20-12fca82f.th", help="relative to --data")
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--tune-id", default=DEFAULTS["tune_id"])
    ap.add_argument("--tune-ood", default=DEFAULTS["tune_ood"], help="NAME=FILE.npz[slice]")
    ap.add_argument("--eval-id", default=DEFAULTS["eval_id"])
    ap.add_argument("--eval-ood", action="append", default=None, help="NAME=FILE.npz[slice] (repeatable)")
    ap.add_argument("--tuning", default=None, help="tuning.json from `odin-audit tune` (skips the paper-mode search)")
    ap.add_argument("--write-tuning", default=None, help="write the paper-mode result here as tuning.json")
    ap.add_argument("--id-only-temperature", type=float, default=1000.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)

    data = Path(args.data)
    data = data if data.is_absolute() else (REPO / data)
    if not (data / ID_FILE).is_file():
        print(f"test-bed data not found at {data} (expected {ID_FILE} there; see ../shared/data/PROVENANCE.md)",
              file=sys.stderr)
        return 2
    model = load_model(args.model, data / args.weights)
    size = model.input_size
    src = lambda s: str(data / s)  # noqa: E731
    t0 = time.perf_counter()
    tune_id, _ = load_source(src(args.tune_id), size)
    tune_ood_name, tune_ood_src = _named(args.tune_ood)
    eval_id, _ = load_source(src(args.eval_id), size)
    eval_ood = {n: load_source(src(s), size)[0] for n, s in map(_named, args.eval_ood or DEFAULTS["eval_ood"])}
    print(f"[data] tune: {len(tune_id)} ID; evaluate: {len(eval_id)} ID, "
          + ", ".join(f"{n} {len(x)}" for n, x in eval_ood.items()), flush=True)

    base = OdinScorer(model, device=args.device, batch_size=args.batch_size)
    timings = {}
    if args.tuning:
        T, eps = load_tuning(args.tuning, expect_model_id=model.model_id)
        paper = {"source": args.tuning, "temperature": T, "epsilon": eps}
    else:
        tune_ood = {tune_ood_name: load_source(src(tune_ood_src), size)[0]}
        print(f"[tune] paper grid on {len(tune_id)} ID + {len(tune_ood[tune_ood_name])} {tune_ood_name} …", flush=True)
        res = tune_paper(base, tune_id, tune_ood)
        timings["tune_paper_s"] = res["scoring_seconds"]
        T, eps = res["temperature"], res["epsilon"]
        paper = {"temperature": T, "epsilon": eps, "objective": res["objective"], "ood_sets": res["ood_sets"]}
        if args.write_tuning:
            doc = tuning_document(res, model.model_id, {"heldout": {"source": args.tune_id, "n": len(tune_id)},
                                                         "ood": {tune_ood_name: {"source": tune_ood_src}}})
            Path(args.write_tuning).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"[tune] paper: T={T:g} ε={eps:g}", flush=True)
    idonly = tune_id_only(base, tune_id, args.id_only_temperature)
    timings["tune_id_only_s"] = idonly["scoring_seconds"]
    print(f"[tune] id-only: T={idonly['temperature']:g} ε={idonly['epsilon']:g}", flush=True)

    settings = {"default ODIN": (1000.0, 0.0014), "tuned ODIN (paper)": (T, eps),
                "tuned ODIN (id-only)": (idonly["temperature"], idonly["epsilon"])}
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # setting -> set -> columns
    t1 = time.perf_counter()
    for label, (t, e) in settings.items():
        sc = OdinScorer(model, temperature=t, epsilon=e, device=args.device, batch_size=args.batch_size)
        scores[label] = {"id": sc.score(eval_id), **{n: sc.score(x) for n, x in eval_ood.items()}}
    timings["evaluate_s"] = time.perf_counter() - t1
    methods = {"MSP": ("default ODIN", "msp"), "energy": ("default ODIN", "energy"),
               **{label: (label, "odin") for label in settings}}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for n in eval_ood:
        results[n] = {m: all_metrics(scores[s]["id"][col], scores[s][n][col]) for m, (s, col) in methods.items()}
    beats = {n: results[n]["tuned ODIN (paper)"]["fpr_at_tpr"] < results[n]["MSP"]["fpr_at_tpr"] for n in eval_ood}

    lines = [f"Settings: default ODIN T=1000 ε=0.0014; tuned (paper) T={T:g} ε={eps:g}; "
             f"tuned (id-only) T={idonly['temperature']:g} ε={idonly['epsilon']:g}", "",
             "| OOD set (n) | method | FPR@95TPR ↓ | detection error ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |",
             "|---|---|---|---|---|---|---|"]
    for n in eval_ood:
        for m in methods:
            r = results[n][m]
            lines.append(f"| {n} ({len(eval_ood[n])}) | {m} | " + " | ".join(f"{100 * r[k]:.1f}" for k in KEYS) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"\ntuned ODIN (paper) beats MSP's FPR@95TPR on every set: {all(beats.values())} {beats}")
    timings["total_s"] = time.perf_counter() - t0
    print("timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()) + f"; device={args.device}, "
          f"torch threads={torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model_id": model.model_id, "paper": paper, "id_only": {k: idonly[k] for k in ("temperature", "epsilon", "objective")},
            "id_only_grid": idonly["grid"], "settings": {k: list(v) for k, v in settings.items()},
            "sources": {"tune_id": args.tune_id, "tune_ood": args.tune_ood, "eval_id": args.eval_id,
                        "eval_ood": args.eval_ood or DEFAULTS["eval_ood"]},
            "n": {"tune_id": len(tune_id), "eval_id": len(eval_id), **{n: len(x) for n, x in eval_ood.items()}},
            "results": results, "beats_msp": beats, "timings_s": timings, "device": args.device
        }, indent=2) + "\n")
    return 0 if all(beats.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
