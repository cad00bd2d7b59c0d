"""Compact (and optionally vacuum) the Delta tables of an output directory.

``odin-audit compact --output DIR [--target-mib 128] [--vacuum-hours H] [--keep-version V …] [--dry-run]``

Finds DIR's Delta tables (``odin_engine.io.maintenance.output_tables``: ``scores/``, ``flags/``,
``history/``, an audit's ``<set>/scores/``, or DIR itself), then, for each, merges its files below the
target (delta-rs ``optimize.compact``, one version; rows unchanged) and with ``--vacuum-hours``
deletes the files that no version younger than H hours (nor a ``--keep-version``, nor a kept
result of DIR: ``odin_engine.io.results.referenced_versions``) references. Prints
each table's files and bytes before and after. It holds the lease (``jobs.run_lock``) of DIR and of
each score-run output under it for the whole run, so no score job or audit writes there meanwhile:
a vacuum would otherwise delete the files a running score job has written but not yet committed.

Exit 2 (nothing written): DIR missing, no Delta table in it, deltalake missing, a run writing DIR,
bad values.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from jobs import options
from odin_engine.errors import ConfigError


def build_parser(parser: argparse.ArgumentParser) -> None:
    from odin_engine.io.maintenance import DEFAULT_TARGET_BYTES, MIB

    parser.add_argument("--output", metavar="DIR", help="an output directory (score, audit or --history; local, "
                                                        "s3://, gs://): every Delta table in it is compacted")
    parser.add_argument("--target-mib", type=float, default=DEFAULT_TARGET_BYTES / MIB,
                        help="target file size in MiB: files below it are merged into files of about this size")
    parser.add_argument("--vacuum-hours", type=int, default=None, metavar="H",
                        help="after compacting, delete the files no version committed in the last H hours "
                             "references (and files no version ever named, e.g. a killed run's); versions older "
                             "than H hours can then no longer be read. Default: no vacuum")
    parser.add_argument("--keep-version", action="append", default=None, metavar="[TABLE=]V",
                        help="with --vacuum-hours: keep the files of version V readable (repeatable); TABLE names "
                             "the table as printed (e.g. corpus/scores=12) when the output has several")
    parser.add_argument("--dry-run", action="store_true",
                        help="write nothing: show each table's files, what compaction would consider and what a "
                             "vacuum would delete")
    parser.add_argument("--quiet", action="store_true", help="only the one-line summary (and errors)")
    options.add_config_option(parser)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.2f} MiB" if n >= 1 << 20 else f"{n / 1024:,.1f} KiB"


def _checked(args: argparse.Namespace):
    from odin_engine.io.delta import require_deltalake
    from odin_engine.io.maintenance import MIB, output_tables

    if not args.output:
        raise ConfigError("--output DIR is required: the output directory whose Delta tables to compact")
    if not args.target_mib > 0:
        raise ConfigError(f"--target-mib must be > 0; got {args.target_mib}")
    if args.vacuum_hours is not None and args.vacuum_hours < 0:
        raise ConfigError(f"--vacuum-hours must be >= 0; got {args.vacuum_hours}")
    if args.keep_version and args.vacuum_hours is None:
        raise ConfigError("--keep-version only applies with --vacuum-hours H")
    tables = output_tables(args.output)
    if not tables:
        raise ConfigError(f"{args.output} holds no Delta table (looked for the output itself, scores/, flags/, "
                          "history/ and an audit's corpus/, heldout/, ood/NAME/ scores/): nothing to compact; a "
                          "score table in the per-bucket Parquet layout is not a Delta table")
    require_deltalake("tables", args.output)
    keep = _keep_versions(args.keep_version or [], tables)
    for t in tables:
        current = t.location.open().version()  # readable (protocol, credentials): checked before any write
        bad = [v for v in keep.get(t.name, []) if not 0 <= v <= current]
        if bad:
            raise ConfigError(f"--keep-version: {t.name or args.output} has no version {bad}: its versions are "
                              f"0..{current}")
    return tables, int(args.target_mib * MIB), keep


def _keep_versions(specs: list[str], tables) -> dict[str, list[int]]:
    """``--keep-version [TABLE=]V`` → ``{table name: [versions]}``; a bare V needs a single table."""
    names = [t.name for t in tables]
    keep: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        if not sep:
            if len(tables) > 1:
                raise ConfigError(f"--keep-version {spec}: {len(tables)} tables ({', '.join(names)}); name one, "
                                  f"e.g. --keep-version {names[0]}={spec}")
            name = names[0]
        if name not in names:
            raise ConfigError(f"--keep-version {spec}: no table {name!r}; the tables are {names}")
        try:
            keep.setdefault(name, []).append(int(value))
        except ValueError:
            raise ConfigError(f"--keep-version {spec}: V must be a version number") from None
    return keep


def run(args: argparse.Namespace) -> int:
    from jobs.run_lock import RunLock
    from odin_engine.io.maintenance import compact, vacuum
    from odin_engine.io.results import referenced_versions
    from odin_engine.io.store import Store, resolve

    tables, target, keep = _checked(args)
    # the versions the output's kept results read (the current one's flags, each kept audit's score
    # tables): a vacuum keeps them, whatever its retention
    results_keep = referenced_versions(Store(args.output))
    say = (lambda *_: None) if args.quiet else (lambda line: print(f"odin compact: {line}", flush=True))
    owners = list(dict.fromkeys(o for t in tables for o in t.owners))
    leases = [RunLock(*resolve(o), display=o) for o in owners]
    for lease in leases:
        lease.check_free()  # a score job or audit writing here: refuse before anything is written
    before = after = 0
    held = [] if args.dry_run else leases
    with contextlib.ExitStack() as stack:
        for lease in held:
            stack.enter_context(lease)
        for t in tables:
            name = t.name or t.location.uri
            for lease in held:
                lease.check_held()  # a run that lost its lease writes nothing more
            r = compact(t.location, target, dry_run=args.dry_run)
            before += r.files_before
            rule = "due" if r.due else "not due"
            if args.dry_run:
                after += r.files_before
                say(f"{name}: {r.files_before} files, {_mib(r.bytes_before)} (version {r.version_before}); "
                    f"{r.candidates} below the {_mib(target)} target ({_mib(r.candidate_bytes)}) would be "
                    f"considered for merging; automatic rule: {rule} (dry run: nothing written)")
            else:
                after += r.files_after
                merged = (f"version {r.version_before} → {r.version_after}, {r.files_removed} files merged into "
                          f"{r.files_added}, {_mib(r.bytes_written)} written" if r.version_after != r.version_before
                          else "nothing to merge")
                say(f"{name}: {r.files_before} files, {_mib(r.bytes_before)} → {r.files_after} files, "
                    f"{_mib(r.bytes_after)} ({merged}; automatic rule was: {rule})")
            if args.vacuum_hours is not None:
                for lease in held:
                    lease.check_held()
                held_by_results = results_keep.get(t.name, [])
                versions = sorted(set(keep.get(t.name, [])) | set(held_by_results)) or None
                v = vacuum(t.location, args.vacuum_hours, versions, dry_run=args.dry_run)
                kept = f", keeping versions {v.keep_versions}" if v.keep_versions else ""
                kept += f" ({held_by_results} read by kept results)" if held_by_results else ""
                say(f"{name}: vacuum (older than {args.vacuum_hours} h{kept}): "
                    f"{'would delete' if args.dry_run else 'deleted'} {len(v.files)} files, {_mib(v.bytes)}"
                    + (" (as the table is now: the files a compaction replaces come on top after their "
                       "retention)" if args.dry_run else ""))
    verb = "would leave" if args.dry_run else "now"
    print(f"odin compact: {len(tables)} Delta table(s) in {args.output}: {before} files before, {verb} {after}"
          + (" (dry run: nothing written)" if args.dry_run else ""), file=sys.stdout, flush=True)
    return 0


def main(argv=None) -> int:
    return options.run_main(build_parser, run, argv, prog="python -m jobs.compact", section="compact")


if __name__ == "__main__":
    sys.exit(main())
