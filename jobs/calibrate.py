"""Pick the outlier threshold δ on held-out in-distribution scores and flag every corpus image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from jobs import options
from jobs.options import run_main
from odin_engine.decide.calibration import calibrate_frames, write_json
from odin_engine.io.scores import read_scores
from odin_engine.settings import validate_method, validate_tpr
from odin_engine.errors import ConfigError
from odin_engine.decide.flagging import flag, summarize, write_flags


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", metavar="DIR", help="the corpus scores: an `odin-audit score` --output directory")
    parser.add_argument("--heldout-scores", metavar="DIR",
                        help="held-out in-distribution scores, made with the same model and settings")
    options.add_tpr_option(parser)
    options.add_method_option(parser)
    parser.add_argument("--output", metavar="DIR", help="writes calibration.json, flags/flags.parquet, flag_summary.json")
    options.add_config_option(parser)


def calibrate_and_flag(
    scores: str | Path, heldout_scores: str | Path, output: str | Path, tpr: float = 0.95, method: str = "odin",
) -> dict[str, Any]:
    """Read both score sets, calibrate δ, flag the corpus; write nothing until all checks pass."""
    corpus = read_scores(scores)
    heldout = read_scores(heldout_scores)
    cal = calibrate_frames(corpus, heldout, tpr=tpr, method=method)
    cal["sources"] = {"scores": str(scores), "heldout_scores": str(heldout_scores)}
    flags = flag(corpus, cal["delta"], method)
    summary = summarize(flags)
    cal["summary"] = summary["overall"]
    out = Path(output)
    write_flags(flags, out)
    write_json(out / "flag_summary.json", {"delta": cal["delta"], "method": method, **summary})
    write_json(out / "calibration.json", cal)
    return cal


def run(args: argparse.Namespace) -> int:
    for flag_name in ("scores", "heldout_scores", "output"):
        if not getattr(args, flag_name):
            raise ConfigError(f"--{flag_name.replace('_', '-')} is required")
    validate_tpr(args.tpr)
    validate_method(args.method)
    cal = calibrate_and_flag(args.scores, args.heldout_scores, args.output, args.tpr, args.method)
    s = cal["summary"]
    lo, hi = cal["tpr_ci"]
    print(
        f"δ={cal['delta']:.6g} ({cal['method']}, T={cal['temperature']:g}, ε={cal['epsilon']:g}) from "
        f"{cal['n_heldout']} held-out images; TPR on new ID data 95% CI [{lo:.3f}, {hi:.3f}]\n"
        f"{s['n_outliers']} of {s['n_ok']} scored corpus images flagged "
        f"({100 * (s['outlier_rate'] or 0):.1f}%), {s['n_error']} errors; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(build_parser, run, prog="python -m jobs.calibrate", section="calibrate"))
