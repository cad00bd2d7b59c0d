"""Decision stage at scale: peak memory and rows/s of `odin-audit calibrate` on 1M and 8M score rows.

    python -m benchmarks.decision_scale                    # 1M and 8M rows, this code and the baseline
    python -m benchmarks.decision_scale --sizes 1000000,8000000 --baseline-rev 3a50659
    python -m benchmarks.decision_scale --baseline-rev '' --rules tpr,fdr   # TPR rule vs --fdr 0.1, same run
    python -m benchmarks.decision_scale --audit 300        # also: `audit` peak memory at 300 vs 3000 images

For each size it writes a synthetic score table in the documented schema (files of 131,072 rows,
random ODIN/MSP/energy scores, 1% error rows, a 10,000-row held-out table), then runs
``odin-audit calibrate`` on it **as a subprocess** and samples the resident memory (RSS) of that
process and all its children every 0.05 s. Printed: peak RSS, wall time and rows/s per size and
decision rule (``--rules``: the TPR rule, and Benjamini–Hochberg with ``--fdr 0.1``, on the same
tables in the same run; 1% of the corpus rows score below most held-out scores, so BH flags
something), and the ratios 8M/1M. The baseline is the in-memory decision stage as of ``--baseline-rev`` (the
commit before the streaming one), extracted with ``git archive`` into a temporary folder and run
the same way in the same process, so both are measured under the same machine load.

``--audit N`` measures the whole ``odin-audit audit`` (local Ray cluster, scoring included) on N
and 10·N generated 32×32 images with a random ResNet-20 and 200 held-out images: the ratio of the
peak RSS of the process tree (driver + Ray processes it started) is the figure to compare with 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
FILE_ROWS = 131_072


def synthetic_scores(n: int, out: Path, seed: int, prefix: str, error_rate: float = 0.01,
                     low_rate: float = 0.0, files: int | None = None) -> Path:
    """``n`` rows in the score schema under ``out/scores/part-*.parquet``: files of FILE_ROWS rows, or
    ``files`` files (row groups of FILE_ROWS rows either way), written chunk by chunk."""
    sys.path.insert(0, str(REPO))
    import pyarrow.compute as pc

    from odin_engine.io.scores import output_schema

    schema = output_schema()
    d = out / "scores"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = -(-n // files) if files else FILE_ROWS
    for k, file_start in enumerate(range(0, n, per_file)):
        with pq.ParquetWriter(d / f"part-{k:05d}.parquet", schema) as writer:
            for start in range(file_start, min(n, file_start + per_file), FILE_ROWS):
                m = min(FILE_ROWS, n - start, file_start + per_file - start)
                err = rng.uniform(size=m) < error_rate
                ok = ~err
                odin = 0.1 + rng.gamma(2.0, 2e-4, m)
                low = rng.uniform(size=m) < low_rate  # outliers: below most held-out scores
                odin[low] = 0.1 + rng.uniform(0.0, 2e-5, int(low.sum()))
                i = pc.cast(pa.array(np.arange(start, start + m)), pa.string())
                cols = {
                    "image_id": pc.binary_join_element_wise(f"{prefix}/", pc.utf8_lpad(i, 9, "0"), ".jpg", ""),
                    "uri": pc.binary_join_element_wise(f"s3://bucket/{prefix}/", pc.utf8_lpad(i, 9, "0"), ".jpg", ""),
                    "status": pc.if_else(pa.array(ok), "ok", "error"),
                    "error": pc.if_else(pa.array(ok), pa.scalar(None, pa.string()), "cannot identify image file"),
                    "width": pa.array(np.full(m, 32, np.int32), mask=err),
                    "height": pa.array(np.full(m, 32, np.int32), mask=err),
                    "pred": pa.array(rng.integers(0, 10, m), mask=err),
                    "msp": pa.array(rng.uniform(0.1, 1.0, m), mask=err),
                    "max_logit": pa.array(rng.normal(5, 2, m), mask=err),
                    "energy": pa.array(rng.normal(6, 2, m), mask=err),
                    "odin": pa.array(odin, mask=err),
                    "temperature": pa.array(np.full(m, 1000.0)),
                    "epsilon": pa.array(np.full(m, 0.0014)),
                    "model_id": pa.array(["cifar_resnet20@sha256:0123456789ab"] * m),
                    "run_id": pa.array(["bench"] * m),
                    "scored_at": pa.array(np.full(m, np.datetime64("2026-01-01T00:00:00", "us")),
                                          pa.timestamp("us", tz="UTC")),
                }
                for f in schema:  # columns of the schema this benchmark has no values for (e.g. version)
                    cols.setdefault(f.name, pa.nulls(m, f.type))
                writer.write_table(pa.Table.from_pydict(cols, schema=schema))
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        todo += _children(p)
    return total


def measure(cmd: list[str], env: dict, cwd: Path, interval: float = 0.05) -> dict:
    """Run ``cmd``; its wall time and the peak RSS of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} … exited {proc.returncode}: {err[-2000:]}")
    return {"wall_s": wall, "peak_rss": peak[0], "stdout": out}


def baseline_tree(rev: str, dest: Path) -> Path | None:
    """The code of ``rev`` (odin_engine/ and jobs/) extracted into ``dest``; None without git/rev."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "odin_engine", "jobs"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"baseline: cannot extract {rev} ({exc}); measuring this code only", flush=True)
        return None
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def calibrate_cmd(scores: Path, heldout: Path, out: Path, extra: tuple[str, ...] = (), probe: bool = False) -> list[str]:
    return [sys.executable, "-m", "benchmarks._memprobe" if probe else "jobs.cli", "calibrate", "--scores", str(scores),
            "--heldout-scores", str(heldout), "--output", str(out), *extra]


def probe_line(path: Path) -> str:
    """The per-allocator figures at the peak (benchmarks/_memprobe.py), one line."""
    try:
        p = json.loads(path.read_text())
    except (OSError, ValueError):
        return "    (no in-process figures)"
    mal = ("n/a" if p.get("malloc_in_use_mib") is None else
           f"{p['malloc_in_use_mib']:.0f} in use + {p['malloc_free_retained_mib']:.0f} free retained")
    return (f"    at the peak: RSS {p['rss_mib']:.0f} MiB, PSS {p['pss_mib']:.0f}; pyarrow pool ({p['arrow_backend']}) "
            f"{p['arrow_allocated_mib']:.0f} allocated (high-water {p['arrow_max_mib']:.0f}); glibc malloc {mal}; "
            f"in: {' < '.join(reversed(p.get('stack') or ['?']))}")


def flags_line(out: Path, rows: int) -> str:
    """The published flags (``odin_engine.io.results.open_flags``): format, version, files and their
    sizes against the compaction target, and whether the current result has one row per corpus row."""
    try:
        from odin_engine.io.maintenance import DEFAULT_TARGET_BYTES
        from odin_engine.io.results import open_flags

        flags = open_flags(str(out))
        # a Delta version's dataset names its files relative to the table's folder
        sizes = [os.path.getsize(f if os.path.isabs(f) else os.path.join(out, "flags", f)) for f in flags.dataset.files]
        n = flags.dataset.count_rows()
    except Exception as exc:  # noqa: BLE001 — a figure line, not a check
        return f"    flags: not readable ({exc})"
    mib = [s / 2**20 for s in sizes]
    return (f"    flags: {flags.format} version {flags.version}, {len(sizes)} files of {min(mib):.1f}–{max(mib):.1f} MiB "
            f"(mean {sum(mib) / len(mib):.1f}; compaction target {DEFAULT_TARGET_BYTES / 2**20:.0f} MiB), "
            f"{n:,} rows{' = the corpus' if n == rows else f' != {rows:,} corpus rows'}")


RULES = {"tpr": ("TPR rule", ()), "fdr": ("--fdr 0.1", ("--fdr", "0.1")),
         # the TPR rule with the flags as each result's Parquet folder (the layout before the Delta flags table)
         "buckets": ("TPR, --table-format buckets", ("--table-format", "buckets"))}


def run_calibrate(sizes: list[int], rev: str | None, work: Path, rules: list[str] = ("tpr",),
                  files: int | None = None, delta: bool = False) -> None:
    heldout = synthetic_scores(10_000, work / "heldout", 1, "held")
    trees = {f"streaming, {RULES[r][0]}": (REPO, RULES[r][1]) for r in rules}
    if rev:
        old = baseline_tree(rev, work / "baseline")
        if old is not None:
            trees[f"in-memory ({rev})"] = (old, ())
    results: dict[str, dict[int, dict]] = {name: {} for name in trees}
    for n in sizes:
        t0 = time.perf_counter()
        corpus = synthetic_scores(n, work / f"corpus-{n}", 2, "corpus", low_rate=0.01, files=files)
        if delta:  # the same files as a Delta table (a log over them, no data rewritten): read through its log
            from deltalake import convert_to_deltalake

            convert_to_deltalake(str(corpus / "scores"))
        print(f"built {n:,} rows{' (a Delta table)' if delta else ''} in {time.perf_counter() - t0:.1f} s",
              flush=True)
        for name, (tree, extra) in trees.items():
            probe = work / f"probe-{n}-{abs(hash(name))}.json"
            env = dict(os.environ, PYTHONPATH=str(tree), ODIN_MEMPROBE=str(probe))
            r = measure(calibrate_cmd(corpus, heldout, work / f"out-{n}-{abs(hash(name))}", extra, tree == REPO),
                        env, work)
            results[name][n] = r
            print(f"  {name:<28} {n:>10,} rows: peak RSS {r['peak_rss'] / 2**20:8.0f} MiB, "
                  f"{r['wall_s']:6.1f} s, {n / r['wall_s']:>10,.0f} rows/s", flush=True)
            if tree == REPO:
                print(probe_line(probe), flush=True)
                print(flags_line(work / f"out-{n}-{abs(hash(name))}", n), flush=True)
        subprocess.run(["rm", "-rf", str(corpus)], check=False)
    print()
    lo, hi = min(sizes), max(sizes)
    for name, per in results.items():
        if lo in per and hi in per and lo != hi:
            print(f"{name}: peak RSS {hi:,} / {lo:,} rows = {per[hi]['peak_rss'] / per[lo]['peak_rss']:.2f}x "
                  f"(targets: <= 1.5x from 1M to 8M, <= 1.2x from 4M to 16M); rows/s at {hi:,} = {hi / per[hi]['wall_s']:,.0f}")
    names = list(results)
    for other in names[1:]:
        new, old = results[names[0]], results[other]
        for n in sizes:
            if n in new and n in old:
                print(f"{n:>10,} rows: {other} / {names[0]}: rows/s = {new[n]['wall_s'] / old[n]['wall_s']:.2f}x, "
                      f"peak RSS = {old[n]['peak_rss'] / new[n]['peak_rss']:.2f}x")


def run_audit(n: int, work: Path) -> None:
    """Whole `odin-audit audit` (local Ray, scoring included) on n and 10·n images."""
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from _odin_helpers import noise_images, random_weights, smooth_images

    weights = random_weights(work / "w.pt")

    def write(d: Path, imgs: np.ndarray) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(d / f"{i:06d}.png")
        return d

    held = write(work / "held", smooth_images(200, 1))
    peaks = {}
    for size in (n, 10 * n):
        corpus = write(work / f"corpus-{size}", np.concatenate([smooth_images(size - size // 10, 2),
                                                                 noise_images(size // 10, 3)]))
        cmd = [sys.executable, "-m", "jobs.cli", "audit", "--corpus", str(corpus), "--heldout", str(held),
               "--output", str(work / f"audit-{size}"), "--model", "cifar_resnet20", "--weights", str(weights),
               "--workers", "1", "--quiet"]
        r = measure(cmd, dict(os.environ, PYTHONPATH=str(REPO)), work, interval=0.2)
        peaks[size] = r["peak_rss"]
        print(f"  audit {size:>7,} images: peak RSS of the process tree {r['peak_rss'] / 2**20:8.0f} MiB, "
              f"{r['wall_s']:6.1f} s", flush=True)
    print(f"audit: peak RSS {10 * n:,} / {n:,} images = {peaks[10 * n] / peaks[n]:.2f}x (target <= 1.3x)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,8000000", help="corpus rows, comma-separated")
    ap.add_argument("--baseline-rev", default="3a50659",
                    help="git revision of the in-memory baseline ('' to skip it)")
    ap.add_argument("--audit", type=int, default=0, metavar="N", help="also measure `audit` on N and 10·N images")
    ap.add_argument("--skip-calibrate", action="store_true", help="only the --audit measurement")
    ap.add_argument("--delta", action="store_true",
                    help="make each corpus a Delta table (convert_to_deltalake over its files): the score job's layout")
    ap.add_argument("--files", type=int, default=None,
                    help="write each corpus as this many files (default: files of 131,072 rows)")
    ap.add_argument("--rules", default="tpr,fdr",
                    help="decision rules of this code to measure: tpr (score < δ), fdr (--fdr 0.1), buckets (the TPR "
                         "rule, flags as per-result Parquet folders instead of the Delta table); comma-separated")
    args = ap.parse_args(argv)
    print(f"load: {os.getloadavg()}; cpus: {os.cpu_count()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="odin-decision-scale-") as tmp:
        work = Path(tmp)
        if not args.skip_calibrate:
            run_calibrate([int(s) for s in args.sizes.split(",") if s], args.baseline_rev or None, work,
                          [r for r in args.rules.split(",") if r], args.files, args.delta)
        if args.audit:
            run_audit(args.audit, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
