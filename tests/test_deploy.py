"""deploy/: every manifest parses, uses only documented KubeRay/Kubernetes fields, and runs real commands."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _env() -> dict:
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


def _schema() -> dict:
    """The ```yaml  # kuberay-schema``` block of deploy/README.md."""
    text = (DEPLOY / "README.md").read_text()
    m = re.search(r"```yaml\n# kuberay-schema\n(.*?)```", text, re.S)
    assert m, "deploy/README.md has no ```yaml # kuberay-schema block"
    return yaml.safe_load(m.group(1))


SCHEMA = _schema()


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _check(obj: dict, type_name: str, where: str, errors: list[str]) -> None:
    spec = SCHEMA[type_name]
    if not isinstance(obj, dict):
        errors.append(f"{where}: expected a mapping for {type_name}, got {type(obj).__name__}")
        return
    for key in obj:
        if key not in spec["fields"]:
            errors.append(f"{where}.{key}: not a documented {type_name} field")
    for key in spec.get("required", []):
        if key not in obj:
            errors.append(f"{where}: {type_name} requires {key!r}")
    for key, allowed in (spec.get("enums") or {}).items():
        if key in obj and obj[key] not in allowed:
            errors.append(f"{where}.{key}={obj[key]!r}: not one of {allowed}")


def _check_cluster(spec: dict, where: str, errors: list[str]) -> None:
    _check(spec, "RayClusterSpec", where, errors)
    if "authOptions" in spec:
        _check(spec["authOptions"], "AuthOptions", f"{where}.authOptions", errors)
    _check(spec.get("headGroupSpec", {}), "HeadGroupSpec", f"{where}.headGroupSpec", errors)
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        _check(g, "WorkerGroupSpec", f"{where}.workerGroupSpecs[{i}]", errors)


def _check_rayjob_spec(spec: dict, where: str, errors: list[str]) -> None:
    _check(spec, "RayJob.spec", where, errors)
    if "rayClusterSpec" in spec:
        _check_cluster(spec["rayClusterSpec"], f"{where}.rayClusterSpec", errors)


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """Every pod spec in a manifest, with a name for messages."""
    out = []

    def cluster(spec, prefix):
        out.append((f"{prefix}.headGroupSpec", spec["headGroupSpec"]["template"]["spec"]))
        for g in spec.get("workerGroupSpecs", []):
            out.append((f"{prefix}.{g['groupName']}", g["template"]["spec"]))

    if doc["kind"] == "RayJob":
        cluster(doc["spec"]["rayClusterSpec"], "rayClusterSpec")
    elif doc["kind"] == "RayCronJob":
        cluster(doc["spec"]["jobTemplate"]["rayClusterSpec"], "jobTemplate.rayClusterSpec")
    elif doc["kind"] == "RayCluster":
        cluster(doc["spec"], "spec")
    elif doc["kind"] == "CronJob":
        out.append(("jobTemplate", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def test_every_manifest_is_checked():
    kinds = {(d["apiVersion"], d["kind"]) for p in MANIFESTS for d in _docs(p)}
    assert kinds == {("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCronJob"), ("ray.io/v1", "RayCluster"),
                     ("batch/v1", "CronJob")}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_fields_match_documented_schema(path):
    errors: list[str] = []
    for doc in _docs(path):
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc.get('kind')} without metadata.name"
        kind, spec = doc["kind"], doc["spec"]
        if kind == "RayJob":
            _check_rayjob_spec(spec, "spec", errors)
        elif kind == "RayCronJob":
            _check(spec, "RayCronJob.spec", "spec", errors)
            _check_rayjob_spec(spec["jobTemplate"], "spec.jobTemplate", errors)
        elif kind == "RayCluster":
            _check_cluster(spec, "spec", errors)
        elif kind == "CronJob":
            _check(spec, "CronJob.spec", "spec", errors)
        else:
            errors.append(f"unexpected kind {kind}")
        for where, pod in _pod_specs(doc):
            for c in pod["containers"]:
                assert c.get("image"), f"{path.name} {where}: container without an image"
            ctx = pod.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, \
                f"{path.name} {where}: pods must run as a non-root user"
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_rayjob_essentials():
    (job,) = _docs(DEPLOY / "rayjob-audit.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    workers = cluster["workerGroupSpecs"]
    gpu = [c["resources"]["limits"].get("nvidia.com/gpu") for g in workers for c in g["template"]["spec"]["containers"]]
    assert any(gpu), "a GPU worker group is required"
    # the head mounts the audit config from a ConfigMap at the path the entrypoint reads
    head = cluster["headGroupSpec"]["template"]["spec"]
    cfg = [v for v in head["volumes"] if "configMap" in v]
    mounts = {m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert cfg and mounts[cfg[0]["name"]] == "/config"
    assert "--config /config/audit.toml" in spec["entrypoint"]


def test_raycronjob_template_is_the_rayjob():
    (job,) = _docs(DEPLOY / "rayjob-audit.yaml")
    (cron,) = _docs(DEPLOY / "raycronjob-audit.yaml")
    tmpl = dict(cron["spec"]["jobTemplate"])
    assert tmpl.pop("entrypoint").startswith(job["spec"]["entrypoint"] + " --output ")
    assert tmpl == {k: v for k, v in job["spec"].items() if k != "entrypoint"}
    assert len(cron["spec"]["schedule"].split()) == 5


def _entrypoints() -> list[tuple[str, str]]:
    """(where, shell command) for each project command the manifests run."""
    out = []
    for path in MANIFESTS:
        for doc in _docs(path):
            if doc["kind"] == "RayJob":
                out.append((f"{path.name} entrypoint", doc["spec"]["entrypoint"]))
            elif doc["kind"] == "RayCronJob":
                out.append((f"{path.name} entrypoint", doc["spec"]["jobTemplate"]["entrypoint"]))
            elif doc["kind"] == "CronJob":
                script = "\n".join(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
                submits = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("ray job submit")]
                assert submits, f"{path.name}: no `ray job submit` line"
                for line in submits:
                    before, after = line.split(" -- ", 1)
                    out.append((f"{path.name} submitter", "ray job submit"))
                    out.append((f"{path.name} submitted job", after))
    return out


ENTRYPOINTS = _entrypoints()


@pytest.mark.parametrize("where,command", ENTRYPOINTS, ids=[f"{w}: {c[:40]}" for w, c in ENTRYPOINTS])
def test_entrypoint_is_a_real_command(where, command, tmp_path):
    """Run each command as the manifest's shell would, with --help appended: it must exist and parse."""
    p = subprocess.run(["bash", "-c", f"{command} --help"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{where}: `{command} --help` exited {p.returncode}\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
    assert "usage:" in p.stdout.lower(), p.stdout[-2000:]
    if "jobs.audit" in command:
        # every flag the manifest passes is one the audit command knows
        flags = {t.split("=")[0] for t in shlex.split(command) if t.startswith("--")}
        unknown = {f for f in flags if not re.search(rf"(^|\s){re.escape(f)}[\s,=]", p.stdout)}
        assert not unknown, f"{where}: unknown flags {sorted(unknown)}"


def test_example_config_is_accepted_by_the_audit_command():
    import argparse

    from jobs import audit
    from jobs.options import load_config_defaults

    parser = argparse.ArgumentParser()
    audit.build_parser(parser)
    load_config_defaults(parser, str(DEPLOY / "audit.toml"), "audit")  # raises ConfigError on unknown keys
    args = parser.parse_args([])
    assert args.corpus and args.heldout and args.output and args.model and args.weights
    assert args.weights.startswith("/models/")  # where the manifests mount the models volume


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert "cuda" in base and base.startswith("pytorch/pytorch:")
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert re.search(r"pip install \.", text)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which is not in the repository"
    # every manifest uses one image, and it is this image's placeholder tag
    images = {c["image"] for p in MANIFESTS for d in _docs(p) for _, pod in _pod_specs(d) for c in pod["containers"]}
    assert len(images) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dev_ray_head_token_auth(tmp_path):
    """deploy/dev-ray-head.sh: starts a head with token auth; a job with the token runs, one without is refused."""
    env = _env()
    token = secrets.token_hex(16)
    dash = _free_port()
    env.update(
        RAY_PORT=str(_free_port()), RAY_DASHBOARD_PORT=str(dash), RAY_AUTH_TOKEN=token,
        RAY_DEV_TEMP_DIR=f"/tmp/odin-dev-{uuid.uuid4().hex[:8]}",
        RAY_CLIENT_PORT=str(_free_port()),
        RAY_START_ARGS=(f"--dashboard-agent-listen-port {_free_port()} "
                        "--min-worker-port 30000 --max-worker-port 30999 --num-cpus 1"),
    )
    script = str(DEPLOY / "dev-ray-head.sh")
    try:
        start = subprocess.run([script], env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        assert "token auth on" in start.stdout and f"http://127.0.0.1:{dash}" in start.stdout
        # as the README and the script's own message say: from the repository, --working-dir .
        submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", ".", "--", "python", "-m", "jobs.demo", "--help"]
        ok = subprocess.run(submit, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True,
                            timeout=300, cwd=REPO)
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        assert "usage: python -m jobs.demo" in ok.stdout and "succeeded" in ok.stdout
        # the head itself refuses a wrong token (not just the client lacking one)
        wrong = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        refused = subprocess.run(submit, env=wrong, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert refused.returncode != 0 and "usage: python -m jobs.demo" not in refused.stdout
        msg = (refused.stdout + refused.stderr).lower()
        assert "401" in msg or "unauthorized" in msg or "authentication" in msg, msg[-2000:]
    finally:
        stop = subprocess.run([script, "--stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    from conftest import process_cmdlines  # nothing of this head is left, its Ray Client server included

    client = f"--port={env['RAY_CLIENT_PORT']} "
    left = {pid: cmd for pid, cmd in process_cmdlines().items()
            if env["RAY_DEV_TEMP_DIR"] in cmd or ("ray.util.client.server" in cmd and client in f"{cmd} ")}
    assert not left, left


@pytest.mark.slow
@pytest.mark.parametrize("code", [0, 3])
def test_cronjob_pod_exits_with_the_audits_exit_code(ray_head, tmp_path, code):
    """The CronJob's pod script against a real token-auth head, the audit replaced by a driver exiting ``code``:
    the pod exits ``code`` too, so a drift alarm (3) fails the Kubernetes Job (deploy/README.md)."""
    (cron,) = [d for d in _docs(DEPLOY / "cronjob-audit.yaml") if d["kind"] == "CronJob"]
    script = "\n".join(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "audit.toml").write_text("")
    script = script.replace("/config/", f"{tmp_path}/config/").replace("/tmp/job", f"{tmp_path}/job")
    script, n = re.subn(r"-- python -m jobs\.audit .*", f"-- python -c 'import sys; sys.exit({code})'", script)
    assert n == 1, script
    p = subprocess.run(["bash", "-c", script], env=dict(ray_head.env, RAY_ADDRESS=ray_head.dashboard_url),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == code, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"driver exit code {code}" in p.stderr
