"""Which Ray cluster a command runs on, and one clear line when it cannot run there.

Real parts: a foreign ``ray start --head`` with its own token and one GPU advertised on this CPU
machine (``foreign_gpu_head``), ``odin-audit`` run as a subprocess the way a user runs it.
Run under the Ray lock: ``flock /tmp/odin-ray.lock timeout 900 pytest tests/test_cluster.py``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, VENV_BIN, make_images
from _forkserver import run_command

slow = pytest.mark.slow  # every test that starts Ray
ERROR_PREFIX = "odin-audit score: error: "


def _score(env: dict, tmp_path: Path, *args: str, out: Path | None = None, timeout: float = 600):
    """``odin-audit score --quiet`` on 8 small images; returns (CompletedProcess, output dir)."""
    images = tmp_path / "images"
    if not images.exists():
        make_images(images, 8)
    out = out or tmp_path / "out"
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(tmp_path), env.get("PYTHONPATH")])))
    cmd = [str(VENV_BIN / "odin-audit"), "score", "--input", str(images), "--output", str(out), *args]
    return run_command(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout), out


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), lines
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    from odin_engine.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet20.pt"
    torch.save(CifarResNet(depth=20, num_classes=10).state_dict(), path)
    return ["--model", "cifar_resnet20", "--weights", str(path)]


@slow
def test_the_foreign_head_is_what_plain_ray_init_would_join(foreign_gpu_head):
    """The set-up reproduces the trap: Ray's own address resolution finds the foreign head."""
    code = "from ray._private import services; print(services.canonicalize_bootstrap_address(None))"
    out = subprocess.run([sys.executable, "-c", code], env=foreign_gpu_head.client_env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert out.rpartition(":")[2] == foreign_gpu_head.address.rpartition(":")[2]  # (127.0.0.1 shown as this host's IP)


@slow
def test_no_address_scores_on_a_private_cluster_beside_a_foreign_head(foreign_gpu_head, tmp_path, weights):
    proc, out = _score(foreign_gpu_head.client_env, tmp_path, *weights)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on a private local Ray cluster (" in proc.stdout and "GPU" not in proc.stdout, proc.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"ok": 8, "error": 0, "total": 8} and run["verification"]["exactly_once"]
    cluster = run["attempts"][-1]["cluster"]
    assert cluster["how"] == "local" and cluster["address"] != foreign_gpu_head.address and cluster["gpus"] == 0
    # a private cluster serves no dashboard: no HTTP server, none of its ten module processes
    logs = Path(re.search(r"Ray's own output is in (\S+) ", proc.stdout).group(1))
    assert "http server disabled" in (logs / "dashboard.log").read_text()
    assert not list(logs.glob("dashboard_*Head*")), sorted(p.name for p in logs.iterdir())


@slow
@pytest.mark.parametrize("how", ["flag without token", "flag with wrong token", "RAY_ADDRESS with wrong token"])
def test_a_refused_token_is_one_line_and_writes_nothing(foreign_gpu_head, tmp_path, weights, how):
    env, args = dict(foreign_gpu_head.client_env), ["--quiet"]
    if "wrong" in how:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    if how.startswith("flag"):
        args += ["--ray-address", foreign_gpu_head.address]
    else:
        env["RAY_ADDRESS"] = foreign_gpu_head.address
    proc, out = _score(env, tmp_path, *weights, *args)
    line = _one_error_line(proc)
    assert f"Ray cluster at {foreign_gpu_head.address}" in line and "refused" in line, line
    assert "RAY_AUTH_MODE=token" in line and "~/.ray/auth_token" in line and "RAY_AUTH_TOKEN" in line, line
    assert not out.exists()


@slow
def test_an_unreachable_address_is_one_line(tmp_path, weights, foreign_gpu_head):
    from conftest import free_port

    proc, out = _score(foreign_gpu_head.client_env, tmp_path, *weights, "--quiet",
                       "--ray-address", f"127.0.0.1:{free_port()}", timeout=120)
    assert "cannot reach the Ray cluster at 127.0.0.1:" in _one_error_line(proc)
    assert not out.exists()


@slow
def test_a_gpu_node_where_torch_sees_no_cuda_is_one_line(foreign_gpu_head, tmp_path, weights):
    """``--ray-address auto`` joins the foreign head on purpose; it advertises a GPU that torch cannot use."""
    proc, out = _score(foreign_gpu_head.env_with_token(), tmp_path, *weights, "--quiet", "--ray-address", "auto")
    line = _one_error_line(proc)
    assert f"scoring actors cannot start on node {socket.gethostname()}" in line, line
    assert "sees no CUDA device" in line and "--num-gpus 0" in line, line
    assert not out.exists()


FACTORIES = textwrap.dedent('''
    """Model factories that fail where a user's would: everywhere, or only on the workers."""
    import os
    from pathlib import Path

    from odin_engine.models.cifar_resnet import CifarResNet


    def broken():
        raise ValueError("no such backbone: resnet-999")


    def _net():
        import torch

        torch.manual_seed(0)  # the same weights in every process: the driver checks the model id
        net = CifarResNet(depth=20, num_classes=10)
        net.mean, net.std, net.input_size = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32
        return net


    def worker_only():
        """Works in the driver; fails in any Ray worker (a file only the driver's machine has)."""
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            raise FileNotFoundError("/data/labels.txt")
        return _net()


    def late():
        """Works for the driver and the preflight probe (calls 1-2); fails in the pipeline's actors."""
        counter = Path(__file__).with_name("calls")  # beside this file: the workers see no test env
        n = int(counter.read_text() or 0) + 1 if counter.exists() else 1
        counter.write_text(str(n))
        if n > 2:
            raise RuntimeError("out of licences for this backbone")
        return _net()
''')


@pytest.fixture
def factories(tmp_path):
    (tmp_path / "odin_test_factories.py").write_text(FACTORIES)
    return "odin_test_factories"


@slow
def test_a_factory_that_raises_is_one_line(tmp_path, factories, foreign_gpu_head):
    proc, out = _score(foreign_gpu_head.client_env, tmp_path, "--model", f"{factories}:broken", "--quiet",
                       timeout=180)
    line = _one_error_line(proc)
    assert f"model factory '{factories}:broken' raised ValueError: no such backbone" in line, line
    assert not out.exists()


@slow
def test_a_factory_that_raises_on_the_workers_is_one_line(tmp_path, factories, ray_head):
    # on the session's cluster (which one is not the point): Ray puts the driver's cwd on the workers' path
    proc, out = _score(ray_head.env, tmp_path, "--model", f"{factories}:worker_only", "--quiet")
    line = _one_error_line(proc)
    assert "scoring actors cannot start on node" in line and "FileNotFoundError: /data/labels.txt" in line, line
    assert "fix the model or its factory" in line, line
    assert not out.exists()


@slow
def test_an_actor_failing_inside_the_pipeline_is_one_line_and_resumable(tmp_path, factories, ray_head):
    env = ray_head.env
    proc, out = _score(env, tmp_path, "--model", f"{factories}:late", "--quiet")
    line = _one_error_line(proc)
    assert "scoring actors cannot start: on node" in line and "out of licences" in line, line
    assert (out / "_odin_job.json").exists()  # what a rerun resumes from
    (tmp_path / "calls").write_text("-100")  # the licence server is back
    proc, out = _score(env, tmp_path, "--model", f"{factories}:late")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "run.json").read_text())["counts"]["total"] == 8


TOOL_LINE = ("odin score:", "odin-audit score:")


@slow
def test_quiet_output_is_only_the_tools_own_lines(foreign_gpu_head, tmp_path, weights):
    """``--quiet``: no Ray INFO/WARNING lines, no Ray Data progress or plan, no C++ log lines."""
    proc, out = _score(foreign_gpu_head.client_env, tmp_path, *weights, "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    foreign = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and not ln.startswith(TOOL_LINE)]
    assert not foreign, foreign
    # ... and the one-line result is kept (#12: --quiet silences Ray, not the answer)
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("odin score:")]
    assert len(result) == 1 and "8 rows" in result[0] and "exactly once: True" in result[0], proc.stdout
    assert json.loads((out / "run.json").read_text())["counts"]["total"] == 8


# --------------------------------------------------------------------------- the one-line wording (no Ray)
def test_start_failures_are_worded_with_the_fix():
    from jobs.preflight import WorkerStartError, check_device, classify
    from odin_engine.errors import CheckpointError, ConfigError

    err = classify(ConfigError("weights file not found: /models/r50.pt"), "torchvision:resnet50", "/models/r50.pt")
    assert "cannot read the weights /models/r50.pt" in str(err) and "every node" in err.fix
    err = classify(CheckpointError("/m.pt is not a readable PyTorch checkpoint"), "cifar_resnet20", "/m.pt")
    assert "cannot read the weights /m.pt" in err.what
    err = classify(RuntimeError("CUDA error: no kernel image is available"), "x:y", None)
    assert "the GPU failed" in err.what and "driver" in err.fix
    err = classify(KeyError("backbone"), "pkg:factory", None)
    assert "'pkg:factory' raised KeyError" in err.what and "\n" not in str(err)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(WorkerStartError, match="sees no CUDA device"):
            check_device("cuda")
    check_device("cpu")  # nothing to check


def test_cluster_choice_rules_and_summary(monkeypatch):
    from jobs.ray_utils import Cluster, _choice

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _choice(None) == ("local", "local") and _choice("local") == ("local", "local")
    assert _choice("auto") == ("auto", "auto")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _choice(None) == ("RAY_ADDRESS", None)  # ray.init reads it, with the token file, as Ray documents
    assert _choice("10.0.0.2:6379") == ("--ray-address", "10.0.0.2:6379")  # the flag wins
    assert Cluster("local", "x:1", {"CPU": 2.0}).summary() == "on a private local Ray cluster (2 CPUs)"
    assert Cluster("RAY_ADDRESS", "10.0.0.1:6379", {"CPU": 64.0, "GPU": 8.0}).summary() == \
        "on cluster 10.0.0.1:6379 (RAY_ADDRESS; 64 CPUs, 8 GPUs)"
