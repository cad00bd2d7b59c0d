"""The whole audit in one command: score held-out and corpus → calibrate δ → flag → evaluate → HTML report.

Stages (each a function below):
``_check`` (everything that can be checked before anything is written, including a frozen
``--calibration`` against this model and these settings; sources checked in bounded memory) →
``_check_outputs`` (every set's score directory accepts this model and these settings, before the
first set is scored) → ``_score`` → ``_open_tables`` →
``_calibrate`` (δ from the held-out set, or the frozen calibration's) → ``flagging.prepare`` (the
flag pass's checks and rank plan) → ``_evaluate`` → ``_write`` (flags, summaries,
calibration.json, the drift test, the ``--history`` row, report.html, audit.json last). Nothing
after scoring writes until every check of the decision stage passed.

Exit codes: :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from jobs import options
from jobs.calibrate import (CALIBRATION_JSON, FLAG_SUMMARY_JSON, decision_line, flags_record, limits_line, output_lease,
                            plan_flags, publish_flags)
from jobs.options import EXIT_CONFIG, EXIT_RUNTIME, describe, run_main
from odin_engine.detectors.fit import DEFAULT_BANK_SIZE
from odin_engine.errors import ConfigError
from odin_engine.settings import DEFAULT_METHOD, DEFAULT_TPR, CalibrationSettings, OdinSettings

EXIT_OK, EXIT_EXACTLY_ONCE, EXIT_DRIFT, EXIT_AFTER_SCORING, EXIT_NO_DATA = 0, 1, 3, 4, 6
#: every exit code of `odin-audit audit` (README "Scheduled audits" lists them for users)
EXIT_CODES = {
    EXIT_OK: "done; no drift alarm (or no --fail-on-drift)",
    EXIT_EXACTLY_ONCE: "a score run finished but failed its exactly-once verification (see its run.json)",
    EXIT_CONFIG: "bad configuration: the message says what to fix; nothing is written",
    EXIT_DRIFT: "drift alarm: the drift test's p-value < --fail-on-drift; every output is written first",
    EXIT_AFTER_SCORING: "scoring finished (its outputs are kept, a rerun resumes them) but the decision stage "
                        "could not run on what was scored, e.g. too few held-out images decoded",
    EXIT_RUNTIME: "the run failed at run time (disk full, store unreachable, a Ray task failed): one line names "
                  "the cause and a log file with the traceback; finished work and the previous complete result "
                  "are kept, and the same command resumes",
    EXIT_NO_DATA: "no-data night (with --fail-on-drift): fewer than --min-ok corpus images scored ok, so there is "
                  "nothing to test; every output is written first and the history row records it",
}
EVALUATION_JSON, REPORT_HTML, AUDIT_JSON = "evaluation.json", "report.html", "audit.json"


class DecisionError(Exception):
    """The decision stage failed after scoring wrote its outputs (exit 4, not 2)."""


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", metavar="SRC", help="images to audit: directory or manifest (as `score --input`)")
    parser.add_argument("--heldout", metavar="SRC",
                        help="held-out in-distribution images (directory or manifest) used to calibrate δ "
                             "(ignored with --calibration)")
    parser.add_argument("--heldout-split", metavar="NAME", default=None,
                        help="instead of --heldout: the corpus manifest rows whose `split` column equals NAME "
                             "are the held-out set (and are not flagged)")
    parser.add_argument("--output", metavar="DIR", help="audit output directory (local, s3://, gs://); rerun the same command to resume")
    options.add_model_options(parser)
    parser.add_argument("--calibration", metavar="PATH",
                        help="reuse δ, T, ε and the score method of an earlier audit's calibration.json (or the "
                             "directory holding it; local, s3://, gs://) instead of scoring a held-out set; "
                             "refused when made for another model or other settings")
    parser.add_argument("--history", metavar="URI",
                        help="append one row per audit to the Delta table at this location (local, s3://, gs://; "
                             "created by the first audit; a folder of per-audit Parquet files is converted); "
                             "the report plots it")
    parser.add_argument("--fail-on-drift", metavar="ALPHA", type=float, default=None,
                        help="exit 3 (after writing every output) when the drift test's p-value < ALPHA, e.g. 0.01; "
                             "exit 6 when fewer than --min-ok corpus images scored ok")
    parser.add_argument("--min-ok", metavar="N", type=int, default=1,
                        help="with --fail-on-drift: a night with fewer ok corpus images than this is a no-data "
                             "night (exit 6)")
    options.add_odin_options(parser)
    options.add_tpr_option(parser, help=f"share of held-out in-distribution images kept at or above δ; "
                                        f"{DEFAULT_TPR:g} unless --calibration sets it")
    options.add_method_option(parser)
    options.add_fdr_options(parser)
    options.add_detector_options(parser)
    options.add_methods_option(parser)
    parser.add_argument("--reference", metavar="SRC", default=None,
                        help="in-distribution reference images to fit the fitted detectors on first "
                             "(`odin-audit fit`, written to <output>/fit.npz); must not be the --heldout set")
    parser.add_argument("--bank-size", type=int, default=None, help="with --reference: `fit --bank-size`")
    # with --calibration, the TPR and method come from the file: None here means "not given"
    parser.set_defaults(tpr=None, method=None)
    parser.add_argument("--ood", metavar="NAME=SRC", action="append", default=None,
                        help="labelled OOD set for evaluation (repeatable)")
    parser.add_argument("--class-names", default=None, help="comma-separated class names for the report")
    parser.add_argument("--gallery", type=int, default=24, help="anomalous images shown in the report")
    options.add_batch_size_option(parser)
    options.add_workers_option(parser)
    options.add_scale_options(parser)
    options.add_resize_option(parser)
    options.add_flag_file_rows_option(parser)
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
    frozen: dict[str, Any] | None = None  # the --calibration in use (load_frozen_calibration's result)
    history: Any = None  # Store of --history
    alpha: float | None = None  # --fail-on-drift
    lease: Any = None  # RunLock on --output: one audit writes its decision outputs at a time
    notes: list[str] = field(default_factory=list)  # info lines for the user
    fit: str | None = None  # the fit the score runs use (--fit, or <output>/fit.npz made from --reference)
    fit_ready: bool = False  # --reference: set once the fit is written


def _load_model(args: argparse.Namespace):
    from odin_engine.loading import load_model

    return load_model(args.model, args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
                      unsafe_pickle=args.unsafe_pickle)


def _frozen(args: argparse.Namespace, loaded) -> tuple[dict[str, Any], OdinSettings, CalibrationSettings]:
    """Load ``--calibration`` and refuse it unless it was made for this model and these settings.

    T, ε, the method and the TPR come from the file; given explicitly (flags, a config file or a
    tuning file) they must agree with it.
    """
    from odin_engine.decide.frozen import load_frozen_calibration

    expect: dict[str, Any] = {"model_id": loaded.model_id, "mean": list(loaded.mean), "std": list(loaded.std),
                              "input_size": loaded.input_size, "resize": args.resize, "method": args.method}
    if args.tuning or args.temperature is not None or args.epsilon is not None:
        given = (OdinSettings.from_tuning(args.tuning, expect_model_id=loaded.model_id) if args.tuning and
                 args.temperature is None and args.epsilon is None
                 else OdinSettings.resolve(args.tuning, args.temperature, args.epsilon))
        if args.temperature is not None or args.tuning:
            expect["temperature"] = given.temperature
        if args.epsilon is not None or args.tuning:
            expect["epsilon"] = given.epsilon
    cal = load_frozen_calibration(str(args.calibration), expect)
    if args.tpr is not None and abs(float(args.tpr) - float(cal["target_tpr"])) > 1e-12:
        raise ConfigError(f"calibration {args.calibration} was made for other settings than this run (target_tpr: "
                          f"{cal['target_tpr']!r} there vs {args.tpr!r} now): drop --tpr (δ comes from the "
                          "calibration) or recalibrate with --heldout instead of --calibration")
    odin = OdinSettings(cal["temperature"], cal["epsilon"], origin=f"calibration {args.calibration}")
    settings = CalibrationSettings(float(cal["target_tpr"]), cal["method"], fdr=args.fdr, conditional=args.conditional)
    if args.fdr is not None or args.conditional is not None:
        from odin_engine.decide.calibration import HELDOUT_SCORES

        if not cal.get(HELDOUT_SCORES):
            raise ConfigError(f"calibration {args.calibration} keeps no held-out scores (written by an older "
                              "odin-audit), so it gives no p-values: recalibrate with --heldout to use --fdr or "
                              "--conditional")
        settings.check_heldout_size(len(cal[HELDOUT_SCORES]), f"held-out scores in calibration {args.calibration}")
    return cal, odin, settings


def _output_store(flag: str, uri: str):
    from odin_engine.io.store import Store

    store = Store(str(uri))
    try:
        if store.is_file():
            raise ConfigError(f"{flag} {uri} is a file; give a directory (local, s3://, gs://)")
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {uri}: {exc}") from exc
    return store


def _check(args: argparse.Namespace) -> AuditPlan:
    """Every check that needs no scoring: flags, settings, tuning file, a frozen calibration against
    this model, sources listed, held-out size."""
    from odin_engine.decide.drift import validate_alpha

    for name in ("corpus", "output", "model"):
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required")
    alpha = None
    if args.fail_on_drift is not None:
        try:
            alpha = validate_alpha(args.fail_on_drift)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"--fail-on-drift: {exc}") from exc
    if args.gallery < 0:
        raise ConfigError("--gallery must be >= 0")
    if args.min_ok < 1:
        raise ConfigError("--min-ok must be >= 1")
    if args.flag_file_rows is not None and args.flag_file_rows < 1:
        raise ConfigError("--flag-file-rows must be >= 1")
    ood = parse_ood(args.ood)
    notes: list[str] = []
    frozen = None
    loaded = _load_model(args) if (args.class_names or args.calibration) else None
    if args.calibration:
        frozen, odin, cal = _frozen(args, loaded)
        if args.heldout:
            notes.append(f"--heldout {args.heldout} is ignored (not scored): δ comes from --calibration "
                         f"{args.calibration}")
        if args.heldout_split:
            notes.append(f"--heldout-split {args.heldout_split}: those corpus rows are not flagged and not used "
                         f"(δ comes from --calibration {args.calibration})")
        if ood:
            notes.append(f"--ood {', '.join(n for n, _ in ood)} is ignored: evaluating OOD sets needs held-out "
                         "scores, and --calibration scores no held-out set")
            ood = []
    else:
        if bool(args.heldout) == bool(args.heldout_split):
            raise ConfigError("give exactly one of --heldout SRC or --heldout-split NAME (or a frozen "
                              "--calibration PATH)")
        from odin_engine.decide.tuning import tuned_method

        method = args.method or (tuned_method(args.tuning) if args.tuning else None) or DEFAULT_METHOD
        cal = CalibrationSettings(DEFAULT_TPR if args.tpr is None else args.tpr, method,
                                  fdr=args.fdr, conditional=args.conditional)
        odin = OdinSettings.resolve(args.tuning, args.temperature, args.epsilon)
    fit = _check_fit(args, cal.method)
    out = _output_store("--output", args.output)
    lease = output_lease(out, args.output)
    lease.check_free()  # another audit writing here: refuse before anything is written
    history = _output_store("--history", args.history) if args.history else None
    if history is not None:
        from odin_engine.decide.history import check_history

        check_history(history)  # a file, or an unreadable Delta history: before anything is written
    jobs = [("corpus", str(args.corpus), "corpus")]
    if args.heldout and not frozen:
        jobs.insert(0, ("heldout", str(args.heldout), "heldout"))
    jobs += [(f"ood/{name}", src, f"ood/{name}") for name, src in ood]
    _check_sources(args, jobs, cal, frozen is None)
    # one name per model class, checked before anything is scored
    class_names = loaded.check_class_names(args.class_names) if args.class_names else None
    ready = False
    if args.reference:
        fit = out.uri("fit.npz")
        ready = _earlier_fit(out, args.reference)
        if ready:
            notes.append(f"reusing {fit}, fitted on --reference {args.reference} by an earlier run of this audit "
                         "(delete it to refit)")
    return AuditPlan(odin, cal, out, ood, class_names, jobs, frozen, history, alpha, lease, notes, fit, ready)


def _earlier_fit(out, reference: str) -> bool:
    """A rerun of an audit with --reference reuses its fit (the score runs it resumes were made with it)."""
    from odin_engine.detectors.fit import FitStats
    from odin_engine.detectors.reference import same_source

    if not out.is_file("fit.npz"):
        return False
    return same_source(FitStats.from_bytes(out.read_bytes("fit.npz")).sources.get("reference"), reference)


def _check_fit(args: argparse.Namespace, method: str) -> str | None:
    """``--fit``/``--reference``: one at most; never the held-out set (a bank holding the held-out images
    puts each at distance 0 from itself: their KNN scores, and so δ, would mean nothing); a method that
    needs a fit gets one."""
    from odin_engine.detectors.reference import same_source
    from odin_engine.methods import require_fit

    if args.fit and args.reference:
        raise ConfigError("give --fit FIT or --reference SRC (which fits first), not both")
    require_fit(method, bool(args.fit or args.reference))
    held = args.heldout
    if args.reference and same_source(args.reference, held):
        raise ConfigError(f"--reference {args.reference} is the --heldout set: the reference set must not be the "
                          "held-out set that calibrates δ (a feature bank holding the held-out images makes their "
                          "scores meaningless); fit on other in-distribution images, e.g. a training-set sample")
    if args.fit:
        from odin_engine.detectors.fit import load_fit

        ref = load_fit(args.fit).sources.get("reference")
        if same_source(ref, held):
            raise ConfigError(f"--fit {args.fit} was fitted on {ref}, the --heldout set: the reference set must not "
                              "be the held-out set that calibrates δ; refit on other in-distribution images")
    return args.fit


def _check_sources(args: argparse.Namespace, jobs: list[tuple[str, str, str]], cal: CalibrationSettings,
                   calibrating: bool = True) -> None:
    """Open every source (a missing one fails here, not after the first is scored) and check the
    held-out size, in bounded memory: metadata, one manifest column, or a streamed walk — never a
    listing of the corpus in this process (the score job lists it in Ray tasks)."""
    from odin_engine.io.corpus import count_rows, open_corpus

    opened = {}
    for name, src, _ in jobs:
        try:
            opened[name] = open_corpus(src)
        except ConfigError as exc:
            raise ConfigError(f"{name} source: {exc}") from exc
    if args.heldout_split:  # also with --calibration: those rows are excluded from flagging by this column
        if "split" not in opened["corpus"].carried.names:
            raise ConfigError(f"--heldout-split needs a corpus manifest with a `split` column; {args.corpus!r} "
                              "has none")
    if not calibrating:
        return
    if args.heldout:
        n, what = count_rows(opened["heldout"]), f"images in --heldout {args.heldout}"
    else:
        n = count_rows(opened["corpus"], split=args.heldout_split)
        what = f"corpus rows with split == {args.heldout_split!r}"
    cal.check_heldout_size(n, what)


def _score_options(args: argparse.Namespace, plan: AuditPlan) -> dict[str, Any]:
    """The ``score_corpus`` options every set of this audit is scored with."""
    from odin_engine.methods import parse_methods, with_method

    return dict(model=args.model, weights=args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
                # score_corpus refuses a tuning file made for another model before scoring anything;
                # with a frozen calibration T and ε are the calibration's (checked against any tuning file)
                **({"tuning": args.tuning} if args.tuning and not plan.frozen else
                   {"temperature": plan.odin.temperature, "epsilon": plan.odin.epsilon}),
                batch_size=args.batch_size, workers=args.workers, resize=args.resize,
                shard_rows=args.shard_rows, table_format=args.table_format, object_store_mib=args.object_store_mib, unsafe_pickle=args.unsafe_pickle, ray_address=args.ray_address, verbose=not args.quiet,
                ray_verbose=getattr(args, "verbose", False), print_summary=not args.quiet, head=args.head,
                # --methods, plus the method δ thresholds when it is computed only on request (adascale)
                methods=with_method(parse_methods(args.methods), plan.calibration.method),
                # with --reference the fit does not exist yet when the outputs are checked
                fit=None if args.reference and not plan.fit_ready else plan.fit)


def _check_outputs(args: argparse.Namespace, plan: AuditPlan) -> None:
    """Every set's score directory accepts this model and these settings (``jobs.score.prepare``,
    which writes nothing), checked for all sets before the first is scored."""
    from jobs.score import ScoreConfig, output_table_format, prepare
    from odin_engine.io.delta import DeltaLocation
    from odin_engine.io.results import FLAGS, check_flags_format

    kw = _score_options(args, plan)
    for name, src, sub in plan.jobs:
        try:
            prepare(ScoreConfig(src, plan.out.uri(sub), **kw).checked())
        except ConfigError as exc:
            raise ConfigError(f"{name} scores: {exc}") from exc
    flags_format = output_table_format(plan.out.uri("corpus"), args.table_format)
    check_flags_format(plan.out, flags_format)
    if flags_format == "delta":
        DeltaLocation(plan.out.fs, plan.out.p(FLAGS)).check_reachable("flags")


# --------------------------------------------------------------------------- stages
def _score(args: argparse.Namespace, plan: AuditPlan) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Score every set into ``<output>/<set>/`` (a rerun resumes; finished images are not rescored).

    Returns the run records (for audit.json) and each run's configuration."""
    from jobs.score import score_corpus

    kw = _score_options(args, plan)
    runs: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for name, src, sub in plan.jobs:
        r = score_corpus(src, plan.out.uri(sub), **kw, label=name)
        configs[name] = r["config"]
        runs[name] = {"source": src, "output": plan.out.uri(sub), "run_id": r["run_id"],
                      "model_id": r["config"]["model_id"], "counts": r["counts"],
                      "scored_this_run": r["attempts"][-1]["scored"],
                      "already_done": r["attempts"][-1]["already_done"],
                      "exactly_once": r["verification"]["exactly_once"],
                      # the score table's version this result reads (Delta layout; None: bucket files)
                      "table_version": _table_version(r)}
    return runs, configs


def _table_version(run: dict[str, Any]) -> int | None:
    """The Delta version a score run left its table at (after its compaction, if it ran one)."""
    table = run["attempts"][-1].get("table")
    if not table:
        return None
    return (table.get("compaction") or table)["version"]


def _open_tables(args: argparse.Namespace, plan: AuditPlan, runs: dict[str, dict[str, Any]] | None = None):
    """(corpus, held-out, {ood name: table}) score tables — each at the version its score run left
    (``runs``: audit.json's ``score_runs``), so the result names exactly the rows it decided on; with
    --heldout-split, two filters of one table; held-out is ``None`` when a frozen calibration replaces it."""
    import pyarrow.compute as pc

    from odin_engine.io.scores import ScoreTable

    def version(name: str) -> int | None:
        return (runs or {}).get(name, {}).get("table_version")

    def open_set(name: str, sub: str, what: str) -> ScoreTable:
        return ScoreTable.open(plan.out.uri(*sub.split("/")), what, as_of=version(name))

    corpus = open_set("corpus", "corpus", "corpus scores")
    if args.heldout_split:
        if "split" not in corpus.columns:
            raise ConfigError("--heldout-split needs a corpus manifest with a `split` column")
        in_split = pc.field("split") == args.heldout_split
        heldout = corpus.where(in_split)
        corpus = corpus.where(pc.field("split").is_null() | ~in_split)
    elif plan.frozen:
        heldout = None
    else:
        heldout = open_set("heldout", "heldout", "held-out scores")
    ood = {name: open_set(f"ood/{name}", f"ood/{name}", f"OOD set {name!r} scores") for name, _ in plan.ood}
    return corpus, heldout, ood


def _calibrate(args: argparse.Namespace, plan: AuditPlan, corpus, heldout, configs) -> dict[str, Any]:
    """δ from the held-out set (recording the scoring settings it is valid for), or a copy of the
    frozen calibration (``frozen_from`` says where it came from), checked against the corpus scores."""
    from odin_engine.decide.calibration import calibrate_tables
    from odin_engine.decide.frozen import check_calibration, with_scoring_settings

    if plan.frozen:
        c_set = corpus.settings("corpus scores")
        if c_set:  # the score run used the calibration's settings; a table scored otherwise is refused
            expect = {k: c_set[k] for k in ("model_id", "temperature", "epsilon")}
            if plan.frozen.get("fit_id"):  # a fitted method's δ holds only for the fit it was made with
                expect["fit_id"] = corpus.fit_id()
            check_calibration(plan.frozen, expect, where=f"calibration {plan.frozen['frozen_from']}")
        return dict(plan.frozen)
    cal = with_scoring_settings(calibrate_tables(corpus, heldout, plan.calibration), configs["corpus"])
    cal["settings_from"] = plan.odin.origin
    cal["sources"] = {"corpus": args.corpus, "heldout": args.heldout or f"corpus split == {args.heldout_split}"}
    return cal


def _evaluate(args: argparse.Namespace, plan: AuditPlan, heldout, ood):
    if not ood:
        return None, None
    from odin_engine.decide.evaluation import computed_methods, evaluate_tables

    return evaluate_tables(heldout, ood, computed_methods(heldout), tpr=plan.calibration.tpr)


def _write(args: argparse.Namespace, plan: AuditPlan, runs, cal, flag_plan, heldout, evaluation, roc,
           t0: float, t_scored: float) -> dict[str, Any]:
    """One whole result under ``results/<id>/`` (flags, the JSON summaries, the drift test, the report,
    audit.json), committed by the pointer (``odin_engine.io.results``); then the ``--history`` row."""
    import numpy as np

    from odin_engine.decide.calibration import heldout_scores
    from odin_engine.decide.drift import drift_test
    from jobs.score import output_table_format
    from odin_engine.decide.flagging import summarize
    from odin_engine.io.maintenance import AUDIT_ID_KEY
    from odin_engine.io.results import Publication
    from odin_engine.report import counts_from_quantiles, display_scale, histogram_edges, render_report

    method = plan.calibration.method
    # the flags take the corpus score table's format (its job file, as the score job decided it)
    pub = Publication(plan.out, flags_format=output_table_format(runs["corpus"]["output"]))
    out = pub.store  # this result's private directory: nothing in it is visible before the commit
    # a frozen calibration scores no held-out set: its histogram comes from the quantiles the
    # calibration kept (none in files written before they were kept: then it is absent)
    quantiles = (cal.get("heldout_quantiles") or []) if heldout is None else []
    h_scores = heldout_scores(heldout, method)[0] if heldout is not None else np.asarray(quantiles, np.float64)
    scale = display_scale(method, cal["delta"], cal["temperature"])
    edges = histogram_edges(scale, h_scores, flag_plan.stats.lo, flag_plan.stats.hi)
    h_counts = (np.histogram(h_scores, edges)[0] if heldout is not None
                else counts_from_quantiles(quantiles, int(cal.get("n_heldout") or 0), edges))
    files = {} if args.flag_file_rows is None else {"rows_per_file": args.flag_file_rows}
    flags = publish_flags(flag_plan, pub, {AUDIT_ID_KEY: pub.result_id, "odin.command": "audit"},
                          gallery=args.gallery, hist_edges=edges, **files)
    summary = summarize(flag_plan.stats, plan.class_names, cal["decision"])
    cal["summary"] = summary["overall"]
    cal["flags"] = flags_record(pub, flags, flag_plan)
    cal["result_id"] = pub.result_id
    out.write_json(FLAG_SUMMARY_JSON, {"delta": cal["delta"], "method": method, "decision": cal["decision"], **summary})
    if evaluation is not None:
        out.write_json(EVALUATION_JSON, evaluation)
    out.write_json(CALIBRATION_JSON, cal)
    # the drift test's model is the TPR rule's count (score < δ), whichever rule decided the flags
    drift = drift_test(cal, summary["overall"]["n_ok"], summary["overall"]["n_flagged_tpr"], plan.alpha)
    drift["min_ok"] = args.min_ok
    drift["no_data"] = plan.alpha is not None and summary["overall"]["n_ok"] < args.min_ok
    doc = {
        "version": 1,
        "result_id": pub.result_id,
        "result_dir": pub.path,  # relative to --output; "outputs" are relative to it
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_spec": args.model,
        "model_id": runs["corpus"]["model_id"],
        "temperature": plan.odin.temperature,
        "epsilon": plan.odin.epsilon,
        "settings_from": plan.odin.origin,
        "method": method,
        "tpr": plan.calibration.tpr,
        "delta": cal["delta"],
        "decision": cal["decision"],
        "calibration_from": cal.get("frozen_from"),
        "summary": summary["overall"],
        "drift": drift,
        "score_runs": runs,
        "cluster": _cluster_used(),
        "durations_s": {"scoring": round(t_scored - t0, 3)},
        **pub.flags_info,  # flags_format, and flags_version: the flags table's version of this result
        "outputs": {"calibration": CALIBRATION_JSON, "flags": cal["flags"]["path"] + "/",
                    "flag_summary": FLAG_SUMMARY_JSON,
                    "report": REPORT_HTML, **({"evaluation": EVALUATION_JSON} if evaluation is not None else {})},
    }
    history_html, row = _comparison_html(args, method), None
    if plan.history is not None:  # the row is appended after the commit: history names only published results
        import pandas as pd
        import pyarrow as pa

        from odin_engine.decide.history import HISTORY_SCHEMA, history_key, history_row, read_history
        from odin_engine.report.history import history_plot_html

        row = history_row(doc, cal, drift, summary["per_class"], output=plan.out.uri())
        doc["outputs"]["history"] = plan.history.uri()  # the Delta table; the row's commit carries this result_id
        doc["outputs"]["history_key"] = history_key(row)
        tonight = pa.Table.from_pylist([row], schema=HISTORY_SCHEMA).to_pandas()
        past = read_history(plan.history)
        history_html += history_plot_html(pd.concat([past, tonight], ignore_index=True) if len(past) else tonight)
    metadata = {k: doc[k] for k in ("model_spec", "model_id", "temperature", "epsilon", "settings_from", "method",
                                    "tpr", "finished_at")}
    metadata["method chosen by"] = ("--method" if args.method else f"tuning file {args.tuning}" if args.tuning
                                    else (f"calibration {plan.frozen['frozen_from']}" if plan.frozen else "default"))
    if plan.fit:
        metadata["fit"] = plan.fit
    metadata.update({f"run_id ({k})": v["run_id"] for k, v in runs.items()})
    metadata["scoring seconds (this run)"] = doc["durations_s"]["scoring"]
    held = (f"the held-out histogram is drawn from its {len(quantiles)} held-out quantiles (n = {cal.get('n_heldout')})"
            if quantiles else "it keeps no held-out quantiles (an older file), so the held-out histogram is absent")
    metadata["calibration"] = (f"frozen: {cal['frozen_from']} (created {cal.get('created_at')}); no held-out set "
                               f"scored: {held}" if plan.frozen else "made in this audit from the held-out set")
    metadata["decided by"] = decision_line(cal["decision"])
    metadata["drift test p-value"] = drift["p_value"]
    metadata["expected flag rate [95% interval]"] = _rate_interval(drift)
    html_text = render_report(
        calibration=cal, summary=summary, evaluation=evaluation, roc_scores=roc, runs=runs, metadata=metadata,
        histogram={"edges": edges, "heldout": h_counts, "corpus": flags.histogram},
        gallery=flags.gallery, errors=flags.errors, title=f"odin-audit: {args.corpus}", extra_html=history_html,
        p_values=(flag_plan.pvalues.levels(), flag_plan.stats.p_counts) if flag_plan.pvalues is not None else None)
    out.write_text(REPORT_HTML, html_text)
    doc["durations_s"]["total"] = round(time.time() - t0, 3)
    out.write_json(AUDIT_JSON, doc)
    plan.lease.check_held()  # a run that lost its lease publishes nothing
    pub.commit(command="audit", finished_at=doc["finished_at"])
    if row is not None:
        from odin_engine.decide.history import append_history

        append_history(plan.history, row, audit_id=pub.result_id)
    return doc


def audit(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage; returns the audit.json dict. Reruns resume: finished images are not rescored.

    Raises ``ConfigError`` (nothing written) before scoring, ``DecisionError`` after it.
    """
    plan = _check(args)
    _check_outputs(args, plan)
    for note in plan.notes:
        print(f"odin audit: info: {note}", file=sys.stderr, flush=True)
    t0 = time.time()
    with plan.lease:  # one audit writes here at a time; a killed one's lease dies with its pid
        if args.reference and not plan.fit_ready:
            from jobs.fit import fit_reference

            fit_reference(args.reference, plan.fit, args.model, args.weights, head=args.head,
                          temperature=plan.odin.temperature, bank_size=args.bank_size or DEFAULT_BANK_SIZE,
                          resize=args.resize, batch_size=args.batch_size, mean=args.mean, std=args.std,
                          input_size=args.input_size, unsafe_pickle=args.unsafe_pickle, ray_address=args.ray_address,
                          quiet=args.quiet)
            plan.fit_ready = True
        runs, configs = _score(args, plan)
        t_scored = time.time()
        if not args.quiet:  # one line per stage (scoring printed its own)
            print(f"odin audit: scored {len(runs)} set{'s' * (len(runs) != 1)} in {t_scored - t0:.0f}s; calibrating "
                  "δ, flagging and writing the report", flush=True)
        heldout = None
        try:
            corpus, heldout, ood = _open_tables(args, plan, runs)
            cal = _calibrate(args, plan, corpus, heldout, configs)
            flag_plan = plan_flags(corpus, cal, plan.calibration)
            evaluation, roc = _evaluate(args, plan, heldout, ood)
        except ConfigError as exc:
            raise DecisionError(
                f"scoring finished (its outputs are in {plan.out.uri()} and a rerun reuses them), but the decision "
                f"stage cannot run on what was scored: {describe(exc)}{_heldout_errors_note(heldout)}") from exc
        return _write(args, plan, runs, cal, flag_plan, heldout, evaluation, roc, t0, t_scored)


def _heldout_errors_note(heldout, shown: int = 3) -> str:
    """``. N held-out images failed to score, e.g. id: message; …`` and what to do (empty when none did)."""
    if heldout is None:
        return ""
    from odin_engine.decide.calibration import heldout_errors

    try:
        n, examples = heldout_errors(heldout, shown)
    except (ConfigError, OSError, ValueError):
        return ""
    if not n:
        return ""
    listed = "; ".join(f"{i}: {m}" for i, m in examples)
    return (f". {n} held-out image(s) failed to score (status 'error'), e.g. {listed}. Replace or remove them, or "
            "add held-out images, then rerun the same command (scored images are not scored again); every "
            "failure is listed in the held-out scores' `error` column")


def _comparison_html(args: argparse.Namespace, method: str) -> str:
    """The report's detector comparison, when --tuning holds one (``odin-audit tune`` with OOD sets)."""
    if not args.tuning:
        return ""
    import json

    from odin_engine.io.store import read_bytes
    from odin_engine.report.report import comparison_html

    doc = json.loads(read_bytes(str(args.tuning)).decode())
    if not doc.get("comparison"):
        return ""
    return comparison_html(doc["comparison"], method, f"tuning file {args.tuning}")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _rate_interval(drift: dict[str, Any]) -> str:
    lo, hi = drift["expected_rate_ci"]
    return f"{_pct(drift['expected_rate'])} [{_pct(lo)}, {_pct(hi)}]"


def _rule_note(decision: dict[str, Any]) -> str:
    if decision.get("rule") != "fdr":
        return ""
    return f" by BH at FDR {decision['fdr_q']:g}; the TPR rule: {decision['n_flagged_tpr']}"


def _p(drift: dict[str, Any]) -> str:
    return "n/a (no ok image)" if drift["p_value"] is None else f"{drift['p_value']:.3g}"


def _cluster_used() -> dict | None:
    from jobs.ray_utils import current_cluster

    c = current_cluster()
    return dict(c.as_dict(), summary=c.summary()) if c else None


def run(args: argparse.Namespace) -> int:
    """Exit codes: :data:`EXIT_CODES` (2, bad configuration, comes from :func:`jobs.options.run_main`)."""
    try:
        doc = audit(args)
    except DecisionError as exc:
        print(f"odin-audit audit: error: {exc}", file=sys.stderr)
        return EXIT_AFTER_SCORING
    s, drift = doc["summary"], doc["drift"]
    # the one-line result, also under --quiet (which silences progress and Ray, not the answer)
    where = f" (scored {doc['cluster']['summary']})" if doc.get("cluster") else ""
    print(f"odin audit: δ={doc['delta']:.6g} ({doc['method']}, T={doc['temperature']:g}, ε={doc['epsilon']:g}"
          f"{', frozen calibration' if doc['calibration_from'] else ''}); "
          f"{s['n_outliers']} of {s['n_ok']} corpus images flagged ({100 * (s['outlier_rate'] or 0):.1f}%"
          f"{_rule_note(doc['decision'])}, expected {_rate_interval(drift)}; drift p = {_p(drift)}), "
          f"{s['n_error']} errors{where}; report: {args.output.rstrip('/')}/{doc['result_dir']}/{REPORT_HTML}",
          flush=True)
    if doc["decision"].get("rule") == "fdr":
        print(f"odin audit: limits: {limits_line(doc['decision'])}", file=sys.stderr, flush=True)
    bad = [k for k, v in doc["score_runs"].items() if not v["exactly_once"]]
    if bad:
        print(f"odin audit: score runs {bad} did not verify exactly-once; see their run.json", file=sys.stderr)
        return EXIT_EXACTLY_ONCE
    if drift["no_data"]:
        print(f"odin audit: NO DATA: {drift['n_ok']} corpus images scored ok (fewer than --min-ok {args.min_ok}): "
              f"nothing to test for drift; {s['n_error']} errors (see the flags' error column) — check the corpus "
              "source and its images", file=sys.stderr, flush=True)
        return EXIT_NO_DATA
    if drift["alarm"]:
        print(f"odin audit: DRIFT ALARM: flagged {drift['n_flagged']} of {drift['n_ok']} ({_pct(drift['flag_rate'])}) "
              f"vs expected {_rate_interval(drift)}; p = {_p(drift)} < {drift['alpha']:g} (--fail-on-drift)",
              file=sys.stderr, flush=True)
        return EXIT_DRIFT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_main(build_parser, run, prog="python -m jobs.audit", section="audit"))
