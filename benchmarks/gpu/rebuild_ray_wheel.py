"""Rebuild Ray's wheel small enough to travel to the lent GPU machine, with the wheels it lacks there.

    python benchmarks/gpu/rebuild_ray_wheel.py                       # → .whl/ (Python 3.12, x86-64)
    python benchmarks/gpu/rebuild_ray_wheel.py --python-version 3.11 --dest /tmp/w --check

The device tool carries at most 64 MiB; Ray 2.60's manylinux wheel is ~79 MB. This downloads it
(``pip download ray==2.60.0 --no-deps``), drops what the scoring job never imports —
``ray/jars`` (Java), ``ray/rllib``, ``ray/serve`` and the dashboard's JavaScript source maps —
and writes the wheel again with its ``RECORD`` rewritten to the files that remain (each file's
zip attributes, executable bits included, are kept). It also downloads the pure-Python
dependencies the GPU machine's image lacks (``EXTRA_WHEELS``; the image has torch, pyarrow,
pandas, click, msgpack, protobuf, requests, …: docs/gpu.md). ``--check`` installs the rebuilt
wheel into a throwaway target directory and runs a small Ray Data pipeline from it (needs the
rebuilt wheel to match this interpreter: ``--python-version`` = this Python).
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RAY_VERSION = "2.60.0"
DROP = ("ray/jars/*", "ray/rllib/*", "ray/serve/*", "ray/dashboard/client/build/*.map")
# Ray's core requirements that the GPU machine's image does not have (jsonschema and its own).
EXTRA_WHEELS = ("jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
LIMIT_BYTES = 60 * 1024 * 1024  # what may travel, leaving room for the working tree


def pip_download(requirement: str, dest: Path, python_version: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version, "-d", str(dest), requirement]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    before = set(dest.glob("*.whl"))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    new = set(dest.glob("*.whl")) - before
    name = requirement.split("=")[0].replace("-", "_").lower()
    found = new or {p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")}
    return sorted(found)[-1]


def _dropped(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in DROP)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(src: Path, dest: Path) -> dict:
    """Copy wheel ``src`` to ``dest`` without the :data:`DROP` files; RECORD lists exactly what remains."""
    kept = dropped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in zin.infolist():
            if info.filename == record_name:
                continue
            if _dropped(info.filename):
                dropped += 1
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)  # same name, time and attributes
            if not info.is_dir():
                rows.append([info.filename, _record_hash(data), str(len(data))])
                kept += 1
        rows.append([record_name, "", ""])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        zout.writestr(zin.getinfo(record_name), buf.getvalue().encode())
    return {"kept_files": kept, "dropped_files": dropped, "bytes_before": src.stat().st_size,
            "bytes_after": dest.stat().st_size}


RAY_DATA_CHECK = """
import sys, ray, ray.data
assert ray.__file__.startswith(sys.argv[1]), ("ray imported from", ray.__file__)
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
class Double:
    def __call__(self, b):
        b["y"] = b["id"] * 2
        return b
ds = ray.data.range(200).map_batches(lambda b: {"id": b["id"] + 1}).map_batches(
    Double, compute=ray.data.ActorPoolStrategy(size=1), batch_size=50)
total = sum(r["y"] for r in ds.take_all())
assert total == 2 * sum(range(1, 201)), total
print("ray data ok from", ray.__file__, ray.__version__)
"""


def check(wheel: Path) -> str:
    """Install ``wheel`` into a throwaway directory and run a Ray Data pipeline (actor pool included) from it."""
    with tempfile.TemporaryDirectory(prefix="ray-slim-") as target:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", target,
                        str(wheel)], check=True)
        env = {**__import__("os").environ, "PYTHONPATH": target, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run([sys.executable, "-c", RAY_DATA_CHECK, target], env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode:
            raise SystemExit(f"Ray Data failed from the rebuilt wheel:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        return proc.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[2] / ".whl")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (3.12)")
    ap.add_argument("--ray-version", default=RAY_VERSION)
    ap.add_argument("--no-extras", action="store_true", help="only the Ray wheel")
    ap.add_argument("--check", action="store_true", help="run a Ray Data pipeline from the rebuilt wheel")
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ray-wheel-") as tmp:
        full = pip_download(f"ray=={args.ray_version}", Path(tmp), args.python_version)
        for old in args.dest.glob("ray-*.whl"):
            old.unlink()
        stats = slim_wheel(full, args.dest / full.name)
    print(f"{full.name}: {stats['bytes_before'] / 2**20:.1f} MiB -> {stats['bytes_after'] / 2**20:.1f} MiB "
          f"({stats['dropped_files']} files dropped, {stats['kept_files']} kept)")
    if not args.no_extras:
        for name in EXTRA_WHEELS:
            from importlib.metadata import PackageNotFoundError, version

            try:
                req = f"{name}=={version(name)}"  # the version this project is tested with
            except PackageNotFoundError:
                req = name
            print(f"  + {pip_download(req, args.dest, args.python_version).name}")
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{args.dest}: {total / 2**20:.1f} MiB of wheels (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    if total > LIMIT_BYTES:
        print("too large to travel with the working tree", file=sys.stderr)
        return 1
    if args.check:
        print(check(args.dest / full.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
