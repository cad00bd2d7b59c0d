"""Shared command-line options and plumbing for every ``odin-audit`` command.

Each option that more than one command takes is defined once here (flag, type, default, help), so
that the commands cannot drift apart: model and weights (``add_model_options``), ODIN settings
(``add_odin_options``), calibration (``add_tpr_option``, ``add_method_option``), execution
(``add_batch_size_option``, ``add_workers_option``, ``add_resize_option``, ``add_ray_options``,
``add_quiet_option``), ``NAME=SRC`` sources (``parse_named_sources``), TOML config files under
the flags, ``--version``, exit code 2 for bad configuration and 5 for a failure at run time (``run_main``).

Importing this module must stay cheap (no torch, no Ray): ``--help`` and ``--version`` build the
parser and exit.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path
from typing import Callable, Sequence

from odin_engine.errors import ConfigError

EXIT_CONFIG = 2
#: the run failed at run time (disk full, store unreachable, a Ray task failed): what was written is kept
EXIT_RUNTIME = 5
#: where the score job decodes JPEGs: CPU tasks, or the scoring GPU (nvJPEG; jobs/gpu_decode.py)
DECODE_DEVICES = ("cpu", "cuda")

#: engine parameter names (``SettingError.parameter``) -> the flag that sets them
PARAMETER_FLAGS = {
    "temperature": "--temperature", "epsilon": "--epsilon", "tuning": "--tuning", "tpr": "--tpr",
    "method": "--method", "heldout": "--heldout", "confidence": "--confidence", "fdr": "--fdr",
    "conditional": "--conditional",
}


def describe(exc: ConfigError) -> str:
    """The error message in the command line's words: an engine parameter name becomes its flag."""
    from odin_engine.errors import SettingError

    msg = str(exc)
    flag = PARAMETER_FLAGS.get(exc.parameter) if isinstance(exc, SettingError) else None
    if not flag:
        return msg
    if msg.startswith(exc.parameter + " "):
        return flag + msg[len(exc.parameter):]
    return f"{flag}: {msg}"


# --------------------------------------------------------------------------- options


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--mean``/``--std``/``--input-size`` and ``--unsafe-pickle``."""
    parser.add_argument("--model", metavar="SPEC",
                        help="cifar_resnet20|32|44|56, torchvision:<name>, torchscript:<path> or module:factory")
    parser.add_argument("--weights", metavar="W",
                        help="checkpoint file (a state_dict; DEFAULT for torchvision's own weights)")
    add_normalization_options(parser)
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow checkpoints that need arbitrary pickled objects "
                             "(loading them can execute code: trusted files only)")


def add_normalization_options(parser: argparse.ArgumentParser) -> None:
    """``--mean``, ``--std``, ``--input-size``: override (or, for TorchScript, supply) the model's own."""
    parser.add_argument("--mean", help="input mean r,g,b in [0,1] pixel units (default: the model's)")
    parser.add_argument("--std", help="input std r,g,b in [0,1] pixel units (default: the model's)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input side in pixels (default: the model's; needed for torchscript: specs)")


def add_odin_options(parser: argparse.ArgumentParser, *, tuning: bool = True) -> None:
    """``--temperature``/``--epsilon`` (default: ``--tuning``'s values, else the paper's), and ``--tuning``."""
    from odin_engine.settings import DEFAULT_EPSILON, DEFAULT_TEMPERATURE

    fallback = "when neither this nor --tuning is given" if tuning else "by default"
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"ODIN temperature T > 0; {DEFAULT_TEMPERATURE:g} {fallback}")
    parser.add_argument("--epsilon", type=float, default=None,
                        help=f"ODIN perturbation ε in [0, 1] pixel units; {DEFAULT_EPSILON:g} {fallback}")
    if tuning:
        parser.add_argument("--tuning", metavar="JSON", default=None,
                            help="tuning.json from `odin-audit tune` (sets T and ε; excludes --temperature/--epsilon)")


def add_tpr_option(parser: argparse.ArgumentParser,
                   help: str = "share of held-out in-distribution images kept at or above δ") -> None:
    from odin_engine.settings import DEFAULT_TPR

    parser.add_argument("--tpr", type=float, default=DEFAULT_TPR, help=help)


def add_fdr_options(parser: argparse.ArgumentParser) -> None:
    """``--fdr Q`` and ``--conditional DELTA``: the decision rule (odin_engine/decide/conformal.py)."""
    parser.add_argument("--fdr", metavar="Q", type=float, default=None,
                        help="flag by Benjamini–Hochberg at false-discovery rate Q (e.g. 0.1) on conformal p-values "
                             "over the corpus, instead of the TPR rule (score < δ)")
    parser.add_argument("--conditional", metavar="DELTA", type=float, default=None,
                        help="calibration-conditional p-values: their guarantee holds with probability >= 1 - DELTA "
                             "over the held-out draw (more conservative: fewer flags); default: marginal p-values")


def add_method_option(parser: argparse.ArgumentParser) -> None:
    from odin_engine.io.scores import SCORE_METHODS

    parser.add_argument("--method", default="odin", choices=SCORE_METHODS, help="score column that δ thresholds")


def add_detector_options(parser: argparse.ArgumentParser) -> None:
    """``--fit`` (the fitted methods' reference statistics) and ``--head`` (the classifier head's name)."""
    parser.add_argument("--fit", metavar="FIT", default=None,
                        help="fitted reference statistics from `odin-audit fit` (local or bucket): computes the "
                             "fitted methods react, knn, vim, nci, fdbd (their columns are null without it) and, when "
                             "asked for (--methods, tune), adascale")
    add_head_option(parser)


def add_methods_option(parser: argparse.ArgumentParser) -> None:
    """``--methods``: which score columns to compute (odin_engine.methods.parse_methods)."""
    parser.add_argument("--methods", metavar="LIST", default=None,
                        help="comma-separated methods to compute: names and the words `default` (every method the "
                             "model and --fit allow except adascale, whose extra forward makes scoring ~1.33× ODIN's "
                             "FLOPs; the default) and `all` (adascale too), e.g. `default,adascale`; the other "
                             "columns are null")


def add_head_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head", metavar="MODULE_NAME", default=None,
                        help="the classifier head whose input is the penultimate feature h (default: the last "
                             "nn.Linear the forward calls)")


def add_batch_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=256, help="images per scoring call")


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None,
                        help="scoring actors (default: one per GPU, else the cluster's CPUs ÷ CPUs per worker, "
                             "which is 1 unless score's --cpus-per-worker says otherwise; never more than the run's blocks of "
                             "--shard-rows images)")


def add_scale_options(parser: argparse.ArgumentParser) -> None:
    """Scoring-job layout and in-flight memory, for large corpora (score and audit)."""
    parser.add_argument("--shard-rows", type=int, default=1024,
                        help="rows per bucket of the score table (fixed when the output is created) and per "
                             "staged block (the unit a killed run keeps)")
    add_table_format_option(parser)
    parser.add_argument("--object-store-mib", type=int, default=None,
                        help="object-store memory (MiB) the scoring pipeline may hold in flight (default: 4 "
                             "decoded blocks per scoring actor plus 4, at least 256; Ray caps it at half the "
                             "cluster's object store)")


def add_table_format_option(parser: argparse.ArgumentParser) -> None:
    """``--table-format delta|buckets`` (``jobs.score.decided_format`` decides from it)."""
    parser.add_argument("--table-format", choices=("delta", "buckets"), default=None,
                        help="a new output's tables — the score table, the flags: Delta Lake tables (default: "
                             "appends, snapshots, time travel; docs/table-formats.md) or the layout of outputs "
                             "made before Delta (one Parquet file per score bucket, a Parquet folder per "
                             "result's flags); an existing output keeps its own, delta migrates it; an audit's "
                             "flags take its corpus scores' format")


def add_flag_file_rows_option(parser: argparse.ArgumentParser) -> None:
    from odin_engine.decide.flagging import ROWS_PER_FILE

    parser.add_argument("--flag-file-rows", type=int, default=None,
                        help=f"rows per flags/ Parquet file (default {ROWS_PER_FILE:,})")


def add_resize_option(parser: argparse.ArgumentParser) -> None:
    from odin_engine.io.images import RESIZE_POLICIES

    parser.add_argument("--resize", choices=RESIZE_POLICIES, default="crop",
                        help="how images not at the model's input size are resized: crop = centred square, "
                             "then resize; stretch = resize the whole image")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address", default=None,
                        help="HOST:PORT of a Ray cluster, or auto (the one `ray start` runs here); default: "
                             "RAY_ADDRESS, else a private local cluster")


def add_quiet_option(parser: argparse.ArgumentParser,
                     help: str = "no progress output; only the one-line result (and errors)") -> None:
    """``--quiet`` and ``--verbose`` (Ray's own output on the console too: jobs/ray_output.py)."""
    parser.add_argument("--quiet", action="store_true", help=help)
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own output (INFO lines, Ray Data's progress, worker output); by "
                             "default it goes to the Ray session's log files, whose path is printed once")


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_named_sources(specs: Sequence[str] | None, flag: str = "--ood", *, reserved: Sequence[str] = (),
                        require_name: bool = False) -> list[tuple[str, str]]:
    """``NAME=SRC`` specs → ``[(name, src)]``; names are letters, digits, ``_ - .``, unique, not ``reserved``.

    Without ``require_name`` a bare ``SRC`` is accepted and named after its file or folder
    (``/data/svhn.npz[0:500]`` → ``svhn``). A ``=`` inside a path (``s3://b/k=v``) is not a name.
    """
    out: list[tuple[str, str]] = []
    for i, spec in enumerate(specs or []):
        spec = str(spec)
        name, sep, src = spec.partition("=")
        if sep and _NAME.fullmatch(name) and not name.lower().endswith(".npz") and src:
            out.append((name, src))
            continue
        if require_name:
            raise ConfigError(f"{flag} must be NAME=SRC (e.g. {flag} svhn=/data/svhn); got {spec!r}")
        stem = Path(spec.split("[")[0].rstrip("/")).stem
        out.append(("_".join(_NAME.findall(stem)) or f"set{i}", spec))
    names = [n for n, _ in out]
    bad = sorted(set(names) & set(reserved))
    if bad:
        raise ConfigError(f"{flag} name(s) {bad} are reserved ({', '.join(reserved)}); pick another NAME=SRC")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag} names must differ; got {names} (name the sets with {flag} NAME=SRC)")
    return out


def version_string() -> str:
    from odin_engine import __version__

    return f"odin-audit {__version__}"


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=version_string())


# --------------------------------------------------------------------------- config files and exit codes


def load_config_defaults(parser: argparse.ArgumentParser, path: str, section: str | None = None) -> None:
    """Set ``parser`` defaults from a TOML file (keys spelled like the flags, ``-`` or ``_``).

    A ``[section]`` table named after the sub-command is used when present, else the top level.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    if section and isinstance(data.get(section), dict):
        data = data[section]
    known = {a.dest for a in parser._actions}
    values = {}
    for key, value in data.items():
        if isinstance(value, dict):
            continue  # another sub-command's table
        dest = key.replace("-", "_")
        if dest not in known or dest in ("help", "config", "version"):
            raise ConfigError(f"unknown option {key!r} in {p}; "
                              f"known: {sorted(k for k in known if k not in ('help', 'config', 'version'))}")
        values[dest] = value
    parser.set_defaults(**values)


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None, section: str | None = None):
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        load_config_defaults(parser, args.config, section)
        args = parser.parse_args(argv)
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: …)`` only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.help is None:
            return action.help
        return super()._get_help_string(action)


def run_main(
    build_parser: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    section: str | None = None,
) -> int:
    """Parse (config file, then flags) and run; ``ConfigError`` → exit 2, any other failure → exit 5
    (:func:`runtime_failure`: one line on stderr, the traceback in a log file)."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter)
    build_parser(parser)
    add_version_option(parser)
    try:
        args = parse_with_config(parser, argv, section)
        return int(run(args) or 0)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {describe(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - every other ending gets one line and its own code
        cause = root_cause(exc)
        if isinstance(cause, ConfigError):  # raised inside a Ray task: still the user's to fix
            print(f"{parser.prog}: error: {describe(cause)}", file=sys.stderr)
            return EXIT_CONFIG
        print(runtime_failure(parser.prog, exc), file=sys.stderr, flush=True)
        return EXIT_RUNTIME


# --------------------------------------------------------------------------- run-time failures (exit 5)
#: where the traceback of a failed run goes (default: <temp dir>/odin-audit-logs)
LOG_DIR_ENV = "ODIN_AUDIT_LOG_DIR"


def root_cause(exc: BaseException) -> BaseException:
    """The innermost error: through ``RayTaskError.cause`` and ``raise … from`` chains."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            cause = exc.__cause__
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return exc


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(\w*(?:Error|Exception))(?:\([^)]*\))?: (.+)$", re.M)


def first_error_line(text: str) -> str | None:
    """The first ``SomeError: message`` line of a traceback text that is not one of Ray's wrappers:
    Python prints the original error first, and Ray keeps a remote task's traceback only as text."""
    for m in _ERROR_LINE.finditer(text):
        if not m.group(0).startswith("ray."):
            return f"{m.group(1)}: {m.group(2).strip()}"
    return None


def save_traceback(prog: str, exc: BaseException) -> str:
    """Write ``exc``'s traceback to a new file under ``$ODIN_AUDIT_LOG_DIR`` (default: the temp
    dir's ``odin-audit-logs/``); returns its path, or why it could not be written."""
    import os
    import tempfile
    import time
    import traceback

    directory = os.environ.get(LOG_DIR_ENV) or os.path.join(tempfile.gettempdir(), "odin-audit-logs")
    name = f"{prog.replace(' ', '-').replace('python-', '')}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    path = os.path.join(directory, name)
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"{prog} {' '.join(sys.argv[1:])}\n\n")
            fh.write("".join(traceback.format_exception(exc)))
    except OSError as err:
        return f"not saved ({err.strerror or err}; set {LOG_DIR_ENV} to a writable directory)"
    return path


def runtime_failure(prog: str, exc: BaseException) -> str:
    """The one line for a failure at run time: the cause, what to do, and where its traceback is."""
    import traceback

    from odin_engine.errors import short_error

    text = "".join(traceback.format_exception(exc))
    what = short_error(root_cause(exc), 200)
    origin = first_error_line(text)
    if origin and origin[:60] not in what:  # a wrapper (a Ray task's error): name the original error too
        what += f" (caused by {short_error(RuntimeError(origin), 240)[len('RuntimeError: '):]})"
    hint = "the disk is full: free space, then " if "No space left on device" in text else ""
    return (f"{prog}: error: the run failed at run time: {what}; {hint}rerun the same command to resume "
            f"(finished work is kept; every published result is complete). Traceback: {save_traceback(prog, exc)}")
