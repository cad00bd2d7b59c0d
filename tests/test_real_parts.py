"""A run whose real parts cannot start fails under CI=true, and skips with a summary elsewhere.

The parts are made really unavailable, not simulated: pytest runs in a throw-away virtualenv that
shares this one's packages (``lib/``) but has only ``python`` in ``bin/``, with a ``PATH`` that
holds no ``ray``, ``moto_server`` or ``gcp-storage-emulator`` — so ``ray start`` and the S3
server cannot be launched, exactly as on a fresh clone without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PARTS = ("ray", "moto_server", "gcp-storage-emulator")
# one job-level test of test_score_job.py (needs the Ray head) and one S3 test (needs the S3 server only)
SELECTION = ["tests/test_score_job.py::test_ray_job_submit_end_to_end_then_resume_and_refuse",
             "tests/test_corpus.py::test_s3_directory_and_manifest"]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> tuple[str, dict]:
    """``python`` of a virtualenv without the real parts' executables, and an environment for it."""
    venv = Path(sys.prefix)
    if venv == Path(sys.base_prefix) or not (venv / "pyvenv.cfg").is_file():
        pytest.skip("the tests do not run in a virtualenv: cannot build one without its executables")
    bare = tmp_path_factory.mktemp("bare-venv")
    shutil.copy(venv / "pyvenv.cfg", bare / "pyvenv.cfg")
    for sub in ("lib", "lib64"):
        if (venv / sub).exists():
            (bare / sub).symlink_to(venv / sub)
    (bare / "bin").mkdir()
    (bare / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not any(Path(d, exe).exists() for exe in PARTS))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
    env.update(PATH=path, PYTHONPATH=str(REPO))
    probe = subprocess.run([str(bare / "bin" / "python"), "-c", "import sys, shutil, torch, ray, pytest; "
                            f"print(sys.prefix, [shutil.which(e) for e in {PARTS!r}])"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split()[0] == str(bare) and "[None, None, None]" in probe.stdout, probe.stdout
    return str(bare / "bin" / "python"), env


def _pytest(python: str, env: dict, ci: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = dict(env)
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q", *extra, *SELECTION], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


# as scripts/test runs the suite (two pytest-xdist workers), and in one process
WORKERS = [pytest.param((), id="one-process"), pytest.param(("-n", "2", "--dist", "loadfile"), id="xdist")]


@pytest.mark.parametrize("workers", WORKERS)
def test_under_ci_a_missing_ray_head_and_s3_server_fail_the_run(bare_python, workers):
    p = _pytest(*bare_python, "true", *workers)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-4000:]
    assert "2 error" in out and "skipped" not in out.split("real parts not available")[0].lower(), out[-4000:]
    assert "Ray head is required under CI=true and could not be started: no `ray` executable" in out, out[-4000:]
    assert "S3 server (moto_server) is required under CI=true" in out, out[-4000:]
    assert "real parts not available: their tests FAILED (CI=true)" in out, out[-4000:]


@pytest.mark.parametrize("workers", WORKERS)
def test_on_a_developer_machine_they_skip_and_the_summary_says_so(bare_python, workers):
    p = _pytest(*bare_python, None, *workers)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "2 skipped" in out, out[-4000:]
    summary = out.split("real parts not available: their tests were skipped", 1)
    assert len(summary) == 2, out[-4000:]
    assert "Ray head: no `ray` executable" in summary[1] and "S3 server (moto_server): no `moto_server`" in summary[1]


@pytest.mark.slow
def test_the_shared_ray_head_leaves_no_process_behind(tmp_path):
    """Ray hygiene: after a session that used ``ray_head``, none of its processes is left — GCS,
    raylet, dashboard, agents (their command lines name its temp dir), its Ray Client server,
    which ``ray start`` leaves an orphan whose command line names only its port, and its worker
    server (``tests/_forkserver.py --ray-workers``, which the head's first worker starts) with its
    socket's folder."""
    from conftest import process_cmdlines

    record = tmp_path / "head.txt"
    (tmp_path / "test_probe.py").write_text(
        "from pathlib import Path\n"
        "def test_probe(ray_head):\n"
        "    ray_head.worker_server_up()\n"
        f"    Path({str(record)!r}).write_text(f'{{ray_head.temp_dir}} {{ray_head.client_port}} {{ray_head.worker_sock}}')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "conftest", "-q",
                        str(tmp_path / "test_probe.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    temp_dir, client_port, worker_sock = record.read_text().split()
    left = {pid: cmd for pid, cmd in process_cmdlines().items()
            if temp_dir in cmd or ("ray.util.client.server" in cmd and f"--port={client_port} " in f"{cmd} ")
            or (worker_sock != "None" and worker_sock in cmd)}
    assert not left, left
    if worker_sock != "None":
        assert not os.path.exists(os.path.dirname(worker_sock))
