"""The scoring job's Ray stages.

Ray tasks around :mod:`jobs.shards` (list a corpus unit, plan a bucket range, commit a bucket
range), and the Ray Data pipeline that scores the planned rows: plan files → read and decode (CPU
tasks) → score (actor pool) → staging files. Each stage is a plain function or a callable class:
triable without a cluster.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from odin_engine.errors import short_error
from odin_engine.io.corpus import LISTING_ERROR
from odin_engine.io.images import ImageDecodeError, decode_image
from odin_engine.io.reading import ReadError, read_object
from odin_engine.io.scores import FLOAT_COLUMNS
from odin_engine.io.store import ensure_folder

from jobs import shards

MAX_FILE_BYTES = 256 * 1024 * 1024  # bigger files become error rows, never a worker OOM
MIN_OBJECT_STORE_BUDGET = 256 * 2**20  # the scoring pipeline's object-store budget is never set below this
MIN_TARGET_BLOCK_BYTES = 1 << 20  # Ray Data's block-size target for the pipeline: block_rows × 1 KiB, ≥ 1 MiB


def object_store_budget(block_rows: int, input_size: int, workers: int) -> int:
    """Default object-store bytes the scoring pipeline may hold: 4 decoded blocks per actor, plus 4, ≥ 256 MiB.

    A decoded block is ``block_rows × (input_size² × 3 + 512)`` bytes (pixels plus ids, uris and
    status). Without a budget Ray Data allows half the cluster's object store, and the plan
    reader, far faster than the actors, may queue listing blocks up to that: in-flight data
    would grow with the corpus instead of with the actors.
    """
    block = block_rows * (input_size * input_size * 3 + 512)
    return max(MIN_OBJECT_STORE_BUDGET, 4 * (workers + 1) * block)

_DECODED_FIELDS = [
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("pixels", pa.binary()),
]


def read_and_decode(batch: pa.Table, size: int, policy: str, max_bytes: int = MAX_FILE_BYTES) -> pa.Table:
    """Ray Data stage 1 (CPU tasks): uri → bytes → uint8 size×size×3 pixels, or an error message.

    Never raises for a bad item: every input row comes out as one row. Reads retry transient
    failures (:func:`odin_engine.io.reading.read_object`); a row the listing already marked
    (``listing_error``) becomes that error without a read.
    """
    listed = batch.column(LISTING_ERROR).to_pylist() if LISTING_ERROR in batch.column_names else None
    status, error, width, height, pixels = [], [], [], [], []

    def fail(message: str) -> None:
        status.append("error"), error.append(message), width.append(None), height.append(None), pixels.append(None)

    for k, uri in enumerate(batch.column("uri").to_pylist()):
        if listed is not None and listed[k]:
            fail(listed[k])
            continue
        try:
            arr, w, h = decode_image(read_object(uri, max_bytes), size, policy)
        except (ReadError, ImageDecodeError) as exc:
            fail(str(exc))
            continue
        status.append("ok"), error.append(None), width.append(w), height.append(h), pixels.append(arr.tobytes())
    out = batch
    for f, values in zip(_DECODED_FIELDS, (status, error, width, height, pixels)):
        out = out.append_column(f, pa.array(values, f.type))
    return out


class ScoreBatch:
    """Ray Data stage 2 (actor pool): load the model once per actor, score decoded batches."""

    def __init__(self, spec, weights, mean, std, input_size, temperature, epsilon, batch_size, model_id, run_id,
                 threads, unsafe_pickle, schema_bytes, device=None, staging=None, fit=None, head=None,
                 params=None, methods=None):
        import torch

        from odin_engine.loading import load_model
        from odin_engine.scorer import SCORE_COLUMNS, OdinScorer  # torch: only the actors import it

        if threads:
            torch.set_num_threads(int(threads))
        model = load_model(spec, weights, mean=mean, std=std, input_size=input_size, unsafe_pickle=unsafe_pickle)
        if model.model_id != model_id:
            raise RuntimeError(
                f"the weights this worker loaded ({model.model_id}) differ from the driver's ({model_id}): "
                "make --weights the same file on every node"
            )
        self.size = model.input_size
        fitted = None
        if fit:
            from odin_engine.detectors.fit import load_fit

            fitted = load_fit(fit)
        self.scorer = OdinScorer(model, temperature, epsilon, device=device, batch_size=batch_size, head=head,
                                 fit=fitted, params=params, methods=methods)
        self.model_id, self.run_id = model_id, run_id
        self.temperature, self.epsilon = float(temperature), float(epsilon)
        self.schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
        self.batch_size = int(batch_size)
        self.columns = SCORE_COLUMNS
        self.staging = staging  # (filesystem, directory): stage each call's rows there, return counts

    def _score(self, pixels: list[bytes]) -> dict[str, np.ndarray]:
        s = self.size
        arr = np.stack([np.frombuffer(p, np.uint8).reshape(s, s, 3) for p in pixels])
        return self.scorer.score(arr)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score a block in sub-batches of ``batch_size`` (each stamped when done).

        With ``staging``, the block's rows are written as one staging file and the call returns
        one row of counts (``rows``, ``ok``, ``files``): the unit a killed run keeps is a block.
        """
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        error = batch.column("error").to_pylist()
        ok = [i for i, st in enumerate(status) if st == "ok"]
        values = {c: np.zeros(n, np.int64 if c == "pred" else np.float64) for c in self.columns}
        scored = np.zeros(n, bool)  # rows without scores are written as nulls
        stamps = np.full(n, np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "us"))
        pix = batch.column("pixels").to_pylist() if ok else []
        for start in range(0, len(ok), self.batch_size):
            part = ok[start:start + self.batch_size]
            try:
                res = self._score([pix[i] for i in part])
                for c in self.columns:
                    values[c][part] = res[c]
                scored[part] = True
            except Exception:  # noqa: BLE001 - isolate the image that breaks the batch
                for i in part:
                    try:
                        one = self._score([pix[i]])
                        for c in self.columns:
                            values[c][i] = one[c][0]
                        scored[i] = True
                    except Exception as exc:  # noqa: BLE001
                        status[i], error[i] = "error", "scoring failed: " + short_error(exc, 280)
            stamps[part] = np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "us")
        data = {
            "image_id": batch.column("image_id"),
            "uri": batch.column("uri"),
            "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string()),
            "width": batch.column("width"),
            "height": batch.column("height"),
            "pred": pa.array(values["pred"], pa.int64(), mask=~scored),
            # NaN = not computed (a fitted method without --fit, a feature method without a head): null
            **{c: pa.array(values[c], pa.float64(), mask=~scored | np.isnan(values[c])) for c in FLOAT_COLUMNS},
            "temperature": pa.array([self.temperature] * n, pa.float64()),
            "epsilon": pa.array([self.epsilon] * n, pa.float64()),
            "model_id": pa.array([self.model_id] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "scored_at": pa.array(stamps, pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC")),
        }
        for f in self.schema:  # carried manifest columns, version, bucket: as listed (null when not listed)
            if f.name not in data:
                data[f.name] = batch.column(f.name) if f.name in batch.column_names else pa.nulls(n, f.type)
        table = pa.Table.from_pydict(data, schema=self.schema)
        if self.staging is None:
            return table
        return pa.table({k: [v] for k, v in stage(*self.staging, table).items()})


def stage(fs: pafs.FileSystem, directory: str, table: pa.Table) -> dict[str, int]:
    """Write scored rows as one staging file ``<min bucket>-<max bucket>-<uuid>.parquet``.

    Written atomically (:func:`jobs.shards.write_parquet_atomic`), so a staging file is complete
    or absent. A retried task may stage a row twice: the commit keeps one row per listed image,
    so staging is at-least-once and the table exactly-once.
    """
    if not table.num_rows:
        return {"rows": 0, "ok": 0, "files": 0}
    table = table.sort_by("bucket")
    b = table.column("bucket")
    name = f"{pc.min(b).as_py():06d}-{pc.max(b).as_py():06d}-{uuid.uuid4().hex}.parquet"
    ensure_folder(fs, directory)
    shards.write_parquet_atomic(fs, posixpath.join(directory, name), table)
    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    return {"rows": table.num_rows, "ok": ok, "files": 1}


class CorpusShards(Datasource):
    """Ray Data source: the plan files' row groups (``block_rows`` rows each) as blocks, in read units.

    A read unit is a run of consecutive row groups, read by one short task (no CPU reserved).
    There are as many units as blocks, up to ``max_units`` (then a unit holds several blocks), so
    the scoring actors get many small inputs whatever the corpus size: a few long read tasks
    would have Ray Data coalesce their output into blocks of up to 128 MiB, and one such block
    (a whole small run) goes to one actor while the others wait. Files written with bigger row
    groups are still cut into ``block_rows`` batches.
    """

    def __init__(self, filesystem: pafs.FileSystem, files: list[str], block_rows: int, max_units: int = 4096):
        super().__init__()
        self._fs, self._files, self._block_rows = filesystem, list(files), int(block_rows)
        groups = []  # (file index, row group, rows)
        for i, f in enumerate(self._files):
            meta = pq.ParquetFile(filesystem.open_input_file(f)).metadata
            groups += [(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        per_unit = max(1, -(-len(groups) // max(1, int(max_units))))
        self._units = [groups[k:k + per_unit] for k in range(0, len(groups), per_unit)]

    @property
    def read_tasks(self) -> int:
        return len(self._units)

    @property
    def blocks(self) -> int:
        """How many blocks the actors get: ``Σ ceil(rows / block_rows)`` over the row groups."""
        return sum(-(-rows // self._block_rows) for unit in self._units for _, _, rows in unit)

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(200 * rows for unit in self._units for _, _, rows in unit)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        for unit in self._units:
            paths = sorted({self._files[i] for i, _, _ in unit})

            # the task carries its own (path, row group) pairs only, not the list of every plan file
            def read(groups=[(self._files[i], g) for i, g, _ in unit], fs=self._fs, block_rows=self._block_rows):
                path, pf = None, None
                for p, g in groups:
                    if p != path:
                        path, pf = p, pq.ParquetFile(fs.open_input_file(p))
                    for batch in pf.iter_batches(batch_size=block_rows, row_groups=[g]):
                        yield pa.Table.from_batches([batch])

            rows = sum(r for _, _, r in unit)
            block_meta = BlockMetadata(num_rows=rows, size_bytes=200 * rows, input_files=paths, exec_stats=None)
            tasks.append(ReadTask(read, block_meta, per_task_row_limit=per_task_row_limit))
        return tasks


# --------------------------------------------------------------------------- plain Ray tasks
def run_tasks(fn: Callable[..., Any], calls: list[tuple], num_cpus: float = 1.0) -> Iterable[Any]:
    """Run ``fn(*args)`` for each args tuple as Ray tasks; yield results as they finish (any order).

    Large shared arguments should be ``ray.put`` once by the caller. Tasks are retried by Ray if a
    worker dies (every task here is idempotent).
    """
    return run_growing_tasks(fn, calls, lambda result: [], num_cpus)


def run_growing_tasks(fn: Callable[..., Any], calls: list[tuple], more: Callable[[Any], list[tuple]],
                      num_cpus: float = 1.0) -> Iterable[Any]:
    """:func:`run_tasks` for work that splits itself: ``more(result)`` gives the args tuples of new
    tasks to run as well (an object-store key range hands off the rest of its range)."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=3)(fn)
    pending = [remote.remote(*args) for args in calls]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        result = ray.get(done[0])
        pending += [remote.remote(*args) for args in more(result)]
        yield result


# --------------------------------------------------------------------------- the Ray Data pipeline
@contextlib.contextmanager
def _bounded_blocks(ctx, object_store_bytes: int, target_block_bytes: int):
    """Ray Data's object-store limit and block-size target for one pipeline, restored however it ends."""
    saved = ctx.execution_options.resource_limits, ctx.target_max_block_size
    ctx.execution_options.resource_limits = saved[0].copy(object_store_memory=object_store_bytes)
    ctx.target_max_block_size = target_block_bytes
    try:
        yield
    finally:
        ctx.execution_options.resource_limits, ctx.target_max_block_size = saved


ACTORS_PER_READER, MAX_READERS = 16, 8


def plan_readers(actors: int) -> int:
    """Plan-reading tasks at a time for a pool of ``actors``: one per 16 actors, at most 8.

    A read task turns one plan block (``--shard-rows`` listing rows, a few KB) into an actor's input
    in tens of milliseconds, where an actor spends seconds scoring it, and Ray Data reads ahead
    within the object-store budget. A second reader at a time would only start a second worker
    process (Python, Ray, Ray Data: ~1.4 CPU-seconds) on a small cluster.
    """
    return max(1, min(MAX_READERS, -(-int(actors) // ACTORS_PER_READER)))


def score_planned(fs: pafs.FileSystem, plan_files: list[str], staging_dir: str, schema: pa.Schema, *,
                  scorer_kwargs: dict[str, Any], batch_size: int, block_rows: int, decode_cpus: float,
                  input_size: int, resize: str, workers: int, gpus: int, actor_cpus: float, threads: int,
                  decode_device: str = "cpu", object_store_bytes: int | None = None,
                  on_block: Callable[[int], None] | None = None) -> dict[str, int]:
    """Score the planned rows into staging files: plan files → read_and_decode → ScoreBatch (stages each block).

    ``schema``: the score table's schema plus ``bucket``. ``decode_device="cuda"``: the read tasks
    only fetch bytes and the GPU actors decode (``jobs.gpu_decode``). Returns the totals (rows, ok, files).
    A scoring actor that cannot start ends the job in one line (``ConfigError``, exit 2).
    ``object_store_bytes``: Ray Data's object-store limit for this pipeline (default
    :func:`object_store_budget`; Ray caps it at its own share of the cluster's object store).
    ``on_block(rows)``: called as each staged block comes back (the progress line counts them).
    Ray's console output follows :mod:`jobs.ray_output` (progress bars, the core worker's notices).
    """
    import ray

    from jobs import ray_output
    from jobs.gpu_decode import decode_stages
    from jobs.preflight import raise_actor_start_failure, reporting_start_failures

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ray_output.progress_bars()
    # Bounded in-flight data, whatever the corpus size:
    # * a fixed object-store budget: the plan reader is far faster than the actors and would
    #   otherwise queue listing blocks up to half the object store;
    # * blocks of about block_rows rows: Ray Data coalesces a read task's output into blocks of up
    #   to target_max_block_size (128 MiB: ~650,000 listing rows buffered per read task, then
    #   mapped whole by an actor), which is what made 5·10⁶ rows peak 1.5× 2·10⁵ (docs/scoring-job.md).
    budget = object_store_bytes or object_store_budget(block_rows, input_size, workers)
    with _bounded_blocks(ctx, budget, max(MIN_TARGET_BLOCK_BYTES, block_rows * 1024)):
        # Reading a plan block is a few KB of I/O: num_cpus=0 so the actors can never starve it, and
        # plan_readers(workers) at a time. One read unit per block (up to 4,096 units): each actor input
        # is about one block, so every actor gets work even on a small run. override_num_blocks = the
        # units: Ray Data would otherwise split or merge them, and a block is the unit an actor stages.
        source = CorpusShards(fs, plan_files, block_rows=block_rows)
        # no more actors than blocks: an actor that can get no block would only start a process, import
        # torch and load the model (a run of fewer than block_rows images needs one actor)
        workers = max(1, min(workers, source.blocks))
        ds = ray.data.read_datasource(source, num_cpus=0, concurrency=plan_readers(workers),
                                      override_num_blocks=source.read_tasks)
        # One call per block (block_rows rows): the actor scores it in sub-batches of batch_size and
        # stages it itself, so a block is staged the moment it is scored.
        read_fn, read_kwargs, actor_cls, actor_extra = decode_stages(decode_device, input_size, resize)
        ds = ds.map_batches(read_fn, batch_format="pyarrow", batch_size=block_rows, num_cpus=decode_cpus,
                            fn_kwargs=read_kwargs)
        ds = ds.map_batches(
            reporting_start_failures(actor_cls),
            fn_constructor_kwargs=dict(**scorer_kwargs, batch_size=batch_size, threads=None if gpus else threads,
                                       schema_bytes=schema.serialize().to_pybytes(), device="cuda" if gpus else "cpu",
                                       staging=(fs, staging_dir), **actor_extra),
            batch_size=block_rows,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else actor_cpus,
        )
        totals = {"rows": 0, "ok": 0, "files": 0}
        try:
            with ray_output.routed_stderr():  # the core worker's notices on fd 2 (actor creation) → session log
                for counts in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    block = {k: int(pc.sum(counts.column(k)).as_py() or 0) for k in totals}
                    for k in totals:
                        totals[k] += block[k]
                    if on_block is not None:
                        on_block(block["rows"])
        except Exception as exc:
            raise_actor_start_failure(exc)  # a scoring actor that cannot start: one line, exit 2
            raise
        return {**totals, "actors": workers}
