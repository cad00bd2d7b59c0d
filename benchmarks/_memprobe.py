"""Run an ``odin-audit`` command with an in-process memory sampler (benchmarks only, not the product).

    ODIN_MEMPROBE=/tmp/peak.json python -m benchmarks._memprobe calibrate --scores … --output …

A thread samples the process every 20 ms; at the highest resident size (RSS) it records, per
allocator: pyarrow's memory pool (backend, bytes allocated now and its high-water mark), glibc
malloc (bytes in use, free bytes it retains, from ``mallinfo2``), the proportional set size
(PSS, ``/proc/self/smaps_rollup``), and the main thread's stack (which stage held the peak).
The rest of RSS is code, libraries and allocator retention outside these counters (mimalloc's
free pages). Written as JSON to ``$ODIN_MEMPROBE`` when the command ends.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import sys
import threading
import time
import traceback


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _pss_kib() -> int:
    try:
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    import pyarrow as pa

    out = os.environ.get("ODIN_MEMPROBE")
    pool = pa.default_memory_pool()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        libc = None
    main_id = threading.get_ident()
    peak: dict = {"rss_mib": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = _status_kib("VmRSS:") / 1024
            if rss > peak["rss_mib"]:
                mi = libc.mallinfo2() if libc is not None else None
                frame = sys._current_frames().get(main_id)
                stack = [f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})"
                         for f in traceback.extract_stack(frame)
                         if "odin_engine" in f.filename or "/jobs/" in f.filename] if frame else []
                peak.update({
                    "rss_mib": rss, "pss_mib": _pss_kib() / 1024,
                    "arrow_backend": pool.backend_name, "arrow_allocated_mib": pool.bytes_allocated() / 2**20,
                    "arrow_max_mib": pool.max_memory() / 2**20,
                    "malloc_in_use_mib": (mi.uordblks + mi.hblkhd) / 2**20 if mi else None,
                    "malloc_free_retained_mib": mi.fordblks / 2**20 if mi else None,
                    "stack": stack[-4:],
                })
            time.sleep(0.02)

    def write() -> None:
        done.set()
        peak["hwm_mib"] = _status_kib("VmHWM:") / 1024
        if out:
            with open(out, "w") as fh:
                json.dump(peak, fh)

    threading.Thread(target=sample, daemon=True).start()
    atexit.register(write)
    from jobs.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
