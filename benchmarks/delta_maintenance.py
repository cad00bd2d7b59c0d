"""Maintenance of a Delta score table after a month of nightly appends: compaction, vacuum, time travel.

    python -m benchmarks.delta_maintenance [--rows 500000] [--nights 40] [--new 0.01] [--compression ZSTD]
                                           [--delta-defaults] [--work /tmp/odin-delta-maint] [--json out.json]

Issue 23, step 3. Needs the ``tables`` extra. A Delta table of ``--rows`` rows of the real score schema
(``benchmarks.table_formats.make_rows``: random scores, so it compresses worse than real scores) written
as one version, then ``--nights`` appends of ``--new`` × rows new images each (one small file and one
version per night, the commit carrying the night's ``odin.run_id``), as the score job's appends will be.
Then, through ``odin_engine.io.maintenance`` — what ``odin-audit compact`` runs:

1. the automatic rule (``needs_compaction``) and the files below half the target;
2. a full scan (pyarrow, every column, best of 5) of the version before and the version after
   compaction, interleaved after compacting (the old files stay until the vacuum), as a ratio;
3. ``compact`` (delta-rs ``optimize.compact``, target 128 MiB, row groups of ``ROW_GROUP_ROWS``): files
   before/after, bytes written, row groups, time;
4. ``vacuum(0 h, keep_versions=[the version of night 10])``: files and bytes deleted, time; then time
   travel to night 10 (by its run id) and to a time between two nights reads the exact rows, and
   an un-kept old version is refused;
5. the rows of the current version are exactly the rows written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc


def _scans(uri: str, versions: tuple[int, int], repeat: int = 5) -> list[float]:
    """Best-of-``repeat`` full-scan seconds of each version (pyarrow, every column), the two
    interleaved so that the machine's load moves both alike."""
    from odin_engine.io.maintenance import open_delta_version

    best = [float("inf")] * len(versions)
    for _ in range(repeat):
        for i, v in enumerate(versions):
            t0 = time.perf_counter()
            open_delta_version(uri, v).dataset.to_table()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _ids(t: pa.Table) -> pa.Array:
    return pc.sort_indices(t.column("image_id"))


def _same(a: pa.Table, b: pa.Table) -> bool:
    cols = ["image_id", "status", "odin", "version"]
    a, b = a.select(cols).cast(pa.schema([a.schema.field(c).with_type(pa.string()) if c != "odin" else
                                          a.schema.field(c) for c in cols])), b.select(cols)
    a, b = a.take(_ids(a)), b.take(_ids(b))
    return a.num_rows == b.num_rows and all(a.column(c).to_pylist() == b.column(c).to_pylist() for c in cols)


def run(rows: int, nights: int, new: float, work: Path, compression: str = "ZSTD", defaults: bool = False) -> dict:
    from deltalake import CommitProperties, write_deltalake

    from benchmarks.table_formats import make_rows
    from odin_engine.io import maintenance as m

    shutil.rmtree(work, ignore_errors=True)
    uri = str(work / "scores")
    base = make_rows(rows, seed=0, run_id="night-0")
    write_deltalake(uri, base, mode="error", commit_properties=CommitProperties(custom_metadata={m.RUN_ID_KEY: "night-0"}))
    per_night = max(1, int(rows * new))
    written, stamps = [base], []
    for n in range(1, nights + 1):
        t = make_rows(per_night, seed=n, prefix=f"night{n}", run_id=f"night-{n}")
        write_deltalake(uri, t, mode="append", commit_properties=CommitProperties(custom_metadata={m.RUN_ID_KEY: f"night-{n}"}))
        written.append(t)
        stamps.append(time.time())
    everything = pa.concat_tables(written)
    out: dict = {"rows": everything.num_rows, "nights": nights, "rows_per_night": per_night,
                 "compression": "delta-rs defaults" if defaults else compression}

    stats = m.file_stats(uri)
    out["before"] = {"files": stats.files, "bytes": stats.bytes, "small_files": stats.small_files,
                     "small_bytes": stats.small_bytes, "rule_due": stats.due}

    t0 = time.perf_counter()
    r = m.compact(uri, compression=compression, row_group_rows=None if defaults else m.ROW_GROUP_ROWS)
    out["compact"] = {"seconds": round(time.perf_counter() - t0, 3), "files_before": r.files_before,
                      "files_after": r.files_after, "files_removed": r.files_removed, "files_added": r.files_added,
                      "bytes_before": r.bytes_before, "bytes_after": r.bytes_after, "bytes_written": r.bytes_written,
                      "version": [r.version_before, r.version_after], "rule_due_after": m.needs_compaction(uri)}
    import pyarrow.parquet as pq

    meta = [pq.ParquetFile(u).metadata for u in m.locate(uri).open().file_uris()]
    out["compact"]["row_groups"] = sum(md.num_row_groups for md in meta)
    out["compact"]["max_row_group_rows"] = max(md.row_group(i).num_rows for md in meta for i in range(md.num_row_groups))
    # the version before compaction is still readable (its files stay until the vacuum): scan both
    out["scan_before_s"], out["scan_after_s"] = _scans(uri, (r.version_before, r.version_after))
    out["scan_ratio_before_over_after"] = round(out["scan_before_s"] / out["scan_after_s"], 3)

    keep = m.resolve_version(uri, "night-10" if nights >= 10 else f"night-{nights}")
    t0 = time.perf_counter()
    v = m.vacuum(uri, 0, keep_versions=[keep])
    out["vacuum"] = {"seconds": round(time.perf_counter() - t0, 3), "files_deleted": len(v.files),
                     "bytes_deleted": v.bytes, "kept_version": keep}
    kept_rows = pa.concat_tables(written[: keep + 1])
    out["time_travel_kept_exact"] = _same(m.open_delta_version(uri, f"night-{keep}").dataset.to_table(), kept_rows)
    mid = stamps[keep - 1] if keep >= 1 else None  # just after night `keep` committed
    from datetime import datetime, timezone

    out["time_travel_by_time_version"] = m.resolve_version(uri, datetime.fromtimestamp(mid, timezone.utc)) if mid else None
    from odin_engine.errors import ConfigError

    try:
        m.open_delta_version(uri, keep + 1)
        out["unkept_version_refused"] = False
    except ConfigError:
        out["unkept_version_refused"] = True
    out["current_exact"] = _same(m.open_delta_version(uri).dataset.to_table(), everything)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--nights", type=int, default=40)
    ap.add_argument("--new", type=float, default=0.01, help="new images per night, as a share of --rows")
    ap.add_argument("--compression", default="ZSTD", help="codec of the compacted files (maintenance.COMPRESSION)")
    ap.add_argument("--delta-defaults", action="store_true",
                    help="compact with delta-rs's own writer defaults (no writer properties), for comparison")
    ap.add_argument("--work", default="/tmp/odin-delta-maint")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = run(args.rows, args.nights, args.new, Path(args.work), args.compression, args.delta_defaults)
    out["total_s"] = round(time.time() - t0, 1)
    mib = 1 << 20
    b, c, v = out["before"], out["compact"], out["vacuum"]
    print(f"table: {out['rows']:,} rows = {args.rows:,} + {out['nights']} nights × {out['rows_per_night']:,}")
    print(f"before: {b['files']} files, {b['bytes'] / mib:.1f} MiB; {b['small_files']} below half the target "
          f"({b['small_bytes'] / mib:.1f} MiB); automatic rule due: {b['rule_due']}")
    print(f"compact ({out['compression']}): {c['files_before']} → {c['files_after']} files ({c['files_removed']} merged into "
          f"{c['files_added']}), {c['bytes_written'] / mib:.1f} MiB written, {c['seconds']:.2f} s; version "
          f"{c['version'][0]} → {c['version'][1]}; {c['row_groups']} row groups of ≤ {c['max_row_group_rows']:,} rows; "
          f"rule due after: {c['rule_due_after']}")
    print(f"full scan (pyarrow, best of 5, interleaved): {out['scan_before_s']:.3f} s before, {out['scan_after_s']:.3f} s after "
          f"= {out['scan_ratio_before_over_after']:.2f}×")
    print(f"vacuum (0 h, keep version {v['kept_version']}): deleted {v['files_deleted']} files, "
          f"{v['bytes_deleted'] / mib:.1f} MiB, {v['seconds']:.2f} s; kept version reads exactly: "
          f"{out['time_travel_kept_exact']}; by time: version {out['time_travel_by_time_version']}; an un-kept "
          f"version refused: {out['unkept_version_refused']}; current rows exact: {out['current_exact']}")
    print(f"total {out['total_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
