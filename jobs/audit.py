"""The whole audit in one command: score held-out and corpus → calibrate δ → flag → evaluate → HTML report.

Stages (each a function below, so that a frozen δ or a history append can slot in):
``_check`` (everything that can be checked before anything is written) → ``_score`` →
``_open_tables`` → ``_calibrate`` → ``flagging.prepare`` (the flag pass's checks and rank
plan) → ``_evaluate`` → ``_write`` (flags, summaries, calibration.json, report.html,
audit.json last). Nothing after scoring writes until every check of the decision stage passed.

Exit codes: 0 done; 1 a score run did not verify exactly-once; 2 bad configuration, nothing
written; 3 scoring finished (its outputs are kept, a rerun resumes them) but the decision stage
could not run on what was scored — e.g. too few held-out images decoded.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from jobs import options
from jobs.calibrate import CALIBRATION_JSON, FLAG_SUMMARY_JSON, FLAGS_DIR, publish_flags
from jobs.options import describe, run_main
from odin_engine.errors import ConfigError
from odin_engine.settings import CalibrationSettings, OdinSettings, check_heldout_size

EXIT_AFTER_SCORING = 4
EVALUATION_JSON, REPORT_HTML, AUDIT_JSON = "evaluation.json", "report.html", "audit.json"


class DecisionError(Exception):
    """The decision stage failed after scoring wrote its outputs (exit 4, not 2)."""


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", metavar="SRC", help="images to audit: directory or manifest (as `score --input`)")
    parser.add_argument("--heldout", metavar="SRC",
                        help="held-out in-distribution images (directory or manifest) used to calibrate δ")
    parser.add_argument("--heldout-split", metavar="NAME", default=None,
                        help="instead of --heldout: the corpus manifest rows whose `split` column equals NAME "
                             "are the held-out set (and are not flagged)")
    parser.add_argument("--output", metavar="DIR", help="audit output directory (local, s3://, gs://); rerun the same command to resume")
    options.add_model_options(parser)
    options.add_odin_options(parser)
    options.add_tpr_option(parser)
    options.add_method_option(parser)
    parser.add_argument("--ood", metavar="NAME=SRC", action="append", default=None,
                        help="labelled OOD set for evaluation (repeatable)")
    parser.add_argument("--class-names", default=None, help="comma-separated class names for the report")
    parser.add_argument("--gallery", type=int, default=24, help="anomalous images shown in the report")
    options.add_batch_size_option(parser)
    options.add_workers_option(parser)
    options.add_resize_option(parser)
    options.add_ray_options(parser)
    options.add_quiet_option(parser)
    options.add_config_option(parser)


def parse_ood(specs: Sequence[str] | None) -> list[tuple[str, str]]:
    return options.parse_named_sources(specs, "--ood", reserved=("heldout", "corpus"), require_name=True)


@dataclass
class AuditPlan:
    """What the audit will do, checked before anything is written."""

    odin: OdinSettings
    calibration: CalibrationSettings
    out: Any  # Store
    ood: list[tuple[str, str]]
    class_names: list[str] | None
    jobs: list[tuple[str, str, str]] = field(default_factory=list)  # (name, source, sub-folder of out)


def _check(args: argparse.Namespace) -> AuditPlan:
    """Every check that needs no scoring: flags, settings, tuning file, sources listed, held-out size."""
    from odin_engine.io.store import Store

    for name in ("corpus", "output", "model"):
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required")
    if bool(args.heldout) == bool(args.heldout_split):
        raise ConfigError("give exactly one of --heldout SRC or --heldout-split NAME")
    cal = CalibrationSettings(args.tpr, args.method)
    if args.gallery < 0:
        raise ConfigError("--gallery must be >= 0")
    odin = OdinSettings.resolve(args.tuning, args.temperature, args.epsilon)
    ood = parse_ood(args.ood)
    out = Store(str(args.output))
    try:
        if out.is_file():
            raise ConfigError(f"--output {args.output} is a file; give a directory (local, s3://, gs://)")
    except OSError as exc:
        raise ConfigError(f"cannot read --output {args.output}: {exc}") from exc
    jobs = [("corpus", str(args.corpus), "corpus")]
    if args.heldout:
        jobs.insert(0, ("heldout", str(args.heldout), "heldout"))
    jobs += [(f"ood/{name}", src, f"ood/{name}") for name, src in ood]
    _check_sources(args, jobs, cal)
    class_names = None
    if args.class_names:  # one name per model class, checked before anything is scored
        from odin_engine.loading import load_model

        class_names = load_model(args.model, args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
                                 unsafe_pickle=args.unsafe_pickle).check_class_names(args.class_names)
    return AuditPlan(odin, cal, out, ood, class_names, jobs)


def _check_sources(args: argparse.Namespace, jobs: list[tuple[str, str, str]], cal: CalibrationSettings) -> None:
    """List every source (a missing one fails here, not after the first is scored) and check the
    held-out size on the listing."""
    from odin_engine.io.corpus import load_corpus

    listed = {}
    for name, src, _ in jobs:
        try:
            listed[name] = load_corpus(src)
        except ConfigError as exc:
            raise ConfigError(f"{name} source: {exc}") from exc
    if args.heldout:
        n, what = len(listed["heldout"]), f"images in --heldout {args.heldout}"
    else:
        table = listed["corpus"].table
        if "split" not in table.column_names:
            raise ConfigError("--heldout-split needs a corpus manifest with a `split` column")
        n = sum(1 for v in table.column("split").to_pylist() if v is not None and str(v) == args.heldout_split)
        what = f"corpus rows with split == {args.heldout_split!r}"
    check_heldout_size(n, cal.tpr, what)


# --------------------------------------------------------------------------- stages
def _score(args: argparse.Namespace, plan: AuditPlan) -> dict[str, dict[str, Any]]:
    """Score every set into ``<output>/<set>/`` (a rerun resumes; finished images are not rescored)."""
    from jobs.score import score_corpus

    kw = dict(model=args.model, weights=args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
              # score_corpus refuses a tuning file made for another model before scoring anything
              **({"tuning": args.tuning} if args.tuning else
                 {"temperature": plan.odin.temperature, "epsilon": plan.odin.epsilon}),
              batch_size=args.batch_size, workers=args.workers, resize=args.resize,
              unsafe_pickle=args.unsafe_pickle, ray_address=args.ray_address, verbose=not args.quiet,
              print_summary=not args.quiet)
    runs: dict[str, dict[str, Any]] = {}
    for name, src, sub in plan.jobs:
        r = score_corpus(src, plan.out.uri(sub), **kw)
        runs[name] = {"source": src, "output": plan.out.uri(sub), "run_id": r["run_id"],
                      "model_id": r["config"]["model_id"], "counts": r["counts"],
                      "scored_this_run": r["attempts"][-1]["scored"],
                      "already_done": r["attempts"][-1]["already_done"],
                      "exactly_once": r["verification"]["exactly_once"]}
    return runs


def _open_tables(args: argparse.Namespace, plan: AuditPlan):
    """(corpus, held-out, {ood name: table}) score tables; with --heldout-split, two filters of one table."""
    import pyarrow.compute as pc

    from odin_engine.io.scores import ScoreTable

    corpus = ScoreTable.open(plan.out.uri("corpus"), "corpus scores")
    if args.heldout_split:
        if "split" not in corpus.columns:
            raise ConfigError("--heldout-split needs a corpus manifest with a `split` column")
        in_split = pc.field("split") == args.heldout_split
        heldout = corpus.where(in_split)
        corpus = corpus.where(pc.field("split").is_null() | ~in_split)
    else:
        heldout = ScoreTable.open(plan.out.uri("heldout"), "held-out scores")
    ood = {name: ScoreTable.open(plan.out.uri("ood", name), f"OOD set {name!r} scores") for name, _ in plan.ood}
    return corpus, heldout, ood


def _calibrate(args: argparse.Namespace, plan: AuditPlan, corpus, heldout) -> dict[str, Any]:
    from odin_engine.decide.calibration import calibrate_tables

    cal = calibrate_tables(corpus, heldout, plan.calibration)
    cal["settings_from"] = plan.odin.origin
    cal["sources"] = {"corpus": args.corpus, "heldout": args.heldout or f"corpus split == {args.heldout_split}"}
    return cal


def _evaluate(args: argparse.Namespace, plan: AuditPlan, heldout, ood):
    if not ood:
        return None, None
    from odin_engine.decide.evaluation import evaluate_tables

    return evaluate_tables(heldout, ood, tpr=plan.calibration.tpr)


def _write(args: argparse.Namespace, plan: AuditPlan, runs, cal, flag_plan, heldout, evaluation, roc,
           t0: float, t_scored: float) -> dict[str, Any]:
    """Flags, then the JSON summaries, the report, and audit.json last."""
    import numpy as np

    from odin_engine.decide.calibration import heldout_scores
    from odin_engine.decide.flagging import summarize
    from odin_engine.report import display_scale, histogram_edges, render_report

    out, method = plan.out, plan.calibration.method
    h_scores, _ = heldout_scores(heldout, method)
    scale = display_scale(method, cal["delta"], cal["temperature"])
    edges = histogram_edges(scale, h_scores, flag_plan.stats.lo, flag_plan.stats.hi)
    flags = publish_flags(flag_plan, out, gallery=args.gallery, hist_edges=edges)
    summary = summarize(flag_plan.stats, plan.class_names)
    cal["summary"] = summary["overall"]
    cal["flags"] = {"path": FLAGS_DIR, "files": len(flags.files), "rank_ranges": len(flag_plan.ranges)}
    out.write_json(FLAG_SUMMARY_JSON, {"delta": cal["delta"], "method": method, **summary})
    if evaluation is not None:
        out.write_json(EVALUATION_JSON, evaluation)
    out.write_json(CALIBRATION_JSON, cal)
    doc = {
        "version": 1,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_spec": args.model,
        "model_id": runs["corpus"]["model_id"],
        "temperature": plan.odin.temperature,
        "epsilon": plan.odin.epsilon,
        "settings_from": plan.odin.origin,
        "method": method,
        "tpr": plan.calibration.tpr,
        "delta": cal["delta"],
        "summary": summary["overall"],
        "score_runs": runs,
        "cluster": _cluster_used(),
        "durations_s": {"scoring": round(t_scored - t0, 3)},
        "outputs": {"calibration": CALIBRATION_JSON, "flags": FLAGS_DIR + "/", "flag_summary": FLAG_SUMMARY_JSON,
                    "report": REPORT_HTML, **({"evaluation": EVALUATION_JSON} if evaluation is not None else {})},
    }
    metadata = {k: doc[k] for k in ("model_spec", "model_id", "temperature", "epsilon", "settings_from", "method",
                                    "tpr", "finished_at")}
    metadata.update({f"run_id ({k})": v["run_id"] for k, v in runs.items()})
    metadata["scoring seconds (this run)"] = doc["durations_s"]["scoring"]
    html_text = render_report(
        calibration=cal, summary=summary, evaluation=evaluation, roc_scores=roc, runs=runs, metadata=metadata,
        histogram={"edges": edges, "heldout": np.histogram(h_scores, edges)[0], "corpus": flags.histogram},
        gallery=flags.gallery, errors=flags.errors, title=f"odin-audit: {args.corpus}")
    out.write_text(REPORT_HTML, html_text)
    doc["durations_s"]["total"] = round(time.time() - t0, 3)
    out.write_json(AUDIT_JSON, doc)
    return doc


def audit(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage; returns the audit.json dict. Reruns resume: finished images are not rescored.

    Raises ``ConfigError`` (nothing written) before scoring, ``DecisionError`` after it.
    """
    plan = _check(args)
    t0 = time.time()
    runs = _score(args, plan)
    t_scored = time.time()
    try:
        from odin_engine.decide.flagging import prepare

        corpus, heldout, ood = _open_tables(args, plan)
        cal = _calibrate(args, plan, corpus, heldout)
        flag_plan = prepare(corpus, cal["delta"], plan.calibration.method)
        evaluation, roc = _evaluate(args, plan, heldout, ood)
    except ConfigError as exc:
        raise DecisionError(
            f"scoring finished (its outputs are in {plan.out.uri()} and a rerun reuses them), but the decision "
            f"stage cannot run on what was scored: {describe(exc)}") from exc
    return _write(args, plan, runs, cal, flag_plan, heldout, evaluation, roc, t0, t_scored)


def _cluster_used() -> dict | None:
    from jobs.ray_utils import current_cluster

    c = current_cluster()
    return dict(c.as_dict(), summary=c.summary()) if c else None


def run(args: argparse.Namespace) -> int:
    try:
        doc = audit(args)
    except DecisionError as exc:
        print(f"odin-audit audit: error: {exc}", file=sys.stderr)
        return EXIT_AFTER_SCORING
    s = doc["summary"]
    if not args.quiet:
        where = f" (scored {doc['cluster']['summary']})" if doc.get("cluster") else ""
        print(f"odin audit: δ={doc['delta']:.6g} ({doc['method']}, T={doc['temperature']:g}, ε={doc['epsilon']:g}); "
              f"{s['n_outliers']} of {s['n_ok']} corpus images flagged ({100 * (s['outlier_rate'] or 0):.1f}%), "
              f"{s['n_error']} errors{where}; report: {args.output.rstrip('/')}/{REPORT_HTML}", flush=True)
    bad = [k for k, v in doc["score_runs"].items() if not v["exactly_once"]]
    if bad:
        print(f"odin audit: score runs {bad} did not verify exactly-once; see their run.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(build_parser, run, prog="python -m jobs.audit", section="audit"))
