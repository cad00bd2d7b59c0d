"""The scoring job at scale: listing rates, peak memory vs corpus size, and the cost of an incremental rerun.

    python -m benchmarks.score_scale                       # all three parts, default sizes
    python -m benchmarks.score_scale --rows 200000,5000000 --tree-files 0 --incremental 0

1. **Listing rate** of a directory tree of ``--tree-files`` zero-byte ``.png`` files (in
   ``--tree-dirs`` sub-directories): the job's distributed listing (``jobs.score.list_corpus``:
   one Ray task per sub-prefix, chunk files sorted by hash, on a local cluster of ``--cpus``
   CPUs) against the in-process ``load_corpus`` in the same run. (The manifest listing rate comes
   from part 2: run.json ``list_s``.)
2. **Memory**: ``python -m jobs.score`` (what ``odin-audit score`` runs; it starts its own local
   Ray cluster with ``--cpus`` CPUs) over Parquet manifests of each ``--rows`` size, then the same
   command again (the rerun: nothing to score). Every row has its own ``image_id`` and points at
   one zero-byte file, so each row goes through listing, plan, read, the actor stage, staging and
   commit, and ends as an ``empty file`` error row (a final verdict) without a model forward.
   Peak memory = the largest sum of PSS over the command's whole process tree (driver, GCS,
   raylet, dashboard, workers), sampled every ``--sample-s`` seconds. Printed with each stage's
   seconds from run.json; the ratios are against the smallest size of the same run.
3. **Incremental**: a manifest of ``--incremental`` rows over 20 real 32×32 PNG files (each file
   under many ids) is scored, then 1 % new rows are appended and the same command runs again.
   Printed: rows scored and the seconds of each run, and their ratios.

Model: ``cifar_resnet20`` with seeded random weights (no test-bed data needed). Settings:
``--batch-size`` 1024, ``--shard-rows`` 4096 (rows per bucket) unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _weights(work: Path) -> Path:
    import torch

    from odin_engine.models.cifar_resnet import CifarResNet

    path = work / "resnet20_random.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(CifarResNet(depth=20, num_classes=10).state_dict(), path)
    return path


def write_manifest(path: Path, n: int, uris: list[str], start: int = 0) -> None:
    """``n`` rows ``img/<i>.png`` → ``uris[i % len(uris)]``, as a Parquet manifest (row groups of 1M)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    step = 1 << 20
    for lo in range(start, start + n, step):
        hi = min(start + n, lo + step)
        t = pa.table({"image_id": [f"img/{i:09d}.png" for i in range(lo, hi)],
                      "uri": [uris[i % len(uris)] for i in range(lo, hi)]})
        if writer is None:
            writer = pq.ParquetWriter(path, t.schema)
        writer.write_table(t, row_group_size=step)
    writer.close()


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]  # ray::IDLE, ray::ScoreBatch, ray::plan_partition, ...
    words = [a.decode(errors="replace") for a in argv if a]
    for w in words[1:]:
        if w.endswith(".py") or w == "-m":
            return posixpath.basename(w) if w != "-m" else words[words.index("-m") + 1]
    return posixpath.basename(first)


def _tree_pss_by_process(root: int) -> dict[int, tuple[str, int]]:
    """``{pid: (name, PSS bytes)}`` of ``root`` and all its descendants."""
    from benchmarks.job_throughput import _pss, _tree_pids

    return {pid: (_process_name(pid), _pss(pid)) for pid in _tree_pids(root)}


def run_sampled(cmd: list[str], sample_s: float) -> tuple[int, float, float, str, dict]:
    """Run ``cmd``; return (exit code, peak PSS MiB of its process tree, wall seconds, stderr tail, peak detail).

    The detail: seconds from the start to the peak sample, and the PSS (MiB) at that sample summed
    per process name (driver, raylet, gcs_server, ray::ScoreBatch, ray::IDLE, ...).
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak, detail, stop = [0], {}, threading.Event()

    def sample():
        while not stop.is_set():
            procs = _tree_pss_by_process(proc.pid)
            total = sum(v for _, v in procs.values())
            if total > peak[0]:
                peak[0] = total
                by_name: dict[str, float] = {}
                for name, v in procs.values():
                    by_name[name] = by_name.get(name, 0.0) + v / 2**20
                detail.clear()
                detail.update(at_s=time.perf_counter() - t0, by_name=by_name)
            stop.wait(sample_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    return proc.returncode, peak[0] / 2**20, time.perf_counter() - t0, (out[-2000:] + err[-3000:]), detail


def _describe_peak(detail: dict) -> str:
    if not detail:
        return "no sample"
    parts = sorted(detail["by_name"].items(), key=lambda kv: -kv[1])
    return f"peak at {detail['at_s']:.0f}s: " + ", ".join(f"{k} {v:.0f}" for k, v in parts[:8]) + " MiB"


def score_cmd(manifest: Path, out: Path, weights: Path, args) -> list[str]:
    return [sys.executable, "-m", "jobs.score", "--input", str(manifest), "--output", str(out),
            "--model", "cifar_resnet20", "--weights", str(weights), "--batch-size", str(args.batch_size),
            "--shard-rows", str(args.shard_rows), "--table-format", args.table_format, "--quiet"]


def _attempt(out: Path) -> dict:
    run = json.loads((out / "run.json").read_text())
    return {**run["attempts"][-1], "exactly_once": run["verification"]["exactly_once"], "total": run["counts"]["total"]}


def part_memory(work: Path, weights: Path, args) -> None:
    empty = work / "empty.png"
    empty.write_bytes(b"")
    base = None
    for n in [int(x) for x in args.rows.split(",") if x]:
        manifest = work / f"m{n}.parquet"
        t = time.perf_counter()
        write_manifest(manifest, n, [str(empty)])
        print(f"wrote a {n}-row manifest in {time.perf_counter() - t:.1f}s", flush=True)
        out = work / f"out{n}"
        for label in ("first run", "rerun", *(("+1% night",) if args.night else ())):
            if label == "+1% night":  # 1 % new rows, then the bytes that night wrote into the table
                write_manifest(manifest, n + max(1, n // 100), [str(empty)])
                before = _files(out / "scores")
            rc, peak, wall, tail, detail = run_sampled(score_cmd(manifest, out, weights, args), args.sample_s)
            if rc != 0:
                raise SystemExit(f"score failed (rc={rc}):\n{tail}")
            a = _attempt(out)
            base = base or peak
            print(f"{n:>9} rows, {label:9}: peak {peak:7.0f} MiB ({peak / base:.3f}x the first size's first run); "
                  f"wall {wall:6.1f}s; listing {a['list_s']:.1f}s = {n / max(a['list_s'], 1e-9):,.0f} rows/s, "
                  f"plan {a['plan_s']:.1f}s, scoring {a['pipeline_s']:.1f}s ({a['scored']} rows), "
                  f"commit {a['commit_s']:.1f}s; buckets {a['buckets']['total']} ({a['buckets']['written']} written); "
                  f"exactly once {a['exactly_once']} ({a['total']} rows)", flush=True)
            print(f"    {_describe_peak(detail)}; stages end at listing {a['list_s']:.0f}s + plan "
                  f"{a['plan_s']:.0f}s + scoring {a['pipeline_s']:.0f}s + commit {a['commit_s']:.0f}s after Ray's "
                  f"start ({a.get('ray_init_s', 0):.0f}s)", flush=True)
            if label == "+1% night":
                print(f"    {table_bytes_line(out / 'scores', before)}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        manifest.unlink()


def part_incremental(work: Path, weights: Path, args) -> None:
    import numpy as np
    from PIL import Image

    pngs = []
    rng = np.random.default_rng(0)
    (work / "png").mkdir(exist_ok=True)
    for k in range(20):
        p = work / "png" / f"{k:02d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        pngs.append(str(p))
    n, extra = args.incremental, max(1, args.incremental // 100)
    manifest, out = work / "inc.parquet", work / "inc_out"
    write_manifest(manifest, n, pngs)
    runs = []
    for label in ("first run", f"+{extra} rows (1%)"):
        if runs:
            write_manifest(manifest, n + extra, pngs)
            before = _files(out / "scores")
        rc, _, wall, tail, _ = run_sampled(score_cmd(manifest, out, weights, args), 60.0)
        if rc != 0:
            raise SystemExit(f"score failed (rc={rc}):\n{tail}")
        a = {**_attempt(out), "wall_s": wall}
        runs.append(a)
        print(f"incremental, {label:16}: scored {a['scored']:>6} rows (new {a['new']}, already done "
              f"{a['already_done']}); scoring stage {a['pipeline_s']:.1f}s, listing+plan+commit "
              f"{a['list_s'] + a['plan_s'] + a['commit_s']:.1f}s, whole command {wall:.1f}s; "
              f"exactly once {a['exactly_once']}", flush=True)
    f, r = runs
    print(f"incremental ratios (rerun / first run): rows scored {r['scored'] / f['scored']:.4f}, scoring stage "
          f"{r['pipeline_s'] / f['pipeline_s']:.3f}, whole command {r['wall_s'] / f['wall_s']:.3f}", flush=True)
    print(f"incremental, {table_bytes_line(out / 'scores', before)}", flush=True)



def _files(scores: Path) -> dict[str, tuple[int, int]]:
    """``{name: (mtime_ns, size)}`` of the Parquet files under ``scores/`` (not the Delta log)."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in scores.glob("*.parquet")}


def table_bytes_line(scores: Path, before: dict[str, tuple[int, int]]) -> str:
    """Bytes a night wrote into the score table — Parquet files created or rewritten since ``before``
    (a Delta table's compaction included; bucket files rewritten in place included) — against the
    table's bytes (a Delta table: its current version's files, from the log; else every file)."""
    after = _files(scores)
    written = sum(size for name, (mtime, size) in after.items() if before.get(name, (None,))[0] != mtime)
    n_written = sum(1 for name, (mtime, _) in after.items() if before.get(name, (None,))[0] != mtime)
    if (scores / "_delta_log").is_dir():
        import pyarrow as pa
        from deltalake import DeltaTable

        sizes = pa.table(DeltaTable(str(scores)).get_add_actions(flatten=True)).column("size_bytes").to_pylist()
    else:
        sizes = [size for _, size in after.values()]
    total = sum(sizes)
    return (f"table bytes: the night wrote {n_written} files, {written:,} bytes = {written / total:.2%} of the "
            f"table's {total:,} bytes ({len(sizes)} files)")


LIST_TREE = """
import json, sys, time
from jobs.ray_utils import init_ray
init_ray(num_cpus=int(sys.argv[3]))
import ray
from odin_engine.io.corpus import load_corpus, open_corpus
from odin_engine.io.store import Store
from jobs.score import list_corpus
from jobs.shards import id_hash
# warm the workers (a fresh worker's imports are start-up, not listing)
from jobs.pipeline import run_tasks
list(run_tasks(id_hash, [(["x"],)] * int(sys.argv[3])))
t = time.perf_counter(); src = open_corpus(sys.argv[1]); res = list_corpus(src, Store(sys.argv[2]), "bench")
dist = time.perf_counter() - t
t = time.perf_counter(); n = len(load_corpus(sys.argv[1])); local = time.perf_counter() - t
print(json.dumps({"listed": res["listed"], "tasks": res["tasks"], "distributed_s": dist, "in_process_s": local, "n": n}))
"""


def part_tree(work: Path, args) -> None:
    tree = work / "tree"
    t = time.perf_counter()
    per = max(1, args.tree_files // args.tree_dirs)
    for d in range(args.tree_dirs):
        sub = tree / f"d{d:04d}"
        sub.mkdir(parents=True)
        for i in range(per):
            os.close(os.open(sub / f"{i:07d}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    n = per * args.tree_dirs
    print(f"made a tree of {n} files in {args.tree_dirs} directories in {time.perf_counter() - t:.1f}s", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", LIST_TREE, str(tree), str(work / "tree_out"), str(args.cpus)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"directory tree, {r['listed']} files: distributed listing ({r['tasks']} tasks, {args.cpus} CPUs) "
          f"{r['distributed_s']:.1f}s = {r['listed'] / r['distributed_s']:,.0f} files/s; in-process load_corpus "
          f"{r['in_process_s']:.1f}s = {r['n'] / r['in_process_s']:,.0f} files/s", flush=True)
    shutil.rmtree(tree, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.score_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="200000,1000000,5000000", help="manifest sizes for the memory part ('' skips)")
    ap.add_argument("--tree-files", type=int, default=100_000, help="files in the listing tree (0 skips)")
    ap.add_argument("--tree-dirs", type=int, default=100, help="sub-directories of the listing tree")
    ap.add_argument("--incremental", type=int, default=10_000, help="rows of the incremental part (0 skips)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the listing benchmark's local cluster")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--night", action="store_true",
                    help="memory part: after the rerun, a night with 1%% new rows, and the bytes it wrote")
    ap.add_argument("--table-format", choices=("delta", "buckets"), default="delta",
                    help="the score table's layout (the job's default: delta)")
    ap.add_argument("--sample-s", type=float, default=1.0, help="memory sampling period (s)")
    ap.add_argument("--workdir", default=None, help="where to write manifests and outputs (default: a temp dir)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="odin-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    try:
        weights = _weights(work)
        if args.tree_files:
            part_tree(work, args)
        if args.incremental:
            part_incremental(work, weights, args)
        if args.rows:
            part_memory(work, weights, args)
    finally:
        print(f"load average after: {os.getloadavg()}", flush=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
