"""benchmarks/suite_cpu.py: a command's machine CPU by kind of process (docs/testing.md quotes it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.suite_cpu import kind

REPO = Path(__file__).resolve().parents[1]


def test_a_ray_worker_counts_under_the_first_task_it_ran():
    boot = "/venv/bin/python /venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py --node-ip…"
    assert kind([boot, "ray::odin_preflight_probe", "ray::IDLE", "ray::list_unit_task"], "ray::IDLE") \
        == "ray::odin_preflight_probe"
    assert kind([boot, "ray::MapWorker(MapBatches(read_and_decode)->MapBatches(ScoreBatch))"], "ray::MapWorker(") \
        == "ray::MapWorker"
    assert kind([boot, "ray::_StatsActor.register_dataset"], "ray::_StatsActor") == "ray::_StatsActor"
    assert kind([boot, "ray::IDLE"], "ray::IDLE") == "ray::IDLE (no task seen)"
    assert kind(["/venv/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))"], "python") \
        == "pytest (xdist worker)"
    assert kind(["/venv/bin/moto_server -H 127.0.0.1 -p 5000"], "moto_server") == "moto"
    # a test's command names its tmp_path (/tmp/pytest-of-root/…): a job command, not pytest
    assert kind(["/venv/bin/python /venv/bin/odin-audit score --input /tmp/pytest-of-root/pytest-3/t0/images"],
                "odin-audit") == "job command (subprocess)"
    assert kind(["/venv/bin/python -m pytest -p no:cacheprovider -q tests/x.py"], "python") == "pytest"
    assert kind([""], "kdamond.0") == "other (kdamond.0)"
    launcher = "/venv/bin/python -S /tmp/pytest-of-root/pytest-3/ray-launcher0/python /ray/_private/workers/default_worker.py"
    assert kind([launcher], "python") == "ray worker launcher (tests/_forkserver.py)"
    assert kind([launcher, "/venv/bin/python /ray/_private/workers/default_worker.py"], "python") \
        == "ray::IDLE (no task seen)"  # exec'd into a worker itself
    assert kind(["/venv/bin/python /repo/tests/_forkserver.py --ray-workers /tmp/odin-w-x/s --head-temp-dir=/tmp/r"],
                "python") == "ray worker server (tests/_forkserver.py)"


def test_it_measures_the_command_it_runs_and_rereads_its_json(tmp_path):
    record = tmp_path / "cpu.json"
    marker = f"suite-cpu-test-{tmp_path.name}"  # other tests' processes may run beside it
    burn = f"# {marker}\nimport time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suite_cpu", "--interval", "0.1", "--json", str(record),
                           "--", sys.executable, "-c", burn], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CPU-s seen" in proc.stdout and "  other python" in proc.stdout, proc.stdout
    saved = json.loads(record.read_text())
    assert saved["returncode"] == 0 and saved["command"][-1] == burn
    child = [r for r in saved["procs"].values() if marker in " ".join(r["titles"])]
    assert len(child) == 1 and 1.2 <= child[0]["cpu"] - child[0]["base"] <= 3.0, child  # its 1.5 CPU-s, sampled
    again = subprocess.run([sys.executable, "-m", "benchmarks.suite_cpu", "--from-json", str(record)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == proc.stdout.strip(), again.stdout + again.stderr
