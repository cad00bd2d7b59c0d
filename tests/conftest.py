"""Shared pytest fixtures. Real parts, no mocks. Reuse them from any test module.

Fixtures
--------
``ray_head`` (session)
    A real local Ray head: ``ray start --head --node-ip-address 127.0.0.1`` on free ports,
    token auth on (``RAY_AUTH_MODE=token`` with a fresh random token), 2 CPUs, its own
    ``--temp-dir``; stopped at the end of the session by signalling only its own processes (not ``ray stop``, which would stop every cluster on the machine). Yields a
    :class:`RayHead` with ``address`` (GCS ``host:port``), ``dashboard_url``
    (``http://127.0.0.1:<port>``, what ``ray job submit --address`` wants), ``token`` and
    ``env`` — a copy of ``os.environ`` with ``RAY_ADDRESS``, ``RAY_AUTH_MODE``,
    ``RAY_AUTH_TOKEN`` and the virtualenv's ``bin`` first on ``PATH``: pass it to subprocesses
    (``ray job submit``, ``python -m jobs.X``) so they reach this cluster. The head was started
    with that ``PATH``, so ``python`` inside a submitted job is the project's interpreter.
    ``ray_head.submit(args, cwd, timeout)`` runs ``ray job submit --address … -- <args>``.
    If the head cannot start: see *Real parts* below.

``s3_server`` (session)
    ``moto_server`` (moto's real S3 HTTP API) on a free loopback port. Yields an
    :class:`S3Server` with ``endpoint`` (``http://127.0.0.1:<port>``), ``env`` (``AWS_*`` test
    credentials and ``AWS_ENDPOINT_URL``, which pyarrow's S3FileSystem honours, so that
    ``s3://`` URIs in child processes and Ray workers reach it),
    ``client()`` (a boto3 S3 client) and ``filesystem()`` (a ``pyarrow.fs.S3FileSystem``
    with ``endpoint_override``). ``s3_bucket`` (function) creates a fresh bucket and yields its name.

``chromium`` (session)
    Path of a headless-capable Chromium (``chromium``, ``chromium-browser`` or ``google-chrome``).

Real parts (``ray_head``, ``s3_server``, ``gcs_server``, ``chromium``)
    A fixture that cannot start its real part calls :func:`real_part_missing`: under ``CI=true``
    (any of ``1``/``true``/``yes``) the tests that need it **fail** with the reason, so CI can
    never go green on skips; on a developer machine they skip, and the end of the run lists
    every missing part and why ("real parts not available").

``tiny_model`` (session)
    ``cifar_resnet20`` with seeded random weights saved by ``torch.save(model.state_dict())``
    to a tmp file. Yields a :class:`TinyModel` with ``spec``, ``weights`` (path as str) and
    ``cli`` (``["--model", spec, "--weights", path]``).

``image_dir`` (function) / ``make_images(dir, n, size=32, fmt="png")``
    ``n`` small random RGB images written to a directory, names ``img_00000.png`` …

Helpers (import them: ``from conftest import make_images, pids_matching``)
    ``REPO``, ``SHARED_DATA`` (``../shared/data``; may be absent), ``free_port()``,
    ``make_images(...)``, ``process_cmdlines()`` / ``pids_matching(needle)`` (from /proc: psutil
    is not installed), ``BAD_EXPECT``, ``ALARM`` (a regex: a console line an operator would call
    alarming; a healthy run prints none).

``bad_images`` (session)
    ``{name: bytes}`` for every bad or odd input the job must survive: corrupt, truncated,
    zero-byte, non-image, decompression bomb, 16-bit, CMYK, palette (with/without
    transparency), RGBA, LA, grayscale, 1-bit, EXIF-rotated, 1×1, very large, animated GIF,
    TIFF, WebP, BMP. ``BAD_EXPECT[name]`` says ``"ok"`` or ``"error"``.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from jobs.ray_utils import LOCAL_CLUSTER_ENV

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
VENV_BIN = Path(sys.executable).parent
# A console line an operator's log filter would call alarming: Python logging levels, Ray's C++
# E/W/F lines, Python warnings. A healthy run prints none (tests/test_console.py).
ALARM = re.compile(r"\b(ERROR|WARNING|CRITICAL|FATAL)\b|^\[\d{4}-\d\d-\d\d [\d:,]+ [EWF] \d+ \d+\]|Warning:")


# --------------------------------------------------------------------------- real parts: fail under CI
_MISSING_PARTS: dict[str, str] = {}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def real_part_missing(part: str, reason: str):
    """A real part (Ray head, S3 server, GCS emulator, Chromium) could not be started.

    Under ``CI=true`` the test fails with the reason; elsewhere it skips, and
    :func:`pytest_terminal_summary` lists the part at the end of the run.
    """
    _MISSING_PARTS.setdefault(part, reason)
    if in_ci():
        pytest.fail(f"{part} {_REQUIRED}: {reason}", pytrace=False)
    pytest.skip(f"{part} {_UNAVAILABLE}: {reason}")


# the two messages of real_part_missing, and how the summary reads them back from xdist workers' reports
_REQUIRED, _UNAVAILABLE = "is required under CI=true and could not be started", "not available on this machine"
_PART_REASON = re.compile(rf"^(?:Skipped: |Failed: )?(.{{1,60}}?) (?:{re.escape(_REQUIRED)}|"
                          rf"{re.escape(_UNAVAILABLE)}): (.*)$")


def _parts_from_reports(terminalreporter) -> None:
    """Under pytest-xdist the tests run in worker processes: read the parts back from their reports."""
    for key in ("skipped", "failed", "error"):
        for report in terminalreporter.stats.get(key, []):
            longrepr = getattr(report, "longrepr", None)
            text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
            for line in text.splitlines():
                found = _PART_REASON.match(line.strip())
                if found:
                    _MISSING_PARTS.setdefault(found.group(1), found.group(2))


# The files that run whole jobs, longest first (docs/testing.md, "Where the time goes"). With
# `-n 2 --dist loadfile` (scripts/test) files go to the workers in collection order: starting the
# longest first keeps one long file from being the tail while the other worker idles.
# The order is measured: `python -m benchmarks.suite_durations` on a `--durations=0` run.
LONGEST_FILES = ("test_score_job", "test_cluster", "test_demo", "test_audit", "test_results", "test_console",
                 "test_fit_job", "test_table_formats", "test_deploy", "test_delta_maintenance", "test_gpu_rehearsal",
                 "test_reading", "test_scheduled", "test_exit_codes", "test_real_parts", "test_listing",
                 "test_promises", "test_forkserver")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))  # stable: file order kept


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _parts_from_reports(terminalreporter)
    if not _MISSING_PARTS:
        return
    verdict = "their tests FAILED (CI=true)" if in_ci() else "their tests were skipped"
    terminalreporter.section(f"real parts not available: {verdict}", sep="=", yellow=True, bold=True)
    for part, reason in _MISSING_PARTS.items():
        terminalreporter.write_line(f"{part}: {reason.strip().splitlines()[-1][:300] if reason.strip() else '?'}")


def _executable(name: str) -> str | None:
    """``name`` from this interpreter's bin directory (the project's virtualenv), else from ``PATH``."""
    exe = VENV_BIN / name
    return str(exe) if exe.exists() else shutil.which(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------- job commands
@pytest.fixture(scope="session", autouse=True)
def fork_servers():
    """The tests' ``[python, -m|-c, …]`` job commands start by a fork (``tests/_forkserver.py``:
    each still its own process, pid, session, fds and exit code), not a new interpreter that
    imports torch and Ray again; the servers stop with the session. ``ODIN_TEST_FORK=0`` runs
    every command as a plain subprocess."""
    import _forkserver

    yield
    _forkserver.stop_servers()


# --------------------------------------------------------------------------- Ray head
@dataclass
class RayHead:
    address: str
    dashboard_url: str
    token: str
    temp_dir: str
    env: dict = field(repr=False)
    client_port: int | None = None  # its Ray Client server's port (stopped with the head)
    worker_sock: str | None = None  # its worker server's socket (tests/_forkserver.py), None when workers start plain

    def worker_server_up(self, timeout: float = 120) -> bool:
        """Wait until the head's worker server listens (a first worker starts it: run one task if
        none has); False when the head starts its workers plain (``ODIN_TEST_FORK=0``)."""
        if self.worker_sock is None:
            return False
        if not os.path.exists(self.worker_sock):
            subprocess.run([sys.executable, "-c", "import ray; ray.init(logging_level='ERROR'); "
                            "ray.get(ray.remote(lambda: 1).remote())"], env=self.env, capture_output=True,
                           timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.worker_sock):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(self.worker_sock)  # bound and listening (a bare connect is ignored)
                        return True
                    except OSError:
                        pass
            time.sleep(0.2)
        raise TimeoutError(f"the head's worker server ({self.worker_sock}) did not come up in {timeout} s")

    def submit(self, args: list[str], cwd: str | Path, timeout: float = 600, extra_env: dict | None = None):
        """``ray job submit --address <dashboard> --working-dir <cwd> -- <args>``; returns CompletedProcess."""
        env = dict(self.env, **(extra_env or {}))
        cmd = [_executable("ray"), "job", "submit", "--address", self.dashboard_url,
               "--working-dir", str(cwd), "--", *args]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _worker_ports() -> tuple[int, int]:
    """The shared head's worker port range: 20000–29999, split between pytest-xdist workers
    (``-n N``: each runs its own session and so its own head) so that two heads never hand out
    the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = 10000 // max(count, 1)
    return 20000 + index * width, 20000 + (index + 1) * width - 1


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(32)
    temp_dir = Path("/tmp") / f"odin-ray-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths are length-limited
    gcs_port, dash_port, client_port = free_port(), free_port(), free_port()
    lo, hi = _worker_ports()
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    # as deploy/dev-ray-head.sh: keep idle workers 60 s, so a job's short read/plan/commit tasks reuse
    # them instead of each starting a fresh Python worker (~1 CPU-second apiece) while actors hold the CPUs
    env.update(LOCAL_CLUSTER_ENV)
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
        "--include-dashboard", "true", "--num-cpus", "2", "--num-gpus", "0",
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
        "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(free_port()),
        "--min-worker-port", str(lo), "--max-worker-port", str(hi),
    ]
    ray_exe = _executable("ray")
    if ray_exe is None:
        real_part_missing("Ray head", f"no `ray` executable in {VENV_BIN} or on PATH (pip install 'ray[default]')")
    cmd[0] = ray_exe
    import _forkserver

    worker_sock = None
    if os.environ.get("ODIN_TEST_FORK", "1") != "0":
        # the head's worker processes are forked by a server that has imported torch, Ray and Ray Data
        # (tests/_forkserver.py, launch_ray_worker): `ray start` run with the launcher as its sys.executable
        launcher, worker_sock = _forkserver.write_worker_launcher(str(tmp_path_factory.mktemp("ray-launcher")))
        cmd = _forkserver.ray_start_with_launcher(launcher) + cmd[1:]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not _wait_port(dash_port, 60):
        _stop_head(temp_dir, client_port, worker_sock)
        real_part_missing("Ray head", f"`ray start --head` failed: rc={proc.returncode} {proc.stderr[-2000:]}")
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    head = RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", token, str(temp_dir), env, client_port,
                   worker_sock)
    _forkserver.prestart(env)  # its job commands start by a fork (fixture fork_servers)
    try:
        yield head
    finally:
        _stop_head(temp_dir, client_port, worker_sock)
        shutil.rmtree(temp_dir, ignore_errors=True)


def process_cmdlines() -> dict[int, str]:
    """``{pid: command line}`` of this machine's processes, from /proc (no psutil here)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                out[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return out


def pids_matching(needle: str) -> list[int]:
    me = os.getpid()
    return [pid for pid, cmd in process_cmdlines().items() if needle in cmd and pid != me]


STOP_GRACE_S = 2.0  # SIGTERM → SIGKILL: a test head keeps nothing worth a graceful stop


def _stop_head(temp_dir: Path, client_port: int | None = None, worker_sock: str | None = None) -> None:
    """Stop *this* head only. ``ray stop`` would stop every Ray cluster of the user on the
    machine (other test sessions' included), so signal just the processes whose command line
    names our unique temp dir (GCS, raylet, dashboard, agents) and the head's Ray Client server
    (its command line names only its port: ``--port=<client_port>``, and ``ray start`` leaves it
    an orphan); workers exit with their raylet. The worker server that forks the head's workers
    (``tests/_forkserver.py --ray-workers``) names the temp dir too; its socket's folder
    (``worker_sock``) is removed afterwards. SIGTERM first; whatever still runs after
    :data:`STOP_GRACE_S` gets SIGKILL (the GCS, raylet, autoscaler monitor and runtime-env agent
    take 15 s or more to act on SIGTERM, which was 15 s at the end of every session)."""
    pids = pids_matching(str(temp_dir))
    if client_port is not None:
        pids += [pid for pid, cmd in process_cmdlines().items()
                 if "ray.util.client.server" in cmd and f"--port={client_port} " in f"{cmd} "]
    pids = _with_descendants(pids)
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 15)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids):
            time.sleep(0.2)
    if worker_sock:  # the worker server (its command line names the temp dir) removes it only on a clean exit
        shutil.rmtree(os.path.dirname(worker_sock), ignore_errors=True)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().split(")")[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _with_descendants(pids: list[int]) -> list[int]:
    parent = {pid: _ppid(pid) for pid in process_cmdlines()}
    found = set(pids)
    grew = True
    while grew:
        new = {pid for pid, pp in parent.items() if pp in found and pid not in found}
        found |= new
        grew = bool(new)
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- S3 (moto server)
@dataclass
class S3Server:
    endpoint: str
    env: dict = field(repr=False)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
                               region="us-east-1", scheme="http", allow_bucket_creation=True)


@pytest.fixture(scope="session")
def s3_server():
    exe = _executable("moto_server")
    if exe is None:
        real_part_missing("S3 server (moto_server)", f"no `moto_server` in {VENV_BIN} or on PATH "
                                                     "(pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if not _wait_port(port, 30):
        proc.kill()
        real_part_missing("S3 server (moto_server)", f"moto_server did not listen on 127.0.0.1:{port} within 30 s")
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        yield S3Server(endpoint, env)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server):
    name = f"odin-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------- GCS (gcp-storage-emulator)
@dataclass
class GcsServer:
    host: str  # http://127.0.0.1:PORT
    env: dict = field(repr=False)

    def filesystem(self):
        from pyarrow import fs

        return fs.GcsFileSystem(anonymous=True, endpoint_override=self.host.split("://", 1)[1], scheme="http",
                                project_id="odin-test")


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS JSON API on loopback: ``gcp-storage-emulator`` (in-memory), reached through
    ``STORAGE_EMULATOR_HOST`` exactly as a user would point the job at an emulator."""
    exe = _executable("gcp-storage-emulator")
    if exe is None:
        real_part_missing("GCS emulator (gcp-storage-emulator)", f"no `gcp-storage-emulator` in {VENV_BIN} or on "
                                                                 "PATH (pip install gcp-storage-emulator)")
    port = free_port()
    proc = subprocess.Popen([exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if not _wait_port(port, 30):
        proc.kill()
        real_part_missing("GCS emulator (gcp-storage-emulator)", f"it did not listen on 127.0.0.1:{port} within 30 s")
    host = f"http://127.0.0.1:{port}"
    try:
        yield GcsServer(host, {"STORAGE_EMULATOR_HOST": host})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- Chromium
@pytest.fixture(scope="session")
def chromium() -> str:
    exe = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if exe is None:
        real_part_missing("Chromium", "no chromium, chromium-browser or google-chrome on PATH "
                                      "(.ci/run installs it: apt-get install chromium)")
    return exe


# --------------------------------------------------------------------------- tiny model
@dataclass
class TinyModel:
    spec: str
    weights: str

    @property
    def cli(self) -> list[str]:
        return ["--model", self.spec, "--weights", self.weights]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    import torch

    from odin_engine.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(depth=20, num_classes=10)
    path = tmp_path_factory.mktemp("tiny_model") / "resnet20_random.pt"
    torch.save(model.state_dict(), path)
    return TinyModel("cifar_resnet20", str(path))


# --------------------------------------------------------------------------- images
def make_images(directory: str | Path, n: int, size: int = 32, fmt: str = "png", seed: int = 0,
                prefix: str = "img_") -> list[Path]:
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = directory / f"{prefix}{i:05d}.{fmt}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "corpus"
    make_images(d, 20)
    return d


def _save(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


BAD_EXPECT = {
    "zero_byte.png": "error",
    "not_an_image.jpg": "error",
    "corrupt.png": "error",
    "truncated.jpg": "error",
    "truncated.png": "error",
    "bomb.png": "error",
    "gray16.png": "ok",
    "cmyk.jpg": "ok",
    "palette.png": "ok",
    "palette_transparent.png": "ok",
    "rgba.png": "ok",
    "la.png": "ok",
    "gray.jpg": "ok",
    "bilevel.bmp": "ok",
    "exif_rotated.jpg": "ok",
    "one_pixel.png": "ok",
    "very_large.jpg": "ok",
    "animated.gif": "ok",
    "multi.tif": "ok",
    "photo.webp": "ok",
    "photo.bmp": "ok",
    "float.tif": "ok",
}


@pytest.fixture(scope="session")
def bad_images() -> dict[str, bytes]:
    """Every bad/odd input kind as bytes; see BAD_EXPECT for the expected status."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    good_png = _save(rgb, "PNG")
    good_jpg = _save(rgb, "JPEG", quality=90)
    out: dict[str, bytes] = {}
    out["zero_byte.png"] = b""
    out["not_an_image.jpg"] = b"this is a text file, not a JPEG\n" * 10
    corrupt = bytearray(good_png)
    corrupt[60:200] = bytes(140)  # smash IHDR/IDAT bytes
    out["corrupt.png"] = bytes(corrupt)
    out["truncated.jpg"] = good_jpg[: len(good_jpg) // 2]
    out["truncated.png"] = good_png[: len(good_png) // 2]
    # 100M-pixel bilevel PNG: ~12 MB in memory to make, a few KB on disk; over MAX_IMAGE_PIXELS.
    out["bomb.png"] = _save(Image.new("1", (10_000, 10_000)), "PNG")
    g16 = (rng.integers(0, 65536, (30, 30))).astype(np.uint16)
    out["gray16.png"] = _save(Image.fromarray(g16), "PNG")
    out["cmyk.jpg"] = _save(rgb.convert("CMYK"), "JPEG")
    out["palette.png"] = _save(rgb.convert("P"), "PNG")
    pal = rgb.convert("P")
    out["palette_transparent.png"] = _save(pal, "PNG", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)))
    out["rgba.png"] = _save(rgba, "PNG")
    out["la.png"] = _save(rgba.convert("LA"), "PNG")
    out["gray.jpg"] = _save(rgb.convert("L"), "JPEG")
    out["bilevel.bmp"] = _save(rgb.convert("1"), "BMP")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    out["exif_rotated.jpg"] = _save(rgb, "JPEG", exif=exif.tobytes())
    out["one_pixel.png"] = _save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")
    out["very_large.jpg"] = _save(rgb.resize((6000, 4000)), "JPEG", quality=50)
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    out["animated.gif"] = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out["multi.tif"] = _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    out["photo.webp"] = _save(rgb, "WEBP")
    out["photo.bmp"] = _save(rgb, "BMP")
    out["float.tif"] = _save(Image.fromarray(rng.random((16, 16)).astype(np.float32)), "TIFF")
    assert set(out) == set(BAD_EXPECT)
    return out


# --------------------------------------------------------------------------- a foreign Ray head (test_cluster.py)
@dataclass
class ForeignHead:
    """A ``ray start --head`` that is not the caller's: its own token, 1 CPU, and 1 GPU advertised
    (``--num-gpus 1``, whatever the machine has). ``ray start`` records it where ``ray.init()``
    and ``--address auto`` look (``$RAY_TMPDIR/ray/ray_current_cluster``), so ``client_env`` —
    ``RAY_TMPDIR`` set, no ``RAY_ADDRESS`` and no token — is a shell on a machine where someone
    else's cluster runs."""

    address: str
    token: str
    temp_dir: str
    client_env: dict = field(repr=False)

    def env_with_token(self) -> dict:
        return dict(self.client_env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)


@pytest.fixture(scope="module")
def foreign_gpu_head():
    root = Path("/tmp") / f"of-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths are length-limited
    temp_dir = root / "ray"
    token = secrets.token_hex(32)
    client = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    client.update(RAY_TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0",
                  PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    gcs_port, client_port = free_port(), free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
           "--include-dashboard", "false", "--num-cpus", "1", "--num-gpus", "1", "--temp-dir", str(temp_dir),
           "--disable-usage-stats", "--ray-client-server-port", str(client_port),
           "--dashboard-agent-listen-port", str(free_port()), "--min-worker-port", "15000",
           "--max-worker-port", "19999"]
    head_env = dict(client, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    proc = subprocess.run(cmd, env=head_env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not _wait_port(gcs_port, 60):
        _stop_head(temp_dir, client_port)
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a foreign Ray head: rc={proc.returncode} {proc.stderr[-2000:]}")
    try:
        yield ForeignHead(f"127.0.0.1:{gcs_port}", token, str(temp_dir), client)
    finally:
        _stop_head(temp_dir, client_port)
        shutil.rmtree(root, ignore_errors=True)
