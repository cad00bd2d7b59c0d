"""Check that a scoring actor can start before the pipeline runs, and say in one line why not.

:func:`preflight_scoring` runs one probe task with the scoring actors' resources (one GPU
when the job uses GPUs), which does what a scoring actor's constructor does — check the
device, load the model and weights, build the scorer and score one image — and returns a
structured result. A failure becomes one :class:`ConfigError` line naming the node, what failed
and what to do, before anything is written. :func:`raise_actor_start_failure` maps the same
failures to the same line when they happen later, inside Ray Data (another node, a restart).
"""

from __future__ import annotations

import re
import socket
from typing import Any, Sequence

from odin_engine.errors import ConfigError

PROBE_TIMEOUT_S = 600.0  # placing the probe may wait for an autoscaler to add a GPU node
WEIGHTS_FIX = ("make --weights readable at that path on every node (a shared volume), or give an s3:// or gs:// "
               "URI")
FACTORY_FIX = "fix the model or its factory (it must build the same model on every node)"
_MARK = "odin-worker-start:"
_passed: dict[tuple, dict] = {}  # probes that passed in this process  # prefixes the one-line reason inside an actor's exception text


class WorkerStartError(RuntimeError):
    """A scoring actor cannot start on this node: ``what`` failed, ``fix`` says what to do."""

    def __init__(self, what: str, fix: str):
        self.what, self.fix = what, fix
        super().__init__(f"{_MARK} on node {node_name()}: {what}; {fix}")


def node_name() -> str:
    """``hostname (ip)`` of the process calling it."""
    try:
        import ray

        ip = ray.util.get_node_ip_address() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        ip = None
    host = socket.gethostname()
    return f"{host} ({ip})" if ip and ip != host else host


def check_device(device: str | None) -> None:
    """Raise :class:`WorkerStartError` when ``device`` is CUDA and torch on this node sees none."""
    if not device or not str(device).startswith("cuda"):
        return
    import os

    import torch

    if torch.cuda.is_available():
        return
    built = torch.version.cuda
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise WorkerStartError(
        f"Ray gave this actor a GPU (CUDA_VISIBLE_DEVICES={visible!r}) but torch {torch.__version__} sees no "
        "CUDA device" + ("" if built else " (it is a CPU-only build)"),
        "install a CUDA build of torch that matches the node's driver, or start the node with --num-gpus 0",
    )


def classify(exc: BaseException, spec: str, weights: str | None) -> WorkerStartError:
    """One line for an exception raised while a scoring actor starts."""
    from odin_engine.errors import CheckpointError

    if isinstance(exc, WorkerStartError):
        return exc
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
    if weights and isinstance(exc, (OSError, CheckpointError)) or (
            isinstance(exc, ConfigError) and "weights file not found" in str(exc)):
        return WorkerStartError(f"cannot read the weights {weights}: {text}", WEIGHTS_FIX)
    if isinstance(exc, ConfigError) and not str(exc).startswith("model factory"):
        return WorkerStartError(str(exc), "fix the model options (they load on the driver but not here)")
    if isinstance(exc, ConfigError):  # the user's factory raised (odin_engine.loading words it)
        return WorkerStartError(str(exc), FACTORY_FIX)
    if "CUDA" in str(exc) or "cuda" in type(exc).__name__.lower():
        return WorkerStartError(f"the GPU failed: {text}",
                                "check the node's NVIDIA driver, and that this torch build supports its GPU")
    return WorkerStartError(f"loading the model {spec!r} raised {text}", FACTORY_FIX)


def _probe(spec: str, weights: str | None, mean: Sequence[float], std: Sequence[float], input_size: int,
           unsafe_pickle: bool, model_id: str, device: str, temperature: float, epsilon: float) -> dict[str, Any]:
    """What a scoring actor's constructor does, returning the outcome instead of raising."""
    try:
        import numpy as np

        from odin_engine.loading import load_model
        from odin_engine.scorer import OdinScorer

        check_device(device)
        model = load_model(spec, weights, mean=mean, std=std, input_size=input_size, unsafe_pickle=unsafe_pickle)
        if model.model_id != model_id:
            raise WorkerStartError(f"the weights here ({model.model_id}) differ from the driver's ({model_id})",
                                   "make --weights the same file on every node")
        scorer = OdinScorer(model, temperature, epsilon, device=device, batch_size=1)
        s = model.input_size
        scorer.score(np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8))
        return {"ok": True, "node": node_name(), "device": str(scorer.device)}
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the driver words it
        err = classify(exc, spec, weights)
        return {"ok": False, "node": node_name(), "what": err.what, "fix": err.fix}


def preflight_scoring(*, spec: str, weights: str | None, mean: Sequence[float], std: Sequence[float],
                      input_size: int, unsafe_pickle: bool, model_id: str, gpus: bool, cpus: float,
                      temperature: float, epsilon: float, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Run one probe task with a scoring actor's resources; raise ``ConfigError`` if a scoring actor could not start.

    A task; on GPU in a worker that exits after it (``max_calls=1``). Returns the probe's result (``node``,
    ``device``). A probe that cannot be placed within ``timeout_s`` is not an error (the cluster may
    be scaling): the result then has ``skipped``.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    key = (spec, weights, model_id, gpus, ray.get_runtime_context().gcs_address)
    if key in _passed:  # e.g. `audit` scores several sets with one model on one cluster
        return _passed[key]
    # GPU: max_calls=1, the worker exits after the probe and takes its CUDA context (GPU memory the
    # scoring actors need) with it. CPU: the worker stays for the job's listing/plan/commit tasks, one
    # worker start less per run (a 6-image score: 8.5 → 7.3 machine CPU-s, benchmarks.command_cost)
    # for torch's ~300 MiB in that worker (benchmarks.score_scale; docs/testing.md)
    probe = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else cpus, max_retries=0,
                       max_calls=1 if gpus else 0)(_probe)
    ref = probe.options(name="odin_preflight_probe").remote(
        spec, weights, list(mean), list(std), input_size, unsafe_pickle, model_id, "cuda" if gpus else "cpu",
        temperature, epsilon)
    try:
        result = ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        return {"ok": True, "skipped": f"no node could host a scoring actor within {timeout_s:g}s"}
    except RayError as exc:  # the probe could not run (its code does not import there) or its process died
        raise ConfigError(f"a scoring actor could not start on the cluster: {_last_line(exc)}; if the job's code "
                          "cannot be imported there, install odin-audit on every node or submit with "
                          "--working-dir; otherwise see the node's memory and the Ray logs") from None
    if not result["ok"]:
        raise ConfigError(f"scoring actors cannot start on node {result['node']}: {result['what']}; {result['fix']}")
    _passed[key] = result
    return result


def _last_line(exc: BaseException) -> str:
    """The last line of Ray's text for a failed actor: the original exception, type and message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def raise_actor_start_failure(exc: BaseException) -> None:
    """Raise one ``ConfigError`` line if ``exc`` (from a Ray Data run) holds a scoring actor's start failure."""
    seen, todo = set(), [exc]
    while todo:  # Ray wraps the actor's exception; look through causes and the text
        e = todo.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, WorkerStartError):
            raise ConfigError(f"scoring actors cannot start: {str(e)[len(_MARK):].strip()}") from None
        m = re.search(re.escape(_MARK) + r"\s*(.*)", str(e))
        if m:
            raise ConfigError(f"scoring actors cannot start: {m.group(1).splitlines()[0].strip()}") from None
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]


def reporting_start_failures(actor_cls: type) -> type:
    """``actor_cls`` whose constructor fails with :class:`WorkerStartError` (one line) instead of the
    raw exception, after checking the device: for Ray Data's ``map_batches(actor_cls, ...)``."""

    class Checked(actor_cls):
        def __init__(self, *args, **kwargs):
            try:
                check_device(kwargs.get("device"))
                super().__init__(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                raise classify(exc, kwargs.get("spec", "?"), kwargs.get("weights")) from None

    Checked.__name__ = Checked.__qualname__ = actor_cls.__name__  # Ray Data names the stage after it
    return Checked
