"""GPU rehearsal: the engine tests on CUDA, then forward-only vs ODIN in-process vs the Ray job.

    python -m benchmarks.gpu_rehearsal --device cuda --out gpu_rehearsal.json     # on a GPU machine
    python -m benchmarks.gpu_rehearsal --device cpu --out /tmp/r.json             # CPU fallback, small

On ``cuda`` (defaults: 8000 synthetic 500×375 JPEGs, ``torchvision:resnet50`` with *random*
weights at 224 px, batch 256 — throughput only, the scores mean nothing):

1. ``pytest tests/test_engine_api.py tests/test_odin_math.py`` (the CUDA tests run when a GPU is
   there);
2. forward only: the scorer's own module on normalized batches already on the device;
3. ODIN in-process: ``OdinScorer.score`` on decoded uint8 batches (host → device copy, forward,
   backward, forward);
4. decode capacity: JPEG → 224×224 on all CPU cores (the job's CPU decode), and on the GPU
   (nvJPEG in batches, ``--decode-device cuda``);
5. the job: ``score_corpus`` on a private local Ray cluster (GPU actors), once per decode
   device; images/s over the whole pipeline, and steady (first to last scored batch).

Prints a table with the ratios (targets: ODIN ≥ 0.3× forward; job ≥ 0.85× ODIN in-process;
decode capacity ≥ the job's rate) and writes everything to one JSON. ``--budget-s`` bounds the
whole run: a stage that would start after it is skipped and marked so. On ``cpu`` the defaults
are small (cifar_resnet20, 32 images, 32 px, CPU decode only) so that a test can run it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"odin_vs_forward": 0.3, "job_vs_odin": 0.85, "decode_vs_job": 1.0}
DEFAULTS = {  # device -> (images, model, input size, batch size, decode devices)
    "cuda": (8000, "torchvision:resnet50", 224, 256, ("cpu", "cuda")),
    "cpu": (32, "cifar_resnet20", 32, 16, ("cpu",)),
}


# --------------------------------------------------------------------------- inputs
def _jpeg(args: tuple[int, int, int]) -> bytes:
    """A photo-like JPEG (smooth gradients + noise: ~50 KB at 500×375, quality 90)."""
    from PIL import Image

    seed, w, h = args
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.1, 0.8, 3)
    img = np.stack([x * a, y * b, (x + y) * c * 0.5], -1) + rng.uniform(0, 120, 3) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_corpus(directory: Path, n: int, width: int, height: int, procs: int) -> list[bytes]:
    """``n`` JPEGs written to ``directory``; returns the first 512 as bytes (for in-process stages)."""
    directory.mkdir(parents=True, exist_ok=True)
    sample: list[bytes] = []
    with ProcessPoolExecutor(procs) as pool:
        for i, data in enumerate(pool.map(_jpeg, [(i, width, height) for i in range(n)], chunksize=32)):
            (directory / f"img_{i:06d}.jpg").write_bytes(data)
            if i < 512:
                sample.append(data)
    return sample


def random_weights(spec: str, path: Path) -> Path:
    """A seeded random state_dict for ``spec`` (throughput only)."""
    import torch

    torch.manual_seed(0)
    if spec.startswith("torchvision:"):
        import torchvision

        module = torchvision.models.get_model(spec.split(":", 1)[1], weights=None)
    else:
        from odin_engine.models.cifar_resnet import CifarResNet

        module = CifarResNet(depth=int(re.sub(r"\D", "", spec)), num_classes=10)
    torch.save(module.state_dict(), path)
    return path


# --------------------------------------------------------------------------- timing
def _rate(fn, n_images: int, seconds: float, sync) -> float:
    """images/s of ``fn`` (``n_images`` per call): one warm-up, then the median of repeated calls for ~``seconds``."""
    fn()
    sync()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def engine_rates(loaded, pixels: np.ndarray, device: str, batch: int, seconds: float) -> dict:
    import torch

    from odin_engine.scorer import OdinScorer

    scorer = OdinScorer(loaded, device=device, batch_size=batch)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    x = next(iter(scorer.batches(pixels[:batch])))  # normalized, on the device: what the scorer's module sees

    def forward():
        with torch.inference_mode():
            scorer.module(x)

    return {"forward_images_per_s": _rate(forward, len(x), seconds, sync),
            "odin_images_per_s": _rate(lambda: scorer.score(pixels[:batch]), batch, seconds, sync)}


def _decode_cpu_chunk(args) -> int:
    from odin_engine.io.images import decode_image

    blobs, size = args
    for b in blobs:
        decode_image(b, size, "crop")
    return len(blobs)


def decode_rates(sample: list[bytes], size: int, batch: int, procs: int, gpu: bool, seconds: float) -> dict:
    """JPEG → size×size pixels: all CPU cores (the job's CPU decode), and nvJPEG batches on the GPU."""
    out = {}
    chunks = [(sample[i::procs], size) for i in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_decode_cpu_chunk, chunks))  # warm-up: imports in every process
        t = time.perf_counter()
        n = sum(pool.map(_decode_cpu_chunk, chunks))
        out["decode_cpu_images_per_s"] = n / (time.perf_counter() - t)
    out["decode_cpu_processes"] = procs
    if gpu:
        import torch

        from jobs.gpu_decode import decode_batch_on_gpu

        blobs = (sample * (batch // max(1, len(sample)) + 1))[:batch]
        out["decode_gpu_images_per_s"] = _rate(lambda: decode_batch_on_gpu(blobs, size, "crop", "cuda"), len(blobs),
                                               seconds, torch.cuda.synchronize)
    return out


def run_job(corpus: Path, out: Path, spec: str, weights: Path, size: int, batch: int, decode: str) -> dict:
    import pyarrow.parquet as pq

    from jobs.score import score_corpus

    result = score_corpus(str(corpus), str(out), spec, str(weights), input_size=size, batch_size=batch,
                          decode_device=decode, verbose=False)
    at = pq.read_table(str(out / "scores"), columns=["scored_at"]).column("scored_at").to_pylist()
    span = (max(at) - min(at)).total_seconds() if len(at) > 1 else 0.0
    attempt = result["attempts"][-1]
    return {"decode": decode, "rows": result["counts"]["total"], "ok": result["counts"]["ok"],
            "exactly_once": result["verification"]["exactly_once"], "pipeline_s": attempt["pipeline_s"],
            "images_per_s": attempt["images_per_s"],
            # first to last scored batch: the rate once the actors are up (excludes start-up and the tail)
            "steady_images_per_s": round(len(at) / span, 2) if span > 0 else None,
            "execution": attempt["execution"], "cluster": attempt.get("cluster")}


def engine_tests(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine_api.py",
           "tests/test_odin_math.py"]
    t = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        tail, rc = (proc.stdout + proc.stderr).strip().splitlines()[-1:], proc.returncode
    except subprocess.TimeoutExpired:
        tail, rc = [f"timed out after {timeout:.0f}s"], None
    return {"command": " ".join(cmd[2:]), "returncode": rc, "summary": tail[0] if tail else "",
            "seconds": round(time.time() - t, 1)}


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=sorted(DEFAULTS), default="cuda")
    ap.add_argument("--images", type=int, help="corpus size (default: 8000 on cuda, 32 on cpu)")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--model", help="default: torchvision:resnet50 on cuda, cifar_resnet20 on cpu (random weights)")
    ap.add_argument("--input-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--decode", action="append", choices=("cpu", "cuda"), help="job decode device(s); repeatable")
    ap.add_argument("--engine-tests", action=argparse.BooleanOptionalAction, default=None,
                    help="run the engine tests first (default: on cuda only)")
    ap.add_argument("--seconds", type=float, default=None, help="time per in-process measurement")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip stages that would start after this")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True, help="the JSON written")
    args = ap.parse_args(argv)
    t0 = time.time()
    n, spec, size, batch, decodes = DEFAULTS[args.device]
    n, spec = args.images or n, args.model or spec
    size, batch = args.input_size or size, args.batch_size or batch
    decodes = tuple(args.decode or decodes)
    seconds = args.seconds or (5.0 if args.device == "cuda" else 0.5)
    procs = max(1, os.cpu_count() or 1)
    gpu = args.device == "cuda"

    import torch

    if gpu and not torch.cuda.is_available():
        print("gpu_rehearsal: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    import ray

    doc: dict = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if gpu else None,
                 "cpus": procs, "load_avg": os.getloadavg(), "torch": torch.__version__, "ray": ray.__version__,
                 "python": platform.python_version(), "model": spec, "weights": "random (throughput only)",
                 "input_size": size, "batch_size": batch, "images": n, "image_size": [args.width, args.height],
                 "targets": TARGETS, "skipped": [], "stage_s": {}}

    def stage(name: str) -> bool:
        if time.time() - t0 > args.budget_s:
            doc["skipped"].append(name)
            print(f"gpu_rehearsal: skipped {name} (past --budget-s {args.budget_s:g})", flush=True)
            return False
        print(f"gpu_rehearsal: {name} ...", flush=True)
        return True

    def timed(name: str, t: float) -> None:
        doc["stage_s"][name] = round(time.time() - t, 1)

    run_tests = gpu if args.engine_tests is None else args.engine_tests
    if run_tests and stage("engine tests"):
        t = time.time()
        doc["engine_tests"] = engine_tests(timeout=min(240.0, max(30.0, args.budget_s / 3)))
        timed("engine tests", t)
        print(f"  {doc['engine_tests']['summary']}", flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="odin-gpu-"))
    corpus, weights = work / "corpus", work / "weights.pt"
    t = time.time()
    sample = make_corpus(corpus, n, args.width, args.height, procs)
    random_weights(spec, weights)
    timed("corpus", t)
    doc["mean_jpeg_bytes"] = int(np.mean([len(b) for b in sample]))

    from odin_engine.io.images import decode_image
    from odin_engine.loading import load_model

    loaded = load_model(spec, str(weights), input_size=size)
    pixels = np.stack([decode_image(b, size, "crop")[0] for b in (sample * (batch // len(sample) + 1))[:batch]])
    if stage("engine throughput"):
        t = time.time()
        doc.update(engine_rates(loaded, pixels, "cuda" if gpu else "cpu", batch, seconds))
        timed("engine throughput", t)
    if stage("decode throughput"):
        t = time.time()
        doc.update(decode_rates(sample, size, batch, procs, gpu, seconds))
        timed("decode throughput", t)
    doc["jobs"] = []
    for decode in decodes:
        if stage(f"job (decode on {decode})"):
            t = time.time()
            doc["jobs"].append(run_job(corpus, work / f"out-{decode}", spec, weights, size, batch, decode))
            timed(f"job (decode on {decode})", t)
    doc["ratios"] = ratios(doc)
    doc["total_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(table(doc), flush=True)
    bad_jobs = [j for j in doc["jobs"] if not j["exactly_once"]]
    failed_tests = run_tests and doc.get("engine_tests", {}).get("returncode") not in (0, None)
    return 1 if bad_jobs or failed_tests else 0


def ratios(doc: dict) -> dict:
    r = {}
    fwd, odin = doc.get("forward_images_per_s"), doc.get("odin_images_per_s")
    if fwd and odin:
        r["odin_vs_forward"] = round(odin / fwd, 3)
    for job in doc.get("jobs", []):
        rate = job["steady_images_per_s"] or job["images_per_s"]
        if odin:
            r[f"job_{job['decode']}_decode_vs_odin"] = round(rate / odin, 3)
            r[f"job_{job['decode']}_decode_whole_run_vs_odin"] = round(job["images_per_s"] / odin, 3)
        capacity = doc.get(f"decode_{job['decode']}_images_per_s")
        if capacity:
            r[f"decode_{job['decode']}_vs_job"] = round(capacity / rate, 3)
    return r


def table(doc: dict) -> str:
    rows = [("forward only", doc.get("forward_images_per_s")), ("ODIN in-process", doc.get("odin_images_per_s")),
            ("decode, all CPU cores", doc.get("decode_cpu_images_per_s")),
            ("decode, GPU (nvJPEG)", doc.get("decode_gpu_images_per_s"))]
    for job in doc.get("jobs", []):
        rows.append((f"job, {job['decode']} decode (steady)", job["steady_images_per_s"]))
        rows.append((f"job, {job['decode']} decode (whole run)", job["images_per_s"]))
    lines = [f"gpu_rehearsal on {doc['gpu'] or 'CPU'} ({doc['cpus']} CPUs), {doc['model']} @ {doc['input_size']} px, "
             f"batch {doc['batch_size']}, {doc['images']} JPEGs {doc['image_size'][0]}x{doc['image_size'][1]}"]
    lines += [f"  {name:<30} {v:>10.1f} images/s" for name, v in rows if v]
    lines += [f"  {k:<40} {v:>6.3f}" for k, v in doc["ratios"].items()]
    lines.append(f"  targets: {doc['targets']}; engine tests: {doc.get('engine_tests', {}).get('summary', 'not run')}")
    if doc["skipped"]:
        lines.append(f"  skipped (budget): {doc['skipped']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
