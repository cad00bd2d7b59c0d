"""Listing at scale: driver memory over a flat folder, and S3 keys/s of the split listing vs one process.

    python -m benchmarks.listing_scale                         # defaults: flat 1e5,1e6; 8,000 S3 keys
    python -m benchmarks.listing_scale --flat 100000,1000000 --s3-keys 20000 --procs 4
    python -m benchmarks.listing_scale --flat '' --s3-uri s3://my-bucket/images --procs 32 --pages-per-part 16

1. **Flat folder**: ``--flat`` sizes of zero-byte ``.png`` files in ONE directory. For each, a
   fresh process starts a local Ray cluster of ``--cpus`` CPUs and runs what the job runs before
   planning: ``open_corpus`` (the driver's pass over the names: counts, no per-file list) and
   ``jobs.score.list_corpus`` (listing tasks → hash-sorted chunk files). Printed: listed rows,
   tasks, seconds, and the peak of the summed PSS of the whole process tree (driver, GCS, raylet,
   workers) sampled every 0.2 s, and the driver's own peak RSS; ratios against the smallest size.
   Baseline in the same run: one process walking the folder (``walk``, no Ray, no chunk files).
2. **S3 keys/s** on a local S3 API (``moto_server``, started here) holding ``--s3-keys`` zero-byte
   keys in one flat prefix: one-process ``pyarrow.fs`` listing (``FileSelector``, recursive)
   against the split listing (``Part("keys")`` ranges that hand off the rest of their range every
   ``--pages-per-part`` pages of 1,000 keys) run by ``--procs`` worker processes, same bucket,
   same run; with the LIST requests each made, and the time of one request (1,000 keys and 1 key).
   ``--s3-uri`` runs the same comparison on an existing bucket (a real S3 endpoint) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait, FIRST_COMPLETED
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_LIST_FLAT = """
import json, resource, sys, tempfile, time
import ray
from odin_engine.io.corpus import open_corpus
from odin_engine.io.store import Store
from jobs.score import list_corpus
ray.init(num_cpus=int(sys.argv[2]), include_dashboard=False, log_to_driver=False)
t0 = time.time()
src = open_corpus(sys.argv[1])
t1 = time.time()
res = list_corpus(src, Store(sys.argv[3]), "a1")
t2 = time.time()
print(json.dumps({"listed": res["listed"], "tasks": res["tasks"], "open_s": t1 - t0, "list_s": t2 - t1,
                  "driver_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
ray.shutdown()
"""


_WALK_FLAT = """
import sys, time
from pyarrow import fs as pafs
from odin_engine.io.listing import walk
t0 = time.time()
n = sum(1 for _ in walk(pafs.LocalFileSystem(), sys.argv[1], sys.argv[1]))
print(n, time.time() - t0)
"""


def make_flat(path: Path, n: int) -> None:
    """``n`` zero-byte files in ``path`` (kept from an earlier run with ``--work``)."""
    path.mkdir(parents=True, exist_ok=True)
    if sum(1 for _ in os.scandir(path)) == n:
        return
    fd_flags = os.O_CREAT | os.O_WRONLY
    for i in range(n):
        os.close(os.open(path / f"img_{i:08d}.png", fd_flags, 0o644))


def part_flat(work: Path, sizes: list[int], cpus: int, keep: bool) -> None:
    from benchmarks.score_scale import run_sampled

    print(f"== flat folder: driver memory (local Ray, {cpus} CPUs)")
    base = None
    for n in sizes:
        d = work / f"flat{n}"
        t0 = time.time()
        make_flat(d, n)
        made = time.time() - t0
        out = work / f"out{n}"
        rc, peak, wall, text, detail = run_sampled([sys.executable, "-c", _LIST_FLAT, str(d), str(cpus), str(out)],
                                                     0.2)
        if rc != 0:
            print(f"   n={n}: failed rc={rc}\n{text[-2000:]}")
            continue
        r = json.loads(next(line for line in text.splitlines() if line.startswith('{"listed"')))
        walked = subprocess.run([sys.executable, "-c", _WALK_FLAT, str(d)], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split()
        one_s = float(walked[1])
        base = base or (peak, r["driver_rss_mib"])
        print(f"   n={n:>9,}: listed {r['listed']:,} in {r['tasks']} tasks; open_corpus {r['open_s']:.1f} s, "
              f"list {r['list_s']:.1f} s ({r['listed'] / max(r['list_s'], 1e-9):,.0f} entries/s; one process's "
              f"walk, no Ray: {one_s:.1f} s = {int(walked[0]) / one_s:,.0f} entries/s); "
              f"peak PSS all processes {peak:,.0f} MiB (×{peak / base[0]:.2f}), driver peak RSS "
              f"{r['driver_rss_mib']:,.0f} MiB (×{r['driver_rss_mib'] / base[1]:.2f}); files made in {made:.0f} s")
        if not keep:
            shutil.rmtree(d)
        shutil.rmtree(out, ignore_errors=True)


def _count_part(args) -> tuple[int, list, int]:
    source, part, pages = args
    from odin_engine.io import listing as L
    from odin_engine.io.store import split_uri

    L.PAGES_PER_PART = pages
    fs, root = split_uri(source)
    more: list = []
    before = L.list_requests
    n = sum(1 for _ in L.walk_part(fs, root, source, part, more))
    return n, more, L.list_requests - before


def compare_s3(source: str, procs: int, pages: int) -> None:
    """One-process pyarrow listing vs the split key-range listing of ``source`` (``s3://bucket/prefix``)."""
    import boto3
    from pyarrow import fs as pafs

    from odin_engine.io.listing import Part, _root_key, walk_part
    from odin_engine.io.store import split_uri

    fs, root = split_uri(source)
    bucket, key_prefix = _root_key(root)
    client = boto3.client("s3")
    for max_keys in (1000, 1):
        t0 = time.time()
        for _ in range(3):
            client.list_objects_v2(Bucket=bucket, Prefix=key_prefix, MaxKeys=max_keys)
        print(f"   one ListObjectsV2 request of {max_keys:>4} key(s): {(time.time() - t0) / 3 * 1000:,.0f} ms")
    t0 = time.time()
    n1 = sum(1 for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File)
    one = time.time() - t0
    print(f"   one process, pyarrow.fs FileSelector: {n1:,} keys in {one:.1f} s = {n1 / one:,.0f} keys/s")
    t0 = time.time()
    n2 = sum(1 for _ in walk_part(fs, root, source, Part("keys")))  # the same code, never handing off
    whole = time.time() - t0
    print(f"   one process, key ranges (boto3) without splitting: {n2:,} keys in {whole:.1f} s = {n2 / whole:,.0f} keys/s")
    t0 = time.time()
    total, tasks, requests = 0, 0, 0
    with ProcessPoolExecutor(procs) as ex:
        pending = {ex.submit(_count_part, (source, Part("keys"), pages))}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                n, more, req = f.result()
                total, tasks, requests = total + n, tasks + 1, requests + req
                pending |= {ex.submit(_count_part, (source, p, pages)) for p in more}
    split = time.time() - t0
    print(f"   split key ranges, {procs} processes ({pages} pages per part): {total:,} keys in {split:.1f} s = "
          f"{total / split:,.0f} keys/s in {tasks} parts, {requests} LIST requests vs {-(-n1 // 1000)} for one "
          f"process (×{one / split:.2f} vs one process)")
    for rate, what in ((n1 / one, "one process"), (total / split, f"split, {procs} processes")):
        print(f"   → 10^8 keys at {rate:,.0f} keys/s ({what}): {1e8 / rate / 3600:.1f} h")


def part_s3(n_keys: int, procs: int, pages: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import free_port, _wait_port  # noqa: PLC0415 - the test suite's helpers

    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        print("== S3: skipped (no moto_server; pip install 'moto[server]')")
        return
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if not _wait_port(port, 30):
            print("== S3: skipped (moto_server did not start)")
            return
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                          AWS_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                          AWS_EC2_METADATA_DISABLED="true")
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        t0 = time.time()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda i: client.put_object(Bucket="bench", Key=f"flat/img_{i:08d}.png", Body=b""),
                        range(n_keys)))
        print(f"== S3 listing, {n_keys:,} keys in one flat prefix (moto_server on loopback; put in {time.time() - t0:.0f} s)")
        compare_s3("s3://bench/flat", procs, pages)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flat", default="100000,1000000", help="flat folder sizes ('' to skip)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--s3-keys", type=int, default=8000, help="0 to skip")
    ap.add_argument("--s3-uri", default=None, help="list this existing s3://bucket/prefix instead of a local moto one")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--pages-per-part", type=int, default=2)
    ap.add_argument("--work", default=None, help="keep the flat folders here for the next run (default: a temp dir)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="odin-listing-"))
    try:
        if args.flat:
            part_flat(work, [int(x) for x in args.flat.split(",")], args.cpus, keep=args.work is not None)
        if args.s3_uri:
            print(f"== S3 listing of {args.s3_uri} (AWS_* variables as usual)")
            compare_s3(args.s3_uri, args.procs, args.pages_per_part)
        elif args.s3_keys:
            part_s3(args.s3_keys, args.procs, args.pages_per_part)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
