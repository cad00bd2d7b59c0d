"""Choose the detector (and its one hyperparameter; ODIN's T, ε) on validation data; writes tuning.json."""

from __future__ import annotations

import argparse
import posixpath
import sys
import time

from jobs import options
from jobs.options import run_main
from odin_engine.decide.tuning import MODES, PAPER_EPSILONS, PAPER_TEMPERATURES
from odin_engine.errors import ConfigError
from odin_engine.settings import DEFAULT_TEMPERATURE

# torch (the scorer, the model) and scikit-learn (the metrics) are imported in run(), so that
# `odin-audit tune --help` answers at once.


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
    parser.add_argument("--ood", metavar="[NAME=]SRC", action="append", default=None,
                        help="held-out OOD images (repeatable; NAME=SRC names the set, else it is named after the "
                             "file); needed for --mode paper")
    options.add_model_options(parser)
    options.add_detector_options(parser)
    parser.add_argument("--mode", default="paper", choices=MODES,
                        help="paper: minimize FPR@TPR vs OOD; id-only: maximize mean ID score at fixed T")
    parser.add_argument("--output", metavar="FILE", default=None, help="tuning.json to write")
    options.add_tpr_option(parser, help="TPR at which FPR is minimized (paper mode)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="fixed T for --mode id-only")
    parser.add_argument("--temperatures", default=",".join(f"{t:g}" for t in PAPER_TEMPERATURES),
                        help="T grid for --mode paper (comma-separated)")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in PAPER_EPSILONS),
                        help="ε grid (comma-separated, pixel units in [0,1])")
    options.add_resize_option(parser)
    options.add_batch_size_option(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    options.add_quiet_option(parser)
    options.add_config_option(parser)


class _Progress:
    """Progress lines (stderr by default) for stages longer than a few seconds; nothing if ``quiet``."""

    def __init__(self, quiet: bool, every_s: float = 5.0, emit=None):
        self.quiet, self.every_s, self.t0 = quiet, every_s, time.perf_counter()
        self.emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))

    def __call__(self, message: str) -> None:
        if not self.quiet:
            self.emit(f"[tune {time.perf_counter() - self.t0:6.1f}s] {message}")


class _GridWithProgress:
    """The scorer's ``score_grid``, run one batch and one temperature at a time so that progress
    can be reported (at most one line every ``every_s`` seconds, plus one per set).

    Nothing else changes: ``score_grid`` already works batch by batch and, within a batch, T by T
    (one gradient per T, reused for every ε); its ``msp`` and ``pred`` come from the clean logits,
    which do not depend on T.
    """

    def __init__(self, scorer, names: dict[int, str], progress: _Progress):
        self.scorer, self.names, self.progress = scorer, names, progress

    def score_grid(self, images, temperatures, epsilons):
        import numpy as np

        name, n, step = self.names.get(id(images), "images"), len(images), self.scorer.batch_size
        temps, nt, ne = list(temperatures), len(temperatures), len(epsilons)
        self.progress(f"scoring {name}: {n} images × {nt} T × {ne} ε "
                      f"({nt} gradients and {nt * ne} perturbed forwards per image)")
        t0 = last = time.perf_counter()
        odin, msp, pred = [], [], []
        for start in range(0, max(n, 1), step):
            chunk = images[start:start + step]
            per_t = []
            for k, t in enumerate(temps):
                per_t.append(self.scorer.score_grid(chunk, [t], epsilons))
                now = time.perf_counter()
                if now - last >= self.progress.every_s:
                    last = now
                    done = start + len(chunk) * (k + 1) / nt
                    self.progress(f"  {name}: images {start + 1}–{start + len(chunk)} of {n}, T={t:g} ({k + 1}/{nt}); "
                                  f"{now - t0:.0f} s, about {(now - t0) / done * (n - done):.0f} s left")
            odin.append(np.concatenate([g["odin"] for g in per_t], axis=0))
            msp.append(per_t[0]["msp"])
            pred.append(per_t[0]["pred"])
        self.progress(f"  {name}: {n}/{n} images in {time.perf_counter() - t0:.1f} s")
        return {"odin": np.concatenate(odin, axis=2), "msp": np.concatenate(msp), "pred": np.concatenate(pred)}


def _compare(args, model, heldout, ood, odin_result, progress):
    """Every other available method on the same sets (one scoring pass per set), ODIN's row from its grid."""
    from odin_engine.decide.comparison import compare_methods
    from odin_engine.detectors.fit import load_fit
    from odin_engine.scorer import OdinScorer

    fit = load_fit(args.fit) if args.fit else None
    t = fit.temperature if fit is not None else args.temperature
    scorer = OdinScorer(model, temperature=t, epsilon=0.0, device=args.device, batch_size=args.batch_size,
                        head=args.head, fit=fit, methods=["all"])  # adascale too: tune compares every method
    progress(f"comparing methods {', '.join(scorer.methods)} (one scoring pass per set)")
    return compare_methods(scorer, heldout, ood, args.tpr, odin=odin_result)


def run(args: argparse.Namespace) -> int:
    from odin_engine.io.store import Store
    from odin_engine.decide.tuning import load_source, tune_id_only, tune_paper, tuning_document
    from odin_engine.settings import validate_temperature, validate_tpr

    for name in ("heldout", "model", "output"):
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required")
    if not str(args.output).lower().endswith(".json"):
        raise ConfigError(f"--output must name a .json file (e.g. tuning.json); got {args.output}")
    validate_tpr(args.tpr)
    temps = [validate_temperature(t) for t in _floats(args.temperatures, "temperatures")]
    eps = _floats(args.epsilons, "epsilons")
    ood_specs = options.parse_named_sources(args.ood, "--ood", reserved=("heldout",))
    if args.mode == "paper" and not ood_specs:
        raise ConfigError("--mode paper needs at least one --ood SRC; without OOD images use --mode id-only")
    progress = _Progress(args.quiet)
    progress(f"loading model {args.model}")
    from odin_engine.loading import load_model
    from odin_engine.scorer import OdinScorer

    model = load_model(args.model, args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
                       unsafe_pickle=args.unsafe_pickle)
    scorer = OdinScorer(model, temperature=temps[0], epsilon=0.0, device=args.device, batch_size=args.batch_size)
    sets: dict[str, object] = {}
    errors: dict[str, list] = {}
    for name, src in [("held-out", args.heldout), *((f"OOD {n}", s) for n, s in ood_specs)]:
        t0 = time.perf_counter()
        progress(f"reading and decoding {name} images from {src}")
        sets[name], errors[name] = load_source(src, model.input_size, args.resize)
        progress(f"  {name}: {len(sets[name])} images in {time.perf_counter() - t0:.1f} s")
    for what, errs in errors.items():
        if errs:
            print(f"warning: {len(errs)} {what} images could not be decoded and were left out "
                  f"(first: {errs[0]['image_id']}: {errs[0]['error']})", file=sys.stderr)
    heldout = sets["held-out"]
    ood = {n: sets[f"OOD {n}"] for n, _ in ood_specs}
    graded = _GridWithProgress(scorer, {id(v): k for k, v in sets.items()}, progress)
    comparison = None
    if args.mode == "paper":
        result = tune_paper(graded, heldout, ood, temps, eps, args.tpr)
        comparison = _compare(args, model, heldout, ood, result, progress)
    else:
        result = tune_id_only(graded, heldout, args.temperature, eps)
    sources = {"heldout": {"source": args.heldout, "n": int(len(heldout)), "undecodable": errors["held-out"][:50],
                           "n_undecodable": len(errors["held-out"])},
               "ood": {name: {"source": src, "n": int(len(ood[name])), "undecodable": errors[f"OOD {name}"][:50],
                              "n_undecodable": len(errors[f"OOD {name}"])} for name, src in ood_specs},
               "resize": args.resize}
    doc = tuning_document(result, model.model_id, sources)
    doc["model_spec"] = args.model
    if comparison is not None:
        from odin_engine.decide.comparison import format_table

        doc["method"] = comparison["winner"]["method"]
        doc["params"] = {m: b["value"] for m, b in comparison["best"].items() if b["value"] is not None}
        doc["comparison"] = comparison
        doc["fit"] = args.fit
        print(format_table(comparison))
    else:
        doc["method"] = "odin"
    folder, name = posixpath.split(str(args.output).rstrip("/"))
    written = Store(folder or ".").write_json(name, doc)
    print(f"{args.mode}: method {doc['method']}; ODIN T={doc['temperature']:g} ε={doc['epsilon']:g} "
          f"(objective {doc['objective']:.4f}, "
          f"{doc['scoring_seconds']:.1f}s of scoring); wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(build_parser, run, prog="python -m jobs.tune", section="tune"))
