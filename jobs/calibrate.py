"""Pick the outlier threshold δ on held-out in-distribution scores and flag every corpus image."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from jobs import options
from jobs.options import run_main
from odin_engine.errors import ConfigError
from odin_engine.settings import CalibrationSettings

# the decision stage's outputs, relative to --output (shared with `odin-audit audit`)
CALIBRATION_JSON = "calibration.json"
FLAGS_DIR = "flags"
FLAG_SUMMARY_JSON = "flag_summary.json"


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", metavar="DIR",
                        help="the corpus scores: an `odin-audit score` --output, or any Parquet dataset in the "
                             "score-table schema (local, s3://, gs://)")
    parser.add_argument("--heldout-scores", metavar="DIR",
                        help="held-out in-distribution scores, made with the same model and settings")
    options.add_tpr_option(parser)
    options.add_method_option(parser)
    parser.add_argument("--output", metavar="DIR",
                        help="writes calibration.json, flags/part-*.parquet, flag_summary.json as one result, "
                             "published whole (local, s3://, gs://; docs/decision-stage.md)")
    options.add_flag_file_rows_option(parser)
    options.add_config_option(parser)


def publish_flags(plan, publication, **kwargs):
    """Write the flags of ``plan`` into ``publication``'s private result directory (see
    :func:`odin_engine.decide.flagging.write_flags`); nothing is visible before its commit."""
    from odin_engine.decide.flagging import write_flags

    return write_flags(plan, publication.store.join(FLAGS_DIR), part_prefix=publication.part_prefix, **kwargs)


def output_lease(out, display: str):
    """The one-writer lease on a decision output directory (``jobs.run_lock.RunLock``)."""
    from jobs.run_lock import RunLock

    return RunLock(out.fs, out.path, display=display)


def calibrate_and_flag(
    scores: str, heldout_scores: str, output: str, settings: CalibrationSettings = CalibrationSettings(),
    rows_per_file: int | None = None,
) -> dict[str, Any]:
    """Read both score tables, calibrate δ, flag the corpus; every check runs before anything is written.

    Memory: the held-out method column, plus the bounded buffers of the streaming flag pass.
    """
    from odin_engine.decide.calibration import calibrate_tables
    from odin_engine.decide.flagging import prepare, summarize
    from odin_engine.io.scores import ScoreTable
    from odin_engine.io.store import Store

    from odin_engine.io.results import Publication

    out = Store(output)
    if out.is_file():
        raise ConfigError(f"--output {output} is a file; give a directory")
    lease = output_lease(out, output)
    lease.check_free()
    corpus = ScoreTable.open(scores, "corpus scores")
    heldout = ScoreTable.open(heldout_scores, "held-out scores")
    cal = calibrate_tables(corpus, heldout, settings)
    plan = prepare(corpus, cal["delta"], settings.method)
    # ---- all checks passed: write one whole result (flags, summary, calibration.json), then commit it
    with lease:
        pub = Publication(out)
        files = {} if rows_per_file is None else {"rows_per_file": rows_per_file}
        result = publish_flags(plan, pub, gallery=0, errors_listed=0, **files)
        summary = summarize(plan.stats)
        cal["sources"] = {"scores": str(scores), "heldout_scores": str(heldout_scores)}
        cal["summary"] = summary["overall"]
        cal["flags"] = {"path": FLAGS_DIR, "files": len(result.files), "rank_ranges": len(plan.ranges)}
        cal["result_id"] = pub.result_id
        pub.store.write_json(FLAG_SUMMARY_JSON, {"delta": cal["delta"], "method": settings.method, **summary})
        pub.store.write_json(CALIBRATION_JSON, cal)
        lease.check_held()
        pub.commit(command="calibrate")
    return cal


def run(args: argparse.Namespace) -> int:
    for flag_name in ("scores", "heldout_scores", "output"):
        if not getattr(args, flag_name):
            raise ConfigError(f"--{flag_name.replace('_', '-')} is required")
    cal = calibrate_and_flag(args.scores, args.heldout_scores, args.output, CalibrationSettings(args.tpr, args.method),
                             rows_per_file=args.flag_file_rows)
    s = cal["summary"]
    lo, hi = cal["tpr_ci"]
    print(
        f"δ={cal['delta']:.6g} ({cal['method']}, T={cal['temperature']:g}, ε={cal['epsilon']:g}) from "
        f"{cal['n_heldout']} held-out images; TPR on new ID data 95% CI [{lo:.3f}, {hi:.3f}]\n"
        f"{s['n_outliers']} of {s['n_ok']} scored corpus images flagged "
        f"({100 * (s['outlier_rate'] or 0):.1f}%), {s['n_error']} errors; wrote {args.output}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser, run, argv, prog="python -m jobs.calibrate", section="calibrate")


if __name__ == "__main__":
    sys.exit(main())
