"""Small helpers shared by the Ray jobs: choose and connect to a cluster, read its resources.

Which cluster a command uses (:func:`connect_cluster`):

=========================  ==============================================================
no ``--ray-address``,      a private local cluster started by this process
no ``RAY_ADDRESS``         (``ray.init(address="local")``), even when ``ray start`` left
                           another one running on the machine
``--ray-address auto``     the cluster ``ray start`` runs on this machine (on purpose)
``RAY_ADDRESS``            that cluster (``ray job submit`` and KubeRay set it)
``--ray-address H:P``      that cluster (the flag wins over ``RAY_ADDRESS``)
=========================  ==============================================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field

from jobs import ray_output
from odin_engine.errors import ConfigError

log = logging.getLogger(__name__)

# Variables a local cluster's workers need to reach object stores the driver reaches.
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "STORAGE_EMULATOR_HOST")

# Worker-pool settings for a cluster this process starts (the same belong in `ray start`'s
# environment: deploy/dev-ray-head.sh and deploy/Dockerfile set them). Ray kills idle workers
# beyond the node's CPU count after 1 s; while the scoring actors hold every CPU, each short
# read or Parquet-write task then starts a fresh Python worker (about 1 CPU-second each; on a
# 2-core node, 507 vs 608 images/s in `benchmarks.job_throughput --idle-worker-ms`). 60 s keeps
# them for reuse.
LOCAL_CLUSTER_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}

AUTH_FIX = ("set RAY_AUTH_MODE=token and give this process the cluster's token "
            "(the file ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH, or RAY_AUTH_TOKEN)")
CONNECT_TIMEOUT_S = 10.0


@dataclass
class Cluster:
    """The Ray cluster a command runs on and how it was chosen.

    ``how``: ``local`` (a private cluster this process started), ``auto`` (``--ray-address
    auto``), ``RAY_ADDRESS``, ``--ray-address``, or ``session`` (Ray was already initialised
    in this process).
    """

    how: str
    address: str | None = None
    resources: dict = field(default_factory=dict)
    logs: str | None = None  # the Ray session's log directory on this node (where Ray's own output went)
    logs_announced: bool = False  # the tool printed ``logs`` (once per process)

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0))

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    def summary(self) -> str:
        """``on a private local Ray cluster (2 CPUs)`` / ``on cluster 10.0.0.1:6379 (RAY_ADDRESS, …)``."""
        size = f"{self.cpus:g} CPUs" + (f", {self.gpus} GPUs" if self.gpus else "")
        if self.how == "local":
            return f"on a private local Ray cluster ({size})"
        why = {"auto": "--ray-address auto", "session": "the Ray session already open"}.get(self.how, self.how)
        return f"on cluster {self.address} ({why}; {size})"

    def as_dict(self) -> dict:
        return {"how": self.how, "address": self.address, "cpus": self.cpus, "gpus": self.gpus}


_current: Cluster | None = None


def current_cluster() -> Cluster | None:
    """The cluster the last :func:`connect_cluster` of this process chose (``None`` before)."""
    return _current


def _choice(address: str | None) -> tuple[str, str | None]:
    """(how, address to hand to ray.init) for a ``--ray-address`` value (``None``: the flag is absent)."""
    if address == "local":  # Ray's own word for "start a new local cluster"
        return "local", "local"
    if address:
        return ("auto" if address == "auto" else "--ray-address"), address
    if os.environ.get("RAY_ADDRESS"):
        return "RAY_ADDRESS", None  # ray.init(address=None) reads it (and the token file) as Ray documents
    return "local", "local"


def _check_reachable(how: str, init_address: str | None, temp_dir: str | None = None) -> None:
    """Fail fast, in one line, on an address that is wrong, unreachable, or refuses our token.

    Mirrors what ``ray.init`` is about to do (address resolution, token set-up), then asks the
    cluster's GCS for its id once: an authentication failure answers in milliseconds, where
    ``ray.init`` would retry for ~20 s and end in a bare ``ConnectionError``.
    """
    from ray._private import services
    from ray._private.authentication.authentication_token_setup import (
        ensure_token_if_auth_enabled,
        maybe_enable_token_auth_if_token_available,
    )
    from ray.exceptions import AuthenticationError

    given = init_address if init_address is not None else os.environ.get("RAY_ADDRESS", "")
    source = {"RAY_ADDRESS": "RAY_ADDRESS", "auto": "--ray-address auto"}.get(how, "--ray-address")
    if str(given).startswith(("ray://", "http://", "https://")):
        if str(given).startswith("http"):
            raise ConfigError(f"{source} is a dashboard URL ({given}); a job's driver needs the cluster's GCS "
                              "address HOST:PORT (default port 6379), or submit with `ray job submit`")
        return  # Ray Client: ray.init reports its own errors
    try:
        gcs = services.canonicalize_bootstrap_address(init_address, temp_dir)
    except ConnectionError:
        raise ConfigError("--ray-address auto: no Ray cluster started by `ray start` runs on this machine; "
                          "start one, or drop --ray-address to use a private local cluster") from None
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}; expected HOST:PORT (the cluster's GCS address)") from None
    host, _, port = str(gcs).rpartition(":")
    shown = gcs if how == "auto" else given  # as the user wrote it (Ray shows 127.0.0.1 as the host's IP)
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {shown} ({source}): {exc}; check the address and that "
                          "the cluster is running") from None
    if init_address in (None, "auto"):
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ensure_token_if_auth_enabled(None, create_token_if_missing=False)
        from ray._raylet import GcsClient

        with _quiet_stderr():  # the GCS client logs each failed attempt to fd 2 itself
            GcsClient(address=gcs, cluster_id=None).cluster_id  # noqa: B018 - one authenticated round trip
    except AuthenticationError as exc:
        raise ConfigError(f"the Ray cluster at {shown} ({source}) refused this process: {exc.message}; "
                          f"{AUTH_FIX}") from None
    except Exception as exc:  # noqa: BLE001 - anything else: let ray.init try and report
        log.debug("GCS probe of %s failed: %s", gcs, exc)


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the duration (C++ logs bypass Python's sys.stderr)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def connect_cluster(address: str | None = None, *, quiet: bool = False, verbose: bool = False,
                    num_cpus: int | None = None) -> Cluster:
    """Connect to (or start) the cluster the rules in this module's docstring choose; return it.

    ``quiet``/``verbose``: where Ray's own output goes (:mod:`jobs.ray_output`); the returned
    cluster's ``logs`` is the Ray session's log directory, where it went.

    A private local cluster's workers inherit this process's environment (object-store
    credentials included) and :data:`LOCAL_CLUSTER_ENV` (unless already set), with ``num_cpus``
    CPUs (default: all) and no dashboard UI or jobs API (Ray then starts none of the dashboard's ten
    module processes, ~3 of a private cluster's ~7 CPU-seconds to start; the command prints its
    own progress). A driver connecting from outside a submitted job forwards the
    object-store variables to the workers. A wrong address, an unreachable cluster or a refused
    token raise :class:`ConfigError` (one line: the cause and the fix) before Ray starts anything.
    """
    global _current
    import ray

    if ray.is_initialized():
        if _current is None:
            _current = Cluster("session", ray.get_runtime_context().gcs_address, logs=ray_output.session_logs_dir())
        _current.resources = dict(ray.cluster_resources())
        return _current
    mode = ray_output.console_mode(quiet, verbose)
    ray_output.route(mode)
    how, init_address = _choice(address)
    # worker output reaches the console under --verbose; it is in the session's worker-*.out|err files
    kwargs: dict = {"address": init_address, "log_to_driver": mode == "verbose", "logging_level": logging.INFO}
    if how == "local":
        for key, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)  # read by the raylet this call starts
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = False
    else:
        _check_reachable(how, init_address)
        if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            # A driver connecting from outside a submitted job: forward object-store settings.
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
            if env:
                kwargs["runtime_env"] = {"env_vars": env}
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster ({how}): {exc}") from None
    _current = Cluster(how, _gcs_address(), logs=ray_output.open_session_log())
    _current.resources = _resources()
    return _current


def _gcs_address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - Ray Client sessions have none
        return None


def _resources() -> dict:
    import ray

    try:
        return dict(ray.cluster_resources())
    except Exception:  # noqa: BLE001 - e.g. ray.init replaced in a unit test
        return {}


def init_ray(address: str | None = None, *, quiet: bool = False, verbose: bool = False,
             num_cpus: int | None = None) -> bool:
    """:func:`connect_cluster` for callers that only need Ray up; True if this call connected."""
    import ray

    if ray.is_initialized():
        return False
    connect_cluster(address, quiet=quiet, verbose=verbose, num_cpus=num_cpus)
    return True


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))
