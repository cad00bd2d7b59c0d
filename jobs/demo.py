"""Built-in demo, no download: train a digits CNN, audit digits + photo crops + noise on a local Ray cluster."""

from __future__ import annotations

import time

_T_START = time.time()  # before the heavy imports: the demo's wall time counts them

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from jobs import options
from jobs.options import run_main
from odin_engine.errors import ConfigError
from odin_engine.settings import DEFAULT_EPSILON, DEFAULT_TEMPERATURE

MODEL_SPEC = "odin_engine.demo.model:build"


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train (once, cached) a small CNN on scikit-learn's bundled digits, write held-out digits and a "
        "corpus of unseen digits mixed with out-of-distribution images (crops of scikit-learn's sample "
        "photos, and noise) as PNG files, run the full audit on a local Ray cluster (score, calibrate, "
        "flag, report) and print how many of each kind were flagged."
    )
    parser.add_argument("--output", metavar="DIR", default="out/demo",
                        help="where the images, the audit outputs and the HTML report go")
    parser.add_argument("--heldout", type=int, default=400, metavar="N",
                        help="held-out digits for calibration (at least 100 for --tpr 0.95)")
    parser.add_argument("--corpus-id", type=int, default=300, metavar="N", help="unseen digits in the corpus")
    parser.add_argument("--corpus-ood", type=int, default=200, metavar="N",
                        help="out-of-distribution images in the corpus (half photo crops, half noise)")
    parser.add_argument("--eval-ood", type=int, default=100, metavar="N",
                        help="images in each labelled OOD set (photos, noise) for the report's evaluation "
                             "(MSP vs energy vs ODIN: FPR@TPR, AUROC, …); 0 skips the evaluation")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="ODIN temperature T")
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON, help="ODIN perturbation ε (pixel units)")
    options.add_tpr_option(parser, help="share of held-out digits kept above δ")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the demo model")
    # defaults resolved in run(): reading them here would import the model code (torch) for --help
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo recipe's)")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="trained-model cache, keyed by a hash of the training recipe "
                             "(default: $ODIN_AUDIT_CACHE, else $XDG_CACHE_HOME/odin-audit, else ~/.cache/odin-audit)")
    parser.add_argument("--retrain", action="store_true", help="train again even if the cache has the model")
    options.add_quiet_option(parser, help="no progress output from the scoring runs (Ray Data's bars or log lines); "
                                          "the demo's own lines and summary are still printed")
    parser.add_argument("--fresh", action="store_true",
                        help="delete an earlier demo's audit outputs under --output first (else the audit resumes "
                             "them, and refuses them if the sizes or settings changed)")


def _check(args: argparse.Namespace) -> None:
    from odin_engine.demo.data import N_DIGITS, TRAIN_SIZE

    unseen = N_DIGITS - TRAIN_SIZE
    if args.heldout < 1 or args.corpus_id < 0 or args.corpus_ood < 0 or args.eval_ood < 0:
        raise ConfigError("--heldout must be >= 1 and --corpus-id/--corpus-ood/--eval-ood >= 0")
    if args.heldout + args.corpus_id > unseen:
        raise ConfigError(f"--heldout + --corpus-id must be <= {unseen} (the digits kept out of training)")
    from odin_engine.settings import CalibrationSettings, OdinSettings, check_heldout_size

    OdinSettings(args.temperature, args.epsilon)
    check_heldout_size(args.heldout, CalibrationSettings(args.tpr).tpr, "held-out digits (--heldout)")
    if args.corpus_id + args.corpus_ood < 1:
        raise ConfigError("the corpus is empty: give --corpus-id or --corpus-ood > 0")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError("--epochs must be >= 1")


def _audit(args: argparse.Namespace, images, ood_sets: dict[str, Path], weights: Path, out: Path) -> dict[str, Any]:
    """The audit stage on a local Ray cluster; returns where its outputs are."""
    from jobs import audit as audit_job
    from jobs.options import run_main as _run_main

    argv = [
        "--corpus", str(images.corpus_manifest), "--heldout", str(images.heldout_dir),
        "--output", str(out), "--model", MODEL_SPEC, "--weights", str(weights),
        "--temperature", repr(args.temperature), "--epsilon", repr(args.epsilon), "--tpr", repr(args.tpr),
    ]
    for name, path in ood_sets.items():
        argv += ["--ood", f"{name}={path}"]
    if args.quiet:
        argv.append("--quiet")
    if args.verbose:
        argv.append("--verbose")
    print("[demo] running the audit on a local Ray cluster (score held-out digits, corpus and OOD sets → "
          "calibrate δ → flag → evaluate → report); the same as:\n"
          f"       odin-audit audit {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    rc = _run_main(audit_job.build_parser, audit_job.run, argv, prog="odin-audit audit", section="audit")
    return {"rc": rc, "report": out / "report.html"}


def _summarize(audit_out: Path, manifest: Path) -> dict[str, Any]:
    """Flag rates by ground truth (the manifest's label column and the image kind)."""
    import pandas as pd

    from odin_engine.demo.data import image_kind
    from odin_engine.io.results import current, open_flags
    from odin_engine.io.store import Store

    out = current(Store(str(audit_out)))  # the audit's current complete result (its JSON files)
    flags = open_flags(str(audit_out)).to_pandas(["image_id", "is_outlier"])  # and its flags version
    truth = pd.read_csv(manifest, dtype=str)[["image_id", "label"]]
    df = flags.merge(truth, on="image_id", how="right")
    if df["is_outlier"].isna().any():
        missing = df.loc[df["is_outlier"].isna(), "image_id"].head(5).tolist()
        raise RuntimeError(f"some corpus images have no flag (errors or missing rows), e.g. {missing}")
    df["kind"] = df["image_id"].map(image_kind)
    groups: dict[str, dict[str, Any]] = {}

    def add(name: str, sub) -> None:
        n = int(len(sub))
        k = int(sub["is_outlier"].astype(bool).sum())
        groups[name] = {"n": n, "flagged": k, "rate": (k / n) if n else None}

    add("id_digits", df[df["label"] == "id"])
    add("ood_photos", df[df["kind"] == "photo"])
    add("ood_noise", df[df["kind"] == "noise"])
    add("ood_all", df[df["label"] == "ood"])
    cal = out.read_json("calibration.json") or {}
    evaluation = None
    ev = out.read_json("evaluation.json")
    if ev is not None:
        evaluation = {name: {m: {k: e["metrics"][m][k] for k in ("fpr_at_tpr", "auroc")} for m in e["metrics"]}
                      for name, e in ev.get("sets", {}).items()}
    return {"groups": groups, "evaluation": evaluation, "delta": cal.get("delta"), "n_heldout": cal.get("n_heldout"),
            "tpr_ci": cal.get("tpr_ci"), "method": cal.get("method", "odin")}


def _process_start() -> float:
    """When this process started (Linux: from /proc, so Python's and torch's start-up count), else
    when this module was imported."""
    import os

    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _T_START


def _fmt_rate(g: dict[str, Any]) -> str:
    return f"{g['flagged']:>5} / {g['n']:<5} {100 * g['rate']:6.1f}%" if g["n"] else "    (none in corpus)"


def run(args: argparse.Namespace) -> int:
    _check(args)
    import shutil

    from odin_engine.demo import model as demo_model
    from odin_engine.demo.data import write_demo_images, write_ood_sets

    t0, t0_wall = time.perf_counter(), time.time()
    root = Path(args.output).resolve()
    audit_out = root / "audit"
    if args.fresh and audit_out.exists():
        shutil.rmtree(audit_out)
    resuming = audit_out.exists()
    # 1. the model: trained once per recipe, then read from the cache
    recipe = demo_model.Recipe(seed=args.seed, **({} if args.epochs is None else {"epochs": args.epochs}))
    weights, info = demo_model.cached_weights(recipe, args.cache_dir, retrain=args.retrain)
    how = "cached" if info.get("cached") else f"trained in {info['train_seconds']:.1f} s"
    print(f"[demo] model {MODEL_SPEC} ({how}; accuracy on the {info['n_unseen']} digits kept out of "
          f"training: {100 * info['unseen_accuracy']:.1f}%): {weights}, copied to {root / 'demo-model.pt'}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    local_weights = root / "demo-model.pt"  # a copy beside the outputs, for trying the other commands on them
    shutil.copyfile(weights, local_weights)
    weights = local_weights
    t_model = time.perf_counter()
    # 2. the images, as PNG files; the manifest's label column is the ground truth
    shutil.rmtree(root / "images", ignore_errors=True)  # the demo's own files: always written afresh
    images = write_demo_images(root / "images", n_heldout=args.heldout, n_corpus_id=args.corpus_id,
                               n_corpus_ood=args.corpus_ood)
    c = images.counts
    print(f"[demo] wrote {c['heldout_id']} held-out digits to {images.heldout_dir} and a corpus of "
          f"{c['corpus_id']} digits + {c['corpus_ood_photo']} photo crops + {c['corpus_ood_noise']} noise "
          f"images ({images.corpus_manifest})", flush=True)
    ood_sets = write_ood_sets(root / "images", args.eval_ood)
    if ood_sets:
        print("[demo] wrote labelled OOD sets for the evaluation: "
              + ", ".join(f"{k} ({args.eval_ood} images) {v}" for k, v in ood_sets.items()), flush=True)
    t_images = time.perf_counter()
    # 3. the audit: score → calibrate → flag → report, on a local Ray cluster
    paths = _audit(args, images, ood_sets, weights, audit_out)
    if paths["rc"] != 0:
        hint = (f" {audit_out} holds an earlier demo's audit: if its sizes or settings differ, rerun with --fresh "
                "or pick another --output." if resuming else "")
        print(f"[demo] the audit stage stopped with exit code {paths['rc']} (message above).{hint}", file=sys.stderr)
        return paths["rc"]
    t_audit = time.perf_counter()
    # 4. the summary
    s = _summarize(audit_out, images.corpus_manifest)
    g = s["groups"]
    summary = {
        "model": {"spec": MODEL_SPEC, "weights": str(weights), **{k: info[k] for k in ("key", "unseen_accuracy")},
                  "cached": bool(info.get("cached"))},
        "temperature": args.temperature, "epsilon": args.epsilon, "tpr": args.tpr,
        **s,
        "seconds": {"model": round(t_model - t0, 2), "images": round(t_images - t_model, 2),
                    "audit": round(t_audit - t_images, 2), "total": round(time.perf_counter() - t0, 2)},
        "outputs": {"root": str(root), "audit": str(audit_out), "report": str(paths["report"])},
    }
    import ray

    if ray.is_initialized():  # stop the local cluster now, so that the time below includes it
        ray.shutdown()
    started = _process_start()
    summary["seconds"]["command"] = round(time.time() - started, 2)
    # before t0: Python start-up and the imports (torch, Ray), slowest on a first run (cold disk cache);
    # after the audit: the summary and stopping the local Ray cluster
    summary["seconds"]["startup"] = round(t0_wall - started, 2)
    sec = summary["seconds"]
    sec["finish"] = round(sec["command"] - sec["startup"] - sec["model"] - sec["images"] - sec["audit"], 2)
    from odin_engine.io.store import Store

    Store(str(root)).write_json("demo-summary.json", summary)
    lo_hi = s.get("tpr_ci") or [float("nan"), float("nan")]
    print()
    print(f"ODIN demo: T={args.temperature:g}, ε={args.epsilon:g}; threshold δ={s['delta']:.6g} keeps "
          f"{100 * args.tpr:g}% of {s['n_heldout']} held-out digits (TPR on new digits, 95% CI "
          f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}])")
    print("flagged as out-of-distribution:")
    print(f"  in-distribution digits   {_fmt_rate(g['id_digits'])}")
    print(f"  OOD photo crops          {_fmt_rate(g['ood_photos'])}")
    print(f"  OOD noise                {_fmt_rate(g['ood_noise'])}")
    print(f"  OOD, all                 {_fmt_rate(g['ood_all'])}")
    if s.get("evaluation"):
        print(f"labelled OOD sets ({args.eval_ood} images each) vs the held-out digits, "
              f"FPR at {100 * args.tpr:g}% TPR (lower is better) / AUROC:")
        for name, per in s["evaluation"].items():
            cells = "   ".join(f"{m} {v['fpr_at_tpr']:.3f} / {v['auroc']:.3f}" for m, v in per.items())
            print(f"  {name:<8} {cells}")
    print(f"report:  {paths['report']}")
    print(f"outputs: {audit_out}  (scores/, flags/, calibration.json, …; summary: {root / 'demo-summary.json'})")
    print(f"wall time: {sec['command']:.1f} s since the command started (start-up and imports {sec['startup']:.1f} s, "
          f"model {sec['model']:.1f} s, images {sec['images']:.1f} s, audit {sec['audit']:.1f} s, "
          f"summary and Ray shutdown {sec['finish']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(build_parser, run, prog="python -m jobs.demo", section="demo"))
