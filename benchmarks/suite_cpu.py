"""Where a command's machine CPU goes, by kind of process: runs COMMAND, samples every process's
CPU time (``/proc/<pid>/stat``, utime + stime) every ``--interval`` seconds until it exits, and
prints CPU-seconds per kind (pytest, forked job commands, scoring actors, probe tasks, Ray's own
processes, moto, …). Processes alive before the command count only what they used during it.

    python -m benchmarks.suite_cpu [--interval 0.5] [--json FILE] -- ./scripts/test

Ray workers retitle themselves (``ray::MapWorker…``, ``ray::odin_preflight_probe``, ``ray::IDLE``):
a worker counts under the first task title seen (the later tasks it was reused for included); one
whose tasks were all shorter than the interval shows as ``ray::IDLE (no task seen)``. CPU used between a process's last sample and its exit is not seen (at most one
interval per process), so short-lived processes are undercounted a little. Figures in
docs/testing.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
KINDS = (  # (kind, substring of any command line the process had), first match wins
    ("gcs_server", "gcs_server"), ("raylet", "/raylet "), ("ray dashboard", "dashboard"),
    ("ray log_monitor", "log_monitor"), ("ray monitor", "monitor.py"), ("moto", "moto_server"),
    ("gcs emulator", "gcp-storage-emulator"), ("chromium", "chrom"),
    ("ray worker server (tests/_forkserver.py)", "--ray-workers"),
    ("forked job command (tests/_forkserver.py)", "_forkserver"), ("ray CLI", "bin/ray "),
    # commands before pytest: a test's command line names its tmp_path, /tmp/pytest-of-<user>/…
    ("job command (subprocess)", "-m jobs"), ("job command (subprocess)", "bin/odin-audit"),
    ("benchmark (subprocess)", "-m benchmarks"),
    ("pytest", "-m pytest"), ("pytest", "bin/pytest"), ("pytest (xdist worker)", "exec(eval(sys.stdin.readline()))"),
    ("pip", "-m pip"), ("pip", "bin/pip"), ("pip", "bin/uv"),
)


def _stat(pid: str) -> tuple[str, float, str] | None:
    """(comm, CPU-seconds, start time) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            st = fh.read()
    except OSError:
        return None
    close = st.rindex(")")
    fields = st[close + 2:].split()
    return st[st.index("(") + 1:close], (int(fields[11]) + int(fields[12])) / HZ, fields[19]


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return ""


def kind(titles: list[str], comm: str) -> str:
    """A Ray worker: the first task or actor it was seen running (``ray::MapWorker``,
    ``ray::odin_preflight_probe``, …; ``ray::IDLE`` when none was seen); else by command line."""
    tasks = [t.split("(")[0].split()[0].split(".")[0] for t in titles if t.startswith("ray::") and not t.startswith("ray::IDLE")]
    if tasks:
        return tasks[0]
    text = " ".join(titles)
    if all("ray-launcher" in t for t in titles):  # the tests' worker launcher, waiting for its forked worker
        return "ray worker launcher (tests/_forkserver.py)"
    if "ray::IDLE" in text or "default_worker.py" in text:
        return "ray::IDLE (no task seen)"
    for name, needle in KINDS:
        if needle in text:
            return name
    return "other python" if "python" in text else f"other ({comm})"


def sample(procs: dict, first: bool) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        got = _stat(pid)
        if got is None:
            continue
        comm, cpu, start = got
        key = f"{pid}-{start}"
        seen = procs.get(key)
        if seen is None:
            procs[key] = {"base": cpu if first else 0.0, "cpu": cpu, "comm": comm, "titles": [_cmdline(pid)]}
        else:
            seen["cpu"] = max(seen["cpu"], cpu)
            if comm != seen["comm"]:  # retitled (setproctitle sets comm too): keep each title
                seen["comm"] = comm
                seen["titles"].append(_cmdline(pid))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default 0.5)")
    p.add_argument("--json", default=None, help="also write every process's record here")
    p.add_argument("--from-json", default=None, help="print the table of an earlier run's --json file instead")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    return p


def main(args: argparse.Namespace) -> int:
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        print_table(saved["procs"], saved["command"], saved["returncode"], saved["wall_s"])
        return 0
    if not cmd:
        print("give a command after --", file=sys.stderr)
        return 2
    procs: dict = {}
    sample(procs, first=True)
    t0 = time.monotonic()
    child = subprocess.Popen(cmd)
    while child.poll() is None:
        time.sleep(args.interval)
        sample(procs, first=False)
    wall = time.monotonic() - t0
    print_table(procs, cmd, child.returncode, wall)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": cmd, "returncode": child.returncode, "wall_s": wall, "procs": procs}, fh)
    return child.returncode


def print_table(procs: dict, cmd: list[str], returncode: int, wall: float) -> None:
    per, count = collections.Counter(), collections.Counter()
    for rec in procs.values():
        used = rec["cpu"] - rec["base"]
        if used > 0:
            k = kind(rec["titles"], rec["comm"])
            per[k] += used
            count[k] += 1
    total = sum(per.values())
    print(f"\n{' '.join(cmd)}: exit {returncode}, {wall:.0f} s wall, {total:.0f} CPU-s seen "
          f"({total / wall:.2f} cores busy on average)")
    print(f"{'CPU-s':>8} {'share':>6} {'procs':>6}  kind")
    for k, v in per.most_common():
        print(f"{v:8.1f} {100 * v / total:5.1f}% {count[k]:6d}  {k}")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
