"""Small helpers shared by the Ray jobs: connect to (or start) a cluster, read its resources."""

from __future__ import annotations

import logging
import os

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


def init_ray(address: str | None = None, *, quiet: bool = True, num_cpus: int | None = None) -> bool:
    """Connect to Ray, or start a local cluster. Returns True if this call started/connected.

    ``address=None`` follows Ray's rules: ``RAY_ADDRESS`` (set by ``ray job submit`` and by
    KubeRay) connects; otherwise a local cluster is started whose workers inherit this
    process's environment (object-store credentials included) and :data:`LOCAL_CLUSTER_ENV`
    (unless already set), with ``num_cpus`` CPUs (default: all).
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = {"address": address, "log_to_driver": True}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    connecting = bool(address or os.environ.get("RAY_ADDRESS"))
    if connecting and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A driver connecting from outside a submitted job: forward object-store settings.
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
    if not connecting:
        for key, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)  # read by the raylet this call starts
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    return True


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))
