"""``odin-audit <command>``: one console script over the job modules in ``jobs/``."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

# command -> module exposing build_parser(parser), run(args) and a one-line __doc__
COMMANDS = {
    "score": "jobs.score",
    "calibrate": "jobs.calibrate",
    "tune": "jobs.tune",
    "fit": "jobs.fit",
    "audit": "jobs.audit",
    "demo": "jobs.demo",
    "compact": "jobs.compact",
}


def _summary(modname: str) -> str:
    """First line of a command module's docstring, read from its source (importing it would cost seconds)."""
    spec = importlib.util.find_spec(modname)
    with open(spec.origin, encoding="utf-8") as fh:
        doc = ast.get_docstring(ast.parse(fh.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _usage() -> str:
    lines = ["usage: odin-audit <command> [options]   (odin-audit <command> --help for its options)",
             "       odin-audit --version", "", "commands:"]
    lines += [f"  {name:<13} {_summary(modname)}" for name, modname in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    from jobs.options import run_main, version_string

    if argv[0] == "--version":
        print(version_string())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"odin-audit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(COMMANDS[name])
    return run_main(mod.build_parser, mod.run, rest, prog=f"odin-audit {name}", section=name)


if __name__ == "__main__":
    sys.exit(main())
