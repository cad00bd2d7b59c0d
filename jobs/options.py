"""Shared command-line plumbing: TOML config files under flags, and exit code 2 for bad configuration."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Callable, Sequence

from odin_engine.errors import ConfigError

EXIT_CONFIG = 2

#: engine parameter names (``SettingError.parameter``) -> the flag that sets them
PARAMETER_FLAGS = {
    "temperature": "--temperature", "epsilon": "--epsilon", "tuning": "--tuning", "tpr": "--tpr",
    "method": "--method", "heldout": "--heldout", "confidence": "--confidence",
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


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")


def add_normalization_options(parser: argparse.ArgumentParser) -> None:
    """``--mean``, ``--std``, ``--input-size``: override (or, for TorchScript, supply) the model's own."""
    parser.add_argument("--mean", help="input mean r,g,b in [0,1] pixel units (default: the model's)")
    parser.add_argument("--std", help="input std r,g,b in [0,1] pixel units (default: the model's)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input side in pixels (default: the model's; needed for torchscript: specs)")


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
        if dest not in known or dest in ("help", "config"):
            raise ConfigError(f"unknown option {key!r} in {p}; known: {sorted(k for k in known if k != 'help')}")
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
    """Parse (config file, then flags), run, and map ``ConfigError`` to exit code 2."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter)
    build_parser(parser)
    try:
        args = parse_with_config(parser, argv, section)
        return int(run(args) or 0)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {describe(exc)}", file=sys.stderr)
        return EXIT_CONFIG
