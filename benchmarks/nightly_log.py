"""A nightly audit's log as an operator reads it: 10,000 images, no TTY, default output.

    python -m benchmarks.nightly_log --data ../shared/data [--work /tmp/odin-nightly]

1. Writes PNG files from the test bed: ``heldout/`` (1,000 CIFAR-10 test images) and ``night/``
   (the other 9,000 CIFAR-10 test images and 1,000 Tiny-ImageNet crops: a night with 10% of
   images the model has never seen the like of).
2. Once: calibrates ResNet-20 (test-bed weights, T=1000, ε=0.0014) on ``heldout/`` (``--quiet``).
3. The night: ``odin-audit audit --corpus night/ --calibration … --history …`` on a private local
   Ray cluster, stdout and stderr into one file as cron or ``kubectl logs`` would keep them
   (``>> nightly.log 2>&1``: no TTY). Prints that file's lines, each with the second it arrived
   at, its line count, and the longest silence between two lines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _write(d: Path, imgs: np.ndarray, prefix: str) -> None:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(d / f"{prefix}{i:05d}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / ".." / "shared" / "data"))
    ap.add_argument("--work", default="/tmp/odin-nightly")
    args = ap.parse_args(argv)
    data, work = Path(args.data), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cifar = np.load(data / "cifar10_test_jpeg_yoongikim.npz", allow_pickle=False)["images"]
    tin = np.load(data / "ood" / "tin_crop.npz", allow_pickle=False)["images"]
    order = np.random.default_rng(0).permutation(len(cifar))
    _write(work / "heldout", cifar[order[:1000]], "cifar")
    _write(work / "night", cifar[order[1000:]], "cifar")
    _write(work / "night", tin[:1000], "tin")
    odin = [str(Path(sys.executable).parent / "odin-audit"), "audit"]
    model = ["--model", "cifar_resnet20", "--weights", str(data / "weights" / "resnet20-12fca82f.th")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    subprocess.run([*odin, "--corpus", str(work / "heldout"), "--heldout", str(work / "heldout"),
                    "--output", str(work / "calibration"), *model, "--quiet"], env=env, check=True)
    cmd = [*odin, "--corpus", str(work / "night"), "--output", str(work / "audits" / "night-1"), *model,
           "--calibration", str(work / "calibration" / "calibration.json"), "--history", str(work / "history")]
    print("$", " ".join(cmd), ">> nightly.log 2>&1", flush=True)
    log = work / "nightly.log"
    stamps: list[float] = []
    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def copy():
            for line in proc.stdout:
                stamps.append(time.monotonic() - t0)
                fh.write(line)
                fh.flush()

        reader = threading.Thread(target=copy)
        reader.start()
        rc = proc.wait()
        reader.join()
    total = time.monotonic() - t0
    text = log.read_text()
    for t, line in zip(stamps, text.splitlines()):
        print(f"[{t:5.0f} s] {line}")
    times = [0.0, *stamps, total]
    print(f"--- exit {rc}; {len(text.splitlines())} lines in {total:.0f} s; longest silence between lines "
          f"{max(b - a for a, b in zip(times, times[1:])):.0f} s; log: {log}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
