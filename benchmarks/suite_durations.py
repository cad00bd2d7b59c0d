"""Where the test suite's time goes, per test file, from a pytest run with ``--durations=0``.

    .venv/bin/python -m pytest -n 2 --dist loadfile --durations=0 -q > suite.log
    python -m benchmarks.suite_durations suite.log [--top 20]

Prints each file's worker-seconds (setup + call + teardown of its tests), its share of the
whole, and the sum over files divided by the xdist worker count: the wall time the run could
reach with perfectly balanced workers. pytest's ``--durations`` omits phases under 5 ms.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_LINE = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(\S+)")


def by_file(lines) -> tuple[collections.Counter, collections.Counter]:
    """``({file: seconds}, {phase: seconds})`` from ``--durations`` lines."""
    files, phases = collections.Counter(), collections.Counter()
    for line in lines:
        m = _LINE.match(line)
        if m:
            seconds, phase, node = float(m.group(1)), m.group(2), m.group(3)
            files[node.split("::")[0]] += seconds
            phases[phase] += seconds
    return files, phases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="output of a pytest run with --durations=0")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers of that run (-n)")
    args = ap.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as fh:
        files, phases = by_file(fh)
    total = sum(files.values())
    if not total:
        print(f"no --durations lines in {args.log}", file=sys.stderr)
        return 1
    print(f"{total:.0f} worker-seconds in {len(files)} files "
          f"({', '.join(f'{p} {s:.0f}' for p, s in phases.most_common())}); "
          f"balanced over {args.workers} workers: {total / args.workers / 60:.1f} min")
    for name, seconds in files.most_common(args.top):
        print(f"{seconds:8.1f} s {100 * seconds / total:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
