"""``odin-audit <command>``: one console script over the job modules in ``jobs/``."""

from __future__ import annotations

import importlib
import sys

# command -> module exposing build_parser(parser), run(args) and a one-line __doc__
COMMANDS = {
    "score": "jobs.score",
    "calibrate": "jobs.calibrate",
    "tune": "jobs.tune",
    "audit": "jobs.audit",
    "demo": "jobs.demo",
}


def _usage() -> str:
    lines = ["usage: odin-audit <command> [options]   (odin-audit <command> --help for its options)", "", "commands:"]
    for name, modname in COMMANDS.items():
        try:
            doc = (importlib.import_module(modname).__doc__ or "").strip().splitlines()[0]
        except ImportError:
            continue
        lines.append(f"  {name:<13} {doc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"odin-audit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from jobs.options import run_main

    mod = importlib.import_module(COMMANDS[name])
    return run_main(mod.build_parser, mod.run, rest, prog=f"odin-audit {name}", section=name)


if __name__ == "__main__":
    sys.exit(main())
