"""Pick the outlier threshold δ on held-out in-distribution scores and flag every corpus image."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from jobs import options
from jobs.options import run_main
from odin_engine.errors import ConfigError
from odin_engine.io.results import FLAGS as FLAGS_DIR
from odin_engine.settings import CalibrationSettings

# the decision stage's outputs, relative to --output (shared with `odin-audit audit`)
CALIBRATION_JSON = "calibration.json"
FLAG_SUMMARY_JSON = "flag_summary.json"


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", metavar="DIR",
                        help="the corpus scores: an `odin-audit score` --output, or any Parquet dataset in the "
                             "score-table schema (local, s3://, gs://)")
    parser.add_argument("--heldout-scores", metavar="DIR",
                        help="held-out in-distribution scores, made with the same model and settings")
    options.add_tpr_option(parser)
    options.add_method_option(parser)
    options.add_fdr_options(parser)
    parser.add_argument("--tuning", metavar="JSON", default=None,
                        help="tuning.json from `odin-audit tune`: δ thresholds the method it chose (unless --method)")
    parser.set_defaults(method=None)
    parser.add_argument("--output", metavar="DIR",
                        help="writes calibration.json, flag_summary.json and the flags (DIR/flags: a Delta table, "
                             "one version per result) as one result, published whole (local, s3://, gs://; "
                             "docs/decision-stage.md)")
    options.add_flag_file_rows_option(parser)
    options.add_table_format_option(parser)
    options.add_config_option(parser)


def publish_flags(plan, publication, metadata: dict[str, str] | None = None, **kwargs):
    """Write the flags of ``plan`` (see :func:`odin_engine.decide.flagging.write_flags`) and, in the
    ``delta`` flags format, commit them as the flags table's new version (``metadata`` in its
    commit); nothing is visible to a reader of the output's pointer before the result's commit."""
    from odin_engine.decide.flagging import write_flags

    publication.prepare_flags()
    delta = publication.flags_format == "delta"
    result = write_flags(plan, publication.flags_store, part_prefix=publication.part_prefix, delta_types=delta,
                         **kwargs)
    if delta:
        publication.commit_flags(result.files, result.schema, **(metadata or {}))
    return result


def flags_record(publication, result, plan) -> dict[str, Any]:
    """calibration.json's ``flags``: where the flags are, their files, rank ranges, format and version."""
    where = {"path": FLAGS_DIR} if publication.flags_format == "buckets" else {
        "path": "../../" + FLAGS_DIR, "table": FLAGS_DIR}  # the path relative to the result's directory
    return {**where, "files": len(result.files), "rank_ranges": len(plan.ranges), **publication.flags_info}


def output_lease(out, display: str):
    """The one-writer lease on a decision output directory (``jobs.run_lock.RunLock``)."""
    from jobs.run_lock import RunLock

    return RunLock(out.fs, out.path, display=display)


def plan_flags(corpus, cal: dict[str, Any], settings: CalibrationSettings):
    """The flag plan for ``corpus`` under ``cal`` (δ and the sorted held-out scores) and the rule in
    ``settings`` (TPR, or ``fdr``); records the decision in ``cal["decision"]``.

    A calibration without held-out scores (a frozen file written before they were kept) gives null
    p-values and cannot decide by FDR (refused, exit 2).
    """
    from odin_engine.decide.calibration import heldout_p_values
    from odin_engine.decide.flagging import prepare

    pv = heldout_p_values(cal, settings.conditional)
    if pv is None and (settings.fdr is not None or settings.conditional is not None):
        raise ConfigError(f"calibration {cal.get('frozen_from', '')} keeps no held-out scores (written by an older "
                          "odin-audit), so it gives no p-values: recalibrate with held-out images to use --fdr or "
                          "--conditional")
    if pv is not None and settings.fdr is not None:
        from odin_engine.decide.conformal import check_heldout_for_fdr

        check_heldout_for_fdr(pv.n, settings.fdr, settings.conditional)
    plan = prepare(corpus, cal["delta"], settings.method, heldout=pv, order_statistic_k=cal["order_statistic_k"],
                   fdr=settings.fdr)
    cal["decision"] = plan.decision or {"rule": "tpr", "rule_text": "TPR rule: score < δ", "p_value": None}
    return plan


def decision_line(decision: dict[str, Any]) -> str:
    """Which rule decided, and what the other rule would have flagged (one line)."""
    if decision.get("p_value") is None:
        return "TPR rule (score < δ); no p-values (the calibration keeps no held-out scores)"
    other = (f"the TPR rule would flag {decision['n_flagged_tpr']}" if decision["rule"] == "fdr" else
             f"BH at FDR {decision['fdr_q']:g} would flag {decision['n_flagged_fdr']}")
    est = decision.get("estimated_outliers")
    return (f"{decision['rule_text']}; {other}; Storey's estimate of outliers: "
            f"{'n/a' if est is None else est}")


def limits_line(decision: dict[str, Any]) -> str:
    """The resolution the held-out set allows BH (empty without p-values)."""
    if decision.get("p_value") is None or decision.get("bh_min_count") is None:
        return ""
    return (f"smallest p-value {decision['min_p_value']:.3g} (n = {decision['n_heldout']} held-out): BH at FDR "
            f"{decision['fdr_q']:g} flags anything only if at least {decision['bh_min_count']} images reach it "
            f"({decision['n_at_min_p_value']} did); a larger held-out set lowers that bar")


def calibrate_and_flag(
    scores: str, heldout_scores: str, output: str, settings: CalibrationSettings = CalibrationSettings(),
    rows_per_file: int | None = None, table_format: str | None = None,
) -> dict[str, Any]:
    """Read both score tables, calibrate δ, flag the corpus; every check runs before anything is written.
    ``table_format``: the flags' format asked for (``jobs.score.decided_format``: a new output's
    default ``delta``; an existing output keeps its own unless ``delta`` is asked).

    Memory: the held-out method column, plus the bounded buffers of the streaming flag pass.
    """
    from odin_engine.decide.calibration import calibrate_tables
    from odin_engine.decide.flagging import summarize
    from jobs.score import decided_format
    from odin_engine.io.delta import DeltaLocation
    from odin_engine.io.results import Publication, check_flags_format, recorded_flags_format
    from odin_engine.io.scores import ScoreTable
    from odin_engine.io.store import Store

    out = Store(output)
    if out.is_file():
        raise ConfigError(f"--output {output} is a file; give a directory")
    check_flags_format(out, table_format or "delta")
    flags_format = decided_format(recorded_flags_format(out), table_format)
    if flags_format == "delta":
        DeltaLocation(out.fs, out.p(FLAGS_DIR)).check_reachable("flags")
    lease = output_lease(out, output)
    lease.check_free()
    corpus = ScoreTable.open(scores, "corpus scores")
    heldout = ScoreTable.open(heldout_scores, "held-out scores")
    cal = calibrate_tables(corpus, heldout, settings)
    plan = plan_flags(corpus, cal, settings)
    # ---- all checks passed: write one whole result (flags, summary, calibration.json), then commit it
    with lease:
        pub = Publication(out, flags_format=flags_format)
        files = {} if rows_per_file is None else {"rows_per_file": rows_per_file}
        result = publish_flags(plan, pub, {"odin.command": "calibrate"}, gallery=0, errors_listed=0, **files)
        summary = summarize(plan.stats, decision=cal["decision"])
        cal["sources"] = {"scores": str(scores), "heldout_scores": str(heldout_scores)}
        cal["summary"] = summary["overall"]
        cal["flags"] = flags_record(pub, result, plan)
        cal["result_id"] = pub.result_id
        pub.store.write_json(FLAG_SUMMARY_JSON, {"delta": cal["delta"], "method": settings.method,
                                                 "decision": cal["decision"], **summary})
        pub.store.write_json(CALIBRATION_JSON, cal)
        lease.check_held()
        pub.commit(command="calibrate")
    return cal


def run(args: argparse.Namespace) -> int:
    for flag_name in ("scores", "heldout_scores", "output"):
        if not getattr(args, flag_name):
            raise ConfigError(f"--{flag_name.replace('_', '-')} is required")
    from odin_engine.decide.tuning import tuned_method
    from odin_engine.settings import DEFAULT_METHOD

    method = args.method or (tuned_method(args.tuning) if args.tuning else None) or DEFAULT_METHOD
    settings = CalibrationSettings(args.tpr, method, fdr=args.fdr, conditional=args.conditional)
    cal = calibrate_and_flag(args.scores, args.heldout_scores, args.output, settings, rows_per_file=args.flag_file_rows,
                             table_format=args.table_format)
    s = cal["summary"]
    lo, hi = cal["tpr_ci"]
    print(
        f"δ={cal['delta']:.6g} ({cal['method']}, T={cal['temperature']:g}, ε={cal['epsilon']:g}) from "
        f"{cal['n_heldout']} held-out images; TPR on new ID data 95% CI [{lo:.3f}, {hi:.3f}]\n"
        f"{s['n_outliers']} of {s['n_ok']} scored corpus images flagged "
        f"({100 * (s['outlier_rate'] or 0):.1f}%), {s['n_error']} errors; wrote {args.output}\n"
        f"decided by: {decision_line(cal['decision'])}"
    )
    if limits_line(cal["decision"]):
        print(f"limits: {limits_line(cal['decision'])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser, run, argv, prog="python -m jobs.calibrate", section="calibrate")


if __name__ == "__main__":
    sys.exit(main())
