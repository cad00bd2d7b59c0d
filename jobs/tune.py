"""Choose ODIN's temperature and perturbation (T, ε) on validation data; writes tuning.json."""

from __future__ import annotations

import argparse
import posixpath
import sys
from pathlib import Path

from jobs.options import add_config_option, add_normalization_options, run_main
from odin_engine.errors import ConfigError
from odin_engine.io.store import Store
from odin_engine.settings import validate_tpr
from odin_engine.loading import load_model
from odin_engine.scorer import OdinScorer
from odin_engine.settings import DEFAULT_TEMPERATURE, validate_temperature
from odin_engine.decide.tuning import (
    MODES, PAPER_EPSILONS, PAPER_TEMPERATURES, load_source, tune_id_only, tune_paper,
    tuning_document,
)


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise ConfigError(f"--{what} must be comma-separated numbers; got {text!r}") from exc
    if not vals:
        raise ConfigError(f"--{what} is empty")
    return vals


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heldout", metavar="SRC",
                        help="held-out in-distribution images: directory, manifest, or file.npz[start:stop]")
    parser.add_argument("--ood", metavar="SRC", action="append", default=None,
                        help="held-out OOD images (repeatable; NAME=SRC names the set); needed for --mode paper")
    parser.add_argument("--model", metavar="SPEC", help="model spec, e.g. cifar_resnet20 (see odin_engine.loading)")
    parser.add_argument("--weights", metavar="W", help="checkpoint file (or DEFAULT for torchvision)")
    add_normalization_options(parser)
    parser.add_argument("--mode", default="paper", choices=MODES,
                        help="paper: minimize FPR@TPR vs OOD; id-only: maximize mean ID score at fixed T")
    parser.add_argument("--output", metavar="FILE", default=None, help="tuning.json to write")
    parser.add_argument("--tpr", type=float, default=0.95, help="TPR at which FPR is minimized (paper mode)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="fixed T for --mode id-only")
    parser.add_argument("--temperatures", default=",".join(f"{t:g}" for t in PAPER_TEMPERATURES),
                        help="T grid for --mode paper (comma-separated)")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in PAPER_EPSILONS),
                        help="ε grid (comma-separated, pixel units in [0,1])")
    parser.add_argument("--resize", default="crop", choices=("crop", "stretch"),
                        help="how images not at the model's input size are resized (as in odin-audit score)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per scoring call")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow checkpoints that need arbitrary pickled objects (runs code in the file)")
    add_config_option(parser)


def _named(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, spec in enumerate(specs):
        name, sep, src = spec.partition("=")
        if sep and name and "/" not in name and not name.endswith(".npz"):
            out.append((name, src))
        else:
            out.append((Path(spec.split("[")[0]).stem or f"ood{i}", spec))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"OOD set names must differ ({names}); name them with --ood NAME=SRC")
    return out


def run(args: argparse.Namespace) -> int:
    for name in ("heldout", "model", "output"):
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required")
    if not str(args.output).lower().endswith(".json"):
        raise ConfigError(f"--output must name a .json file (e.g. tuning.json); got {args.output}")
    validate_tpr(args.tpr)
    temps = [validate_temperature(t) for t in _floats(args.temperatures, "temperatures")]
    eps = _floats(args.epsilons, "epsilons")
    ood_specs = _named(list(args.ood or []))
    if args.mode == "paper" and not ood_specs:
        raise ConfigError("--mode paper needs at least one --ood SRC; without OOD images use --mode id-only")
    model = load_model(args.model, args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
                       unsafe_pickle=args.unsafe_pickle)
    scorer = OdinScorer(model, temperature=temps[0], epsilon=0.0, device=args.device, batch_size=args.batch_size)
    if args.resize not in ("crop", "stretch"):
        raise ConfigError(f"--resize must be crop or stretch; got {args.resize!r}")
    heldout, held_err = load_source(args.heldout, model.input_size, args.resize)
    ood, ood_err = {}, {}
    for name, src in ood_specs:
        ood[name], ood_err[name] = load_source(src, model.input_size, args.resize)
    for what, errs in [("held-out", held_err), *((f"OOD {n}", e) for n, e in ood_err.items())]:
        if errs:
            print(f"warning: {len(errs)} {what} images could not be decoded and were left out "
                  f"(first: {errs[0]['image_id']}: {errs[0]['error']})", file=sys.stderr)
    if args.mode == "paper":
        result = tune_paper(scorer, heldout, ood, temps, eps, args.tpr)
    else:
        result = tune_id_only(scorer, heldout, args.temperature, eps)
    sources = {"heldout": {"source": args.heldout, "n": int(len(heldout)), "undecodable": held_err[:50],
                           "n_undecodable": len(held_err)},
               "ood": {name: {"source": src, "n": int(len(ood[name])), "undecodable": ood_err[name][:50],
                              "n_undecodable": len(ood_err[name])} for name, src in ood_specs},
               "resize": args.resize}
    doc = tuning_document(result, model.model_id, sources)
    doc["model_spec"] = args.model
    folder, name = posixpath.split(str(args.output).rstrip("/"))
    written = Store(folder or ".").write_json(name, doc)
    print(f"{args.mode}: T={doc['temperature']:g} ε={doc['epsilon']:g} (objective {doc['objective']:.4f}, "
          f"{doc['scoring_seconds']:.1f}s of scoring); wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(build_parser, run, prog="python -m jobs.tune", section="tune"))
