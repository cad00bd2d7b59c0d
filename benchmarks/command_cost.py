"""What one small job command costs the machine, started as a fresh interpreter and through the
tests' fork server (``tests/_forkserver.py``): wall time and machine CPU-seconds (``/proc/stat``,
all processes: driver, Ray workers, Ray itself) of a 6-image ``score`` on a private Ray head.

    python -m benchmarks.command_cost [--runs 3] [--images 6]
    python -m benchmarks.command_cost --forked-workers [--runs 4]
    python -m benchmarks.command_cost --private-start [--runs 3]

``--forked-workers`` compares, both commands forked, a head whose Ray workers start as Ray starts
them with a second head whose workers the tests' worker server forks (``tests/_forkserver.py``,
``launch_ray_worker``), the two alternated.

``--private-start`` measures instead what a private local cluster (a command with no address)
costs to start, run one task and stop, with Ray's dashboard (``ray.init``'s default) and without
it (what ``jobs.ray_utils.connect_cluster`` starts), the two ways interleaved.

The head is ``deploy/dev-ray-head.sh`` on free ports, its own temp dir and token, stopped at the
end. Each run waits ``--settle`` seconds after the command, so the workers' exit is counted; the
head's idle CPU over the same time is measured first and subtracted. Figures in docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def machine_cpu_s() -> float:
    """CPU-seconds all processes used since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="commands per way (default 3)")
    p.add_argument("--images", type=int, default=6, help="images in the corpus (default 6)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds counted after each command (default 3)")
    p.add_argument("--forked-workers", action="store_true",
                   help="compare two heads instead: workers started as Python (Ray's way) and forked by the "
                        "tests' worker server (tests/_forkserver.py), both commands forked")
    p.add_argument("--private-start", action="store_true",
                   help="measure a private local cluster's start with and without the dashboard instead")
    return p


def measure(ways: dict[str, Callable[[int], subprocess.CompletedProcess]], runs: int, settle: float,
            idle_per_s: float = 0.0) -> bool:
    """Run each way ``runs`` times, interleaved; print each run's and each way's median wall time and
    machine CPU-seconds (``settle`` s after the command counted, ``idle_per_s`` subtracted). False
    (with the stderr) when a command failed."""
    rows: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    for run in range(runs):
        for way, start in ways.items():
            c0, t0 = machine_cpu_s(), time.monotonic()
            proc = start(run)
            wall = time.monotonic() - t0
            time.sleep(settle)
            cpu = machine_cpu_s() - c0 - idle_per_s * (time.monotonic() - t0)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return False
            rows[way].append((wall, cpu))
            print(f"run {run} {way:<15} wall {wall:5.1f} s   machine CPU {cpu:5.1f} s", flush=True)
    for way, r in rows.items():
        print(f"{way:<15} median wall {statistics.median(w for w, _ in r):5.1f} s   "
              f"median machine CPU {statistics.median(c for _, c in r):5.1f} s")
    return True


PRIVATE_START = """
import ray
ray.init(address="local", include_dashboard={dashboard}, num_cpus=2, log_to_driver=False, _temp_dir={temp!r})
ray.get(ray.remote(lambda: 1).remote())
ray.shutdown()
"""


def private_start(args: argparse.Namespace) -> int:
    """A private cluster's start + one task + stop, dashboard on (Ray's default) and off, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="odin-cc-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def way(dashboard: bool | None) -> Callable[[int], subprocess.CompletedProcess]:
        return lambda run: subprocess.run(
            [sys.executable, "-c", PRIVATE_START.format(dashboard=dashboard, temp=str(work / f"ray-{run}-{dashboard}"))],
            env=env, capture_output=True, text=True, timeout=300)

    try:
        return 0 if measure({"with dashboard": way(None), "without": way(False)}, args.runs, args.settle) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    if args.private_start:
        return private_start(args)
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    import _forkserver
    from conftest import free_port  # the test suite's helper

    from jobs.ray_utils import LOCAL_CLUSTER_ENV
    from odin_engine.models.cifar_resnet import CifarResNet

    work = Path(tempfile.mkdtemp(prefix="odin-cc-"))
    corpus = work / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(corpus / f"img_{i:03d}.png")
    torch.manual_seed(0)
    torch.save(CifarResNet(depth=20, num_classes=10).state_dict(), work / "model.pt")

    gcs, dash, client = free_port(), free_port(), free_port()
    head = dict(os.environ, RAY_PORT=str(gcs), RAY_DASHBOARD_PORT=str(dash), RAY_CLIENT_PORT=str(client),
                RAY_DEV_TEMP_DIR=str(work / "ray"), RAY_AUTH_TOKEN=secrets.token_hex(32))
    head.pop("RAY_ADDRESS", None)
    script = str(REPO / "deploy" / "dev-ray-head.sh")
    subprocess.run([script], env=head, check=True, capture_output=True, text=True, timeout=300)
    env = dict(head, RAY_ADDRESS=f"127.0.0.1:{gcs}", RAY_AUTH_MODE="token")
    os.environ["ODIN_TEST_FORK"] = "1"

    def score(run_with: Callable[..., subprocess.CompletedProcess], way: str,
              on: dict | None = None) -> Callable[[int], subprocess.CompletedProcess]:
        return lambda run: run_with(
            [sys.executable, "-m", "jobs.cli", "score", "--input", str(corpus), "--output", str(work / f"out-{way}-{run}"),
             "--model", "cifar_resnet20", "--weights", str(work / "model.pt"), "--quiet"],
            cwd=REPO, env=on or env, capture_output=True, text=True, timeout=600)

    heads, work_dirs = [head], [str(work)]
    ways = {"subprocess": score(subprocess.run, "subprocess"), "fork": score(_forkserver.run_command, "fork")}
    try:
        if args.forked_workers:  # a second head whose workers the tests' worker server forks
            gcs2, dash2, client2 = free_port(), free_port(), free_port()
            head2 = dict(head, RAY_PORT=str(gcs2), RAY_DASHBOARD_PORT=str(dash2), RAY_CLIENT_PORT=str(client2),
                         RAY_DEV_TEMP_DIR=str(work / "ray2"), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                         PATH=f"{Path(sys.executable).parent}{os.pathsep}{head.get('PATH', '')}")
            heads.append(head2)
            (work / "bin").mkdir()
            launcher, sock = _forkserver.write_worker_launcher(str(work / "bin"))
            work_dirs.append(os.path.dirname(sock))
            subprocess.run(
                _forkserver.ray_start_with_launcher(launcher) + [
                    "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs2), "--dashboard-host",
                    "127.0.0.1", "--dashboard-port", str(dash2), "--include-dashboard", "true",
                    "--ray-client-server-port", str(client2), "--temp-dir", str(work / "ray2"), "--disable-usage-stats"],
                env=dict(head2, **LOCAL_CLUSTER_ENV), check=True, capture_output=True, text=True, timeout=300)
            env2 = dict(head2, RAY_ADDRESS=f"127.0.0.1:{gcs2}")
            _forkserver.prestart(env2)
            ways = {"plain workers": ways["fork"], "forked workers": score(_forkserver.run_command, "forked", env2)}
        _forkserver.prestart(env)
        time.sleep(8)  # the head's first workers and the fork server's imports settle
        c0 = machine_cpu_s()
        time.sleep(10)
        idle_per_s = (machine_cpu_s() - c0) / 10
        print(f"idle head(s): {idle_per_s:.2f} CPU-s/s (subtracted); {args.images} images, {args.runs} runs each way")
        ok = measure(ways, args.runs, args.settle, idle_per_s)
    finally:
        _forkserver.stop_servers()
        for h in heads:
            subprocess.run([script, "--stop"], env=h, capture_output=True, timeout=120)
        for d in work_dirs:
            shutil.rmtree(d, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
