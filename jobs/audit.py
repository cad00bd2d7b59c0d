"""The whole audit in one command: score held-out and corpus → calibrate δ → flag → evaluate → HTML report."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from jobs.options import add_config_option, add_normalization_options, run_main
from odin_engine.decide.calibration import calibrate_frames, min_heldout, write_json
from odin_engine.io.scores import SCORE_METHODS, read_scores
from odin_engine.settings import validate_method, validate_tpr
from odin_engine.errors import ConfigError

from odin_engine.settings import DEFAULT_EPSILON as DEFAULT_EPS, DEFAULT_TEMPERATURE as DEFAULT_T
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", metavar="SRC", help="images to audit: directory or manifest (as `score --input`)")
    parser.add_argument("--heldout", metavar="SRC",
                        help="held-out in-distribution images (directory or manifest) used to calibrate δ")
    parser.add_argument("--heldout-split", metavar="NAME", default=None,
                        help="instead of --heldout: the corpus manifest rows whose `split` column equals NAME "
                             "are the held-out set (and are not flagged)")
    parser.add_argument("--output", metavar="DIR", help="audit output directory; rerun the same command to resume")
    parser.add_argument("--model", metavar="SPEC", help="cifar_resnet20|32|44|56, torchvision:<name>, …")
    parser.add_argument("--weights", metavar="W", help="checkpoint file")
    add_normalization_options(parser)
    parser.add_argument("--tuning", metavar="JSON", help="tuning.json from `odin-audit tune` (sets T and ε)")
    parser.add_argument("--temperature", type=float, default=None, help=f"ODIN T; {DEFAULT_T:g} when neither this nor --tuning is given")
    parser.add_argument("--epsilon", type=float, default=None, help=f"ODIN ε; {DEFAULT_EPS:g} when neither this nor --tuning is given")
    parser.add_argument("--tpr", type=float, default=0.95, help="share of in-distribution images kept at or above δ")
    parser.add_argument("--method", default="odin", choices=SCORE_METHODS, help="score that δ thresholds")
    parser.add_argument("--ood", metavar="NAME=SRC", action="append", default=None,
                        help="labelled OOD set for evaluation (repeatable)")
    parser.add_argument("--class-names", default=None, help="comma-separated class names for the report")
    parser.add_argument("--gallery", type=int, default=24, help="anomalous images shown in the report")
    parser.add_argument("--batch-size", type=int, default=256, help="images per scoring call")
    parser.add_argument("--workers", type=int, default=None, help="scoring actors (default: one per GPU, else 1)")
    parser.add_argument("--resize", default="crop", choices=("crop", "stretch"),
                        help="crop: centred square then resize; stretch: resize the whole image")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow checkpoints that need arbitrary pickles (can execute code: trusted files only)")
    parser.add_argument("--ray-address", default=None, help="Ray address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_option(parser)


def parse_ood(specs: Sequence[str] | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for spec in specs or []:
        name, sep, src = str(spec).partition("=")
        if not sep or not name or not src:
            raise ConfigError(f"--ood must be NAME=SRC (e.g. --ood svhn=/data/svhn); got {spec!r}")
        if not set(name) <= _NAME_OK or name in ("heldout", "corpus"):
            raise ConfigError(f"--ood name {name!r} must use letters, digits, _ - . and not be heldout/corpus")
        out.append((name, src))
    names = [n for n, _ in out]
    if len(names) != len(set(names)):
        raise ConfigError(f"--ood names must differ; got {names}")
    return out


def _validate(args: argparse.Namespace) -> tuple[float, float, str, list[tuple[str, str]]]:
    for name in ("corpus", "output", "model"):
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required")
    if bool(args.heldout) == bool(args.heldout_split):
        raise ConfigError("give exactly one of --heldout SRC or --heldout-split NAME")
    validate_tpr(args.tpr)
    validate_method(args.method)
    if args.gallery < 0:
        raise ConfigError("--gallery must be >= 0")
    from odin_engine.decide.tuning import resolve_settings

    t, e, origin = resolve_settings(args.tuning, args.temperature, args.epsilon)
    ood = parse_ood(args.ood)
    _check_heldout_size(args)
    if args.class_names:  # one name per model class, checked before anything is scored
        from odin_engine.loading import load_model

        load_model(args.model, args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
                   unsafe_pickle=args.unsafe_pickle).check_class_names(args.class_names)
    return t, e, origin, ood


def _check_heldout_size(args: argparse.Namespace) -> None:
    """Too few held-out images is a configuration error, found by listing them before anything is scored."""
    from odin_engine.io.corpus import load_corpus

    need = min_heldout(args.tpr)
    if args.heldout:
        n, what = len(load_corpus(str(args.heldout))), f"--heldout {args.heldout}"
    else:
        table = load_corpus(str(args.corpus)).table
        if "split" not in table.column_names:
            raise ConfigError("--heldout-split needs a corpus manifest with a `split` column")
        n = sum(1 for v in table.column("split").to_pylist() if v is not None and str(v) == args.heldout_split)
        what = f"corpus rows with split == {args.heldout_split!r}"
    if n < need:
        raise ConfigError(f"{what} has {n} images; a {args.tpr:g} TPR target needs at least {need} held-out "
                          "in-distribution images (= ceil(5 / (1 - tpr)), so that at least 5 fall below δ)")


def audit(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage; returns the audit.json dict. Reruns resume: finished images are not rescored."""
    t, e, origin, ood_specs = _validate(args)
    from jobs.score import score_corpus

    out = Path(args.output)
    kw = dict(model=args.model, weights=args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
              # score_corpus refuses a tuning file made for another model before scoring anything
              **({"tuning": args.tuning} if args.tuning else {"temperature": t, "epsilon": e}),
              batch_size=args.batch_size,
              workers=args.workers, resize=args.resize, unsafe_pickle=args.unsafe_pickle,
              ray_address=args.ray_address, verbose=not args.quiet)
    t0 = time.time()
    runs: dict[str, dict[str, Any]] = {}
    jobs = [("corpus", args.corpus, out / "corpus")]
    if args.heldout:
        jobs.insert(0, ("heldout", args.heldout, out / "heldout"))
    jobs += [(f"ood/{name}", src, out / "ood" / name) for name, src in ood_specs]
    for what, src, dest in jobs:
        r = score_corpus(str(src), str(dest), **kw)
        runs[what] = {"source": str(src), "output": str(dest), "run_id": r["run_id"], "model_id": r["config"]["model_id"],
                      "counts": r["counts"],
                      "scored_this_run": r["attempts"][-1]["scored"],
                      "already_done": r["attempts"][-1]["already_done"],
                      "exactly_once": r["verification"]["exactly_once"]}
    t_scored = time.time()

    corpus = read_scores(out / "corpus")
    if args.heldout_split:
        if "split" not in corpus.columns:
            raise ConfigError("--heldout-split needs a corpus manifest with a `split` column")
        mask = corpus["split"].astype("string") == args.heldout_split
        heldout, corpus = corpus[mask.fillna(False)], corpus[~mask.fillna(False)]
        if heldout.empty:
            raise ConfigError(f"no corpus row has split == {args.heldout_split!r}")
    else:
        heldout = read_scores(out / "heldout")
    need = min_heldout(args.tpr)
    if int((heldout["status"] == "ok").sum()) < need:
        raise ConfigError(f"{int((heldout['status'] == 'ok').sum())} held-out images were scored; a {args.tpr:g} "
                          f"TPR target needs at least {need} (= ceil(5 / (1 - tpr)))")

    from odin_engine.decide.evaluation import evaluate_frames
    from odin_engine.decide.flagging import flag, summarize, write_flags
    from odin_engine.report import render_report, write_report

    cal = calibrate_frames(corpus, heldout, tpr=args.tpr, method=args.method)
    cal["settings_from"] = origin
    cal["sources"] = {"corpus": args.corpus, "heldout": args.heldout or f"corpus split == {args.heldout_split}"}
    class_names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    flags = flag(corpus, cal["delta"], args.method)
    summary = summarize(flags, class_names)
    cal["summary"] = summary["overall"]
    evaluation, ood_frames = None, {}
    if ood_specs:
        ood_frames = {name: read_scores(out / "ood" / name) for name, _ in ood_specs}
        evaluation = evaluate_frames(heldout, ood_frames, tpr=args.tpr)
    write_flags(flags, out)
    write_json(out / "flag_summary.json", {"delta": cal["delta"], "method": args.method, **summary})
    write_json(out / "calibration.json", cal)
    if evaluation is not None:
        write_json(out / "evaluation.json", evaluation)
    doc = {
        "version": 1,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_spec": args.model,
        "model_id": runs["corpus"]["model_id"],
        "temperature": t,
        "epsilon": e,
        "settings_from": origin,
        "method": args.method,
        "tpr": args.tpr,
        "delta": cal["delta"],
        "summary": summary["overall"],
        "score_runs": runs,
        "durations_s": {"scoring": round(t_scored - t0, 3), "total": round(time.time() - t0, 3)},
        "outputs": {"calibration": "calibration.json", "flags": "flags/flags.parquet",
                    "flag_summary": "flag_summary.json", "report": "report.html",
                    **({"evaluation": "evaluation.json"} if evaluation is not None else {})},
    }
    metadata = {k: doc[k] for k in ("model_spec", "model_id", "temperature", "epsilon", "settings_from", "method",
                                    "tpr", "finished_at")}
    metadata.update({f"run_id ({k})": v["run_id"] for k, v in runs.items()})
    metadata.update({f"images scored this run ({k})": v["scored_this_run"] for k, v in runs.items()})
    metadata["scoring seconds (this run)"] = doc["durations_s"]["scoring"]
    html_text = render_report(calibration=cal, heldout=heldout, flags=flags, summary=summary, evaluation=evaluation,
                              ood=ood_frames or None, metadata=metadata, gallery_size=args.gallery,
                              title=f"odin-audit: {args.corpus}")
    write_report(out / "report.html", html_text)
    doc["durations_s"]["total"] = round(time.time() - t0, 3)
    write_json(out / "audit.json", doc)
    return doc


def run(args: argparse.Namespace) -> int:
    doc = audit(args)
    s = doc["summary"]
    if not args.quiet:
        print(f"odin audit: δ={doc['delta']:.6g} ({doc['method']}, T={doc['temperature']:g}, ε={doc['epsilon']:g}); "
              f"{s['n_outliers']} of {s['n_ok']} corpus images flagged ({100 * (s['outlier_rate'] or 0):.1f}%), "
              f"{s['n_error']} errors; report: {Path(args.output) / 'report.html'}", flush=True)
    bad = [k for k, v in doc["score_runs"].items() if not v["exactly_once"]]
    if bad:
        print(f"odin audit: score runs {bad} did not verify exactly-once; see their run.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(build_parser, run, prog="python -m jobs.audit", section="audit"))
