"""Scoring-job throughput vs the in-process engine on the same CPU budget, and job memory at 1× vs 10×.

    python -m benchmarks.job_throughput --data ../shared/data

1. Writes N PNG files (default 10,000: the CIFAR-10 test set from ``cifar10_test_jpeg_yoongikim.npz``)
   and, for the memory comparison, a corpus ``--scale`` times larger (the same images cycled).
2. In-process: one Python process reads, decodes (``odin_engine.io.images.decode_image``) and scores
   (``OdinScorer``, ``torch.set_num_threads(--cpus)``) every file. Reported: images/s, measured
   before and after the job; the ratio uses their mean.
3. Job: ``score_corpus`` in a fresh process that starts its own local Ray cluster (``init_ray``) with
   ``--cpus`` CPUs (``--workers`` actors of ``--cpus/--workers`` CPUs/threads each). Reported:
   images/s of the pipeline (run.json ``pipeline_s``: Ray start-up excluded) and of the whole
   command, and the peak memory: the sum of PSS (proportional set size, so the shared object
   store is not counted once per process) over the job's whole process tree — driver, raylet,
   GCS, dashboard, workers — sampled every 1 s, in separate runs (the sampler costs the job a few
   per cent of the CPU).
4. Prints the throughput ratios (target ≥ 0.85) and the memory ratio 10×/1× (target ≤ 1.3).
   Three job figures: *steady state* (images/s once every actor is up, from the ``scored_at``
   stamps: the rate a long job runs at), *pipeline* (run.json ``pipeline_s``: from the Ray Data
   plan to the last Parquet file, so it includes the actors' start-up — worker processes,
   ``import torch``, model load — a fixed cost of a few seconds), *whole command* (also the
   local Ray cluster's start, which ``ray job submit`` to a running cluster does not pay).
   The in-process figure excludes its own start-up (imports, model load).

Model: ``cifar_resnet20`` with the test-bed weights. ODIN T=1000, ε=0.0014.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_pngs(images: np.ndarray, directory: Path, n: int) -> None:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = directory / f"{i // 10000:03d}"
        if i % 10000 == 0:
            sub.mkdir(exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(sub / f"{i:07d}.png", compress_level=1)


def in_process(corpus: Path, weights: Path, cpus: int, batch_size: int) -> dict:
    import torch

    from odin_engine.io.corpus import load_corpus
    from odin_engine.io.store import read_bytes
    from odin_engine.io.images import decode_image
    from odin_engine.loading import load_model
    from odin_engine.scorer import OdinScorer

    torch.set_num_threads(cpus)
    t0 = time.perf_counter()
    model = load_model("cifar_resnet20", str(weights))
    scorer = OdinScorer(model, 1000.0, 0.0014, device="cpu", batch_size=batch_size)
    uris = load_corpus(str(corpus)).table.column("uri").to_pylist()
    t1 = time.perf_counter()
    n = 0
    for start in range(0, len(uris), batch_size):
        arr = np.stack([decode_image(read_bytes(u), 32)[0] for u in uris[start:start + batch_size]])
        n += len(scorer.score(arr)["odin"])
    t2 = time.perf_counter()
    return {"images": n, "score_s": t2 - t1, "images_per_s": n / (t2 - t1), "setup_s": t1 - t0}


def _pss(pid: int) -> int:
    """Proportional set size (bytes): shared pages (Ray's object store) split among their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_pids(root: int) -> set[int]:
    """``root`` and all its descendants, from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree and p not in tree}
        tree |= new
        grew = bool(new)
    return tree


def _tree_rss(root: int) -> int:
    """Sum of PSS (bytes) of ``root`` and all its descendants, from /proc."""
    return sum(_pss(p) for p in _tree_pids(root))


def run_job(corpus: Path, out: Path, weights: Path, cpus: int, workers: int, batch_size: int,
            shard_rows: int, sample_every: float | None = None, idle_worker_ms: int | None = None) -> dict:
    """Run the job in a fresh process; with ``sample_every`` (s), track the peak PSS of its process tree.

    Sampling is not free (reading smaps_rollup of ~15 processes takes ~0.08 s of CPU), so the
    throughput run is not sampled.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_idle_worker_killing_time_threshold_ms", None)
    if idle_worker_ms is not None:  # otherwise init_ray's own setting (jobs.ray_utils.LOCAL_CLUSTER_ENV)
        env["RAY_idle_worker_killing_time_threshold_ms"] = str(idle_worker_ms)
    # The job's own local cluster gets exactly --cpus CPUs (ray.init reads this).
    code = (
        "import sys; from jobs.ray_utils import init_ray; init_ray(num_cpus=%d);"
        "from jobs.score import score_corpus;"
        "r = score_corpus(%r, %r, 'cifar_resnet20', %r, batch_size=%d, workers=%d, cpus_per_worker=%r,"
        " shard_rows=%d, verbose=False);"
        "sys.exit(0 if r['verification']['exactly_once'] else 1)"
    ) % (cpus, str(corpus), str(out), str(weights), batch_size, workers, cpus / workers, shard_rows)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(sample_every)

    th = threading.Thread(target=sample, daemon=True)
    if sample_every:
        th.start()
    _, err = proc.communicate()
    stop.set()
    if sample_every:
        th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"job failed (rc={proc.returncode}):\n{err[-4000:]}")
    run = json.loads((out / "run.json").read_text())
    att = run["attempts"][-1]
    return {"images": run["counts"]["total"], "pipeline_s": att["pipeline_s"], "wall_s": wall,
            "images_per_s": att["scored"] / att["pipeline_s"], "wall_images_per_s": att["scored"] / wall,
            "steady_images_per_s": steady_rate(out / "scores", workers),
            "peak_rss_mib": peak[0] / 2**20, "exactly_once": run["verification"]["exactly_once"]}


def steady_rate(scores: Path, workers: int) -> float:
    """Images/s once every actor is up, from the ``scored_at`` stamp of each scored batch.

    Every batch's rows share one stamp, taken when the batch is done. ``t_start`` is the
    ``workers``-th distinct stamp (by then every actor has finished a batch, so start-up is
    behind). The batches still in flight at ``t_start`` — one per actor, the next ``workers``
    stamps — were partly scored before it, so they are not counted: the figure is the rows of
    the batches that started after ``t_start``, over the time from ``t_start`` to the last stamp.
    (Counting every row stamped after ``t_start`` would overstate the rate by up to ``workers``
    batches.) Assumes actors of equal speed, so that the next ``workers`` stamps are the in-flight
    batches; the remaining bias is below one batch per actor.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    stamps = pq.read_table(scores, columns=["scored_at"]).column("scored_at").cast("int64")
    distinct = np.sort(pc.unique(stamps).to_numpy())
    if len(distinct) <= 2 * workers:
        return float("nan")
    t_start, after_in_flight, t_end = distinct[workers - 1], distinct[2 * workers - 1], distinct[-1]
    counted = int(pc.sum(pc.greater(stamps, after_in_flight)).as_py())
    return counted / ((t_end - t_start) / 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.job_throughput", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data", help="test-bed data directory")
    ap.add_argument("--n", type=int, default=10_000, help="images in the 1× corpus")
    ap.add_argument("--scale", type=int, default=10, help="size of the memory-comparison corpus, × n (0: skip)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPU budget of both contenders")
    ap.add_argument("--workers", type=int, default=None, help="scoring actors (default: --cpus)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--idle-worker-ms", type=int, default=None,
                    help="Ray's idle_worker_killing_time_threshold_ms for the job's cluster (default: the job's "
                         "own setting, 60000; Ray's default is 1000) — for an A/B of worker reuse")
    ap.add_argument("--workdir", default=None, help="where to write the PNGs and outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    data = Path(args.data)
    npz, weights = data / "cifar10_test_jpeg_yoongikim.npz", data / "weights" / "resnet20-12fca82f.th"
    if not npz.is_file() or not weights.is_file():
        print(f"test-bed data not found under {data} (need {npz.name} and weights/{weights.name})", file=sys.stderr)
        return 2
    images = np.load(npz, allow_pickle=False)["images"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="odin-bench-"))
    workers = args.workers or args.cpus
    try:
        c1 = work / "corpus_1x"
        t = time.perf_counter()
        write_pngs(images, c1, args.n)
        print(f"wrote {args.n} PNGs in {time.perf_counter() - t:.1f}s", flush=True)
        ref = in_process(c1, weights, args.cpus, args.batch_size)
        print(f"in-process engine : {ref['images']} images in {ref['score_s']:.1f}s = "
              f"{ref['images_per_s']:.1f} images/s ({args.cpus} torch threads)", flush=True)
        job = run_job(c1, work / "out_1x", weights, args.cpus, workers, args.batch_size, args.shard_rows,
                      idle_worker_ms=args.idle_worker_ms)
        # The engine again after the job, so that load drift on a shared machine hits both sides.
        ref2 = in_process(c1, weights, args.cpus, args.batch_size)
        print(f"in-process engine : {ref2['images']} images in {ref2['score_s']:.1f}s = "
              f"{ref2['images_per_s']:.1f} images/s (again, after the job)", flush=True)
        ref = {"images_per_s": (ref["images_per_s"] + ref2["images_per_s"]) / 2}
        print(f"Ray job (1x)      : {job['images']} images, pipeline {job['pipeline_s']:.1f}s = "
              f"{job['images_per_s']:.1f} images/s; steady state {job['steady_images_per_s']:.1f} images/s; "
              f"whole command {job['wall_s']:.1f}s = {job['wall_images_per_s']:.1f} images/s; "
              f"exactly once {job['exactly_once']}", flush=True)
        print(f"throughput ratio job/in-process: {job['steady_images_per_s'] / ref['images_per_s']:.3f} "
              f"(steady state, both sides past start-up), "
              f"{job['images_per_s'] / ref['images_per_s']:.3f} (pipeline incl. the workers' start-up), "
              f"{job['wall_images_per_s'] / ref['images_per_s']:.3f} (whole command incl. Ray start-up); "
              f"target >= 0.85", flush=True)
        if args.scale:
            # Memory: the job again at 1x and at scale x, with the sampler on (every 1 s: it
            # costs the job a few per cent of the CPU, so these runs are not the throughput figures).
            small = run_job(c1, work / "out_1x_mem", weights, args.cpus, workers, args.batch_size,
                            args.shard_rows, sample_every=1.0, idle_worker_ms=args.idle_worker_ms)
            print(f"Ray job (1x, memory sampled): peak memory (PSS, whole process tree) "
                  f"{small['peak_rss_mib']:.0f} MiB; exactly once {small['exactly_once']}", flush=True)
            cx = work / f"corpus_{args.scale}x"
            t = time.perf_counter()
            write_pngs(images, cx, args.n * args.scale)
            print(f"wrote {args.n * args.scale} PNGs in {time.perf_counter() - t:.1f}s", flush=True)
            big = run_job(cx, work / f"out_{args.scale}x", weights, args.cpus, workers, args.batch_size,
                          args.shard_rows, sample_every=1.0, idle_worker_ms=args.idle_worker_ms)
            print(f"Ray job ({args.scale}x, memory sampled): {big['images']} images, pipeline {big['pipeline_s']:.1f}s = "
                  f"{big['images_per_s']:.1f} images/s; steady state {big['steady_images_per_s']:.1f} images/s; "
                  f"peak memory (PSS, whole process tree) {big['peak_rss_mib']:.0f} MiB; "
                  f"exactly once {big['exactly_once']}", flush=True)
            print(f"throughput ratio job/in-process at {args.scale}x: "
                  f"{big['steady_images_per_s'] / ref['images_per_s']:.3f} (steady state), "
                  f"{big['images_per_s'] / ref['images_per_s']:.3f} (pipeline incl. the workers' start-up)",
                  flush=True)
            print(f"peak memory ratio {args.scale}x/1x: {big['peak_rss_mib'] / small['peak_rss_mib']:.3f} "
                  f"(target <= 1.3)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
