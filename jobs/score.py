"""Score an image corpus with ODIN on Ray: one Parquet row per image, exactly once, resumable."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import posixpath
import sys
import time
import uuid
import warnings
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from odin_engine import __version__ as ENGINE_VERSION
from odin_engine.io.corpus import Corpus, load_corpus
from odin_engine.io.scores import SCHEMA_VERSION, output_schema
from odin_engine.io.store import Store, is_uri
from odin_engine.errors import ConfigError
from odin_engine.io.images import RESIZE_POLICIES
from odin_engine.decide.tuning import load_tuning, resolve_settings

from jobs.options import DECODE_DEVICES
from jobs.preflight import preflight_scoring, raise_actor_start_failure, reporting_start_failures
from jobs.ray_utils import connect_cluster
from jobs.run_lock import LOCK_FILE, RunLock

JOB_FILE = "_odin_job.json"  # the configuration this output directory belongs to
CORPUS_DIR = "_corpus"  # the sorted corpus listing, in shards: what Ray Data reads
CHECKPOINT_DIR = "_checkpoint"  # Ray Data's row-level checkpoint (committed image_ids)
SCORES_DIR = "scores"
RUN_JSON = "run.json"
PENDING_SUFFIX = ".pending.parquet"  # Ray Data's pending-checkpoint suffix (checkpoint_writer.py)


def corpus_digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    for batch in table.to_batches(max_chunksize=65536):
        for name in batch.schema.names:
            h.update(name.encode() + b"\0")
            h.update("\0".join("" if v is None else str(v) for v in batch.column(name).to_pylist()).encode())
    return h.hexdigest()


def _write_corpus_shards(out: Store, table: pa.Table, shard_rows: int) -> int:
    out.fs.create_dir(out.p(CORPUS_DIR), recursive=True)
    for info in out.listdir(CORPUS_DIR):
        if info.type == pafs.FileType.File:
            out.fs.delete_file(info.path)
    n_shards = max(1, math.ceil(table.num_rows / shard_rows))
    for k in range(n_shards):
        pq.write_table(table.slice(k * shard_rows, shard_rows), out.p(CORPUS_DIR, f"part-{k:06d}.parquet"),
                       filesystem=out.fs)
    return n_shards


def _repair_checkpoint(out: Store) -> int:
    """Drop pending checkpoints whose commit already happened.

    Ray Data commits by renaming ``X.pending.parquet`` → ``X.parquet``; on an object store the
    rename is copy-then-delete, so a crash in between leaves both. Ray's recovery would then
    delete the data file of a *committed* checkpoint (losing rows); removing the stale pending
    file first makes that case a plain committed one.
    """
    infos = out.listdir(CHECKPOINT_DIR)
    names = {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File}
    fixed = 0
    for name in names:
        if name.endswith(PENDING_SUFFIX) and name[: -len(PENDING_SUFFIX)] + ".parquet" in names:
            out.fs.delete_file(out.p(CHECKPOINT_DIR, name))
            fixed += 1
    return fixed


def _committed_ids(out: Store) -> int:
    files = [i.path for i in out.listdir(CHECKPOINT_DIR)
             if i.type == pafs.FileType.File and i.path.endswith(".parquet") and not i.path.endswith(PENDING_SUFFIX)]
    return sum(pq.ParquetFile(out.fs.open_input_file(f)).metadata.num_rows for f in files)


def _score_files(out: Store) -> list[str]:
    return sorted(i.path for i in out.listdir(SCORES_DIR, recursive=True)
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _verify(out: Store, corpus: Corpus) -> dict[str, Any]:
    """Read the image_id/status columns of every score file and compare with the corpus."""
    files = _score_files(out)
    if files:
        t = pq.ParquetDataset(files, filesystem=out.fs).read(columns=["image_id", "status"])
    else:
        t = pa.table({"image_id": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    ids = t.column("image_id")
    counts = {d["values"]: d["counts"] for d in pc.value_counts(t.column("status")).to_pylist()}
    unique = pc.unique(ids)
    expected = corpus.table.column("image_id")
    missing = len(expected) - pc.sum(pc.is_in(expected, value_set=unique)).as_py() if len(expected) else 0
    extra = len(unique) - pc.sum(pc.is_in(unique, value_set=expected)).as_py() if len(unique) else 0
    return {
        "rows": t.num_rows,
        "files": len(files),
        "by_status": {"ok": counts.get("ok", 0), "error": counts.get("error", 0)},
        "duplicates": t.num_rows - len(unique),
        "missing": int(missing),
        "unexpected": int(extra),
        "exactly_once": t.num_rows == len(unique) == len(expected) and missing == 0,
    }


def _versions() -> dict[str, str]:
    import PIL
    import ray
    import torch

    return {"odin_engine": ENGINE_VERSION, "torch": torch.__version__, "ray": ray.__version__,
            "pyarrow": pa.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# --------------------------------------------------------------------------- the job
def score_corpus(
    input: str,
    output: str,
    model: str,
    weights: str | None = None,
    *,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    input_size: int | None = None,
    temperature: float | None = None,
    epsilon: float | None = None,
    tuning: str | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    run_id: str | None = None,
    resize: str = "crop",
    cpus_per_worker: float = 1.0,
    decode_cpus: float = 1.0,
    shard_rows: int = 1024,
    unsafe_pickle: bool = False,
    ray_address: str | None = None,
    verbose: bool = True,
    decode_device: str = "cpu",
) -> dict[str, Any]:
    """Score every image of ``input`` into ``<output>/scores/*.parquet``; return the run.json dict.

    ``input``: a directory (recursive) or a .parquet/.csv manifest, local or ``s3://``/``gs://``/
    ``file://``. ``output``: a directory, local or object store. ``model``/``weights``/``mean``/
    ``std``/``input_size``: as :func:`odin_engine.load_model`. ``temperature``/``epsilon``: ODIN's T and ε (default 1000, 0.0014),
    or ``tuning``: a tuning.json from ``odin-audit tune`` for this model (excludes them).
    ``workers``: scoring actors (default: one per GPU, else cluster CPUs / ``cpus_per_worker``);
    ``batch_size``: images per
    scoring call. Calling it again with the same arguments resumes (finished images are not
    rescored); an output directory that holds another configuration raises ``ConfigError``,
    as does any bad argument — in both cases before anything is written.
    Ray: uses the running session, else ``ray.init(address=ray_address)`` (``RAY_ADDRESS``,
    or a new local cluster). The returned dict's ``counts`` has ``ok``/``error``/``total``.
    """
    t_start = time.time()
    # Ray Data warns when a stage's concurrency cap exceeds its inputs (small corpora): harmless
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    started_at = datetime.now(timezone.utc).isoformat()
    # 1. validate everything before touching the output
    for name, value in (("--input", input), ("--output", output), ("--model", model)):
        if not value or not str(value).strip():
            raise ConfigError(f"{name} is required")
    temperature, epsilon, _ = resolve_settings(tuning, temperature, epsilon)
    if resize not in RESIZE_POLICIES:
        raise ConfigError(f"--resize must be one of {', '.join(RESIZE_POLICIES)}; got {resize!r}")
    for name, value in (("--batch-size", batch_size), ("--shard-rows", shard_rows)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers must be an integer >= 1; got {workers!r}")
    for name, value in (("--cpus-per-worker", cpus_per_worker), ("--decode-cpus", decode_cpus)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a number > 0; got {value!r}")
    if decode_device not in DECODE_DEVICES:
        raise ConfigError(f"--decode-device must be one of {', '.join(DECODE_DEVICES)}; got {decode_device!r}")
    if run_id is not None and (not str(run_id).strip() or len(str(run_id)) > 200):
        raise ConfigError(f"--run-id must be a non-empty string of at most 200 characters; got {run_id!r}")
    if weights and not is_uri(str(weights)) and weights != "DEFAULT" and not os.path.isfile(weights):
        raise ConfigError(f"weights file not found: {weights}")
    corpus = load_corpus(str(input))
    from odin_engine.loading import load_model

    loaded = load_model(model, weights, mean=mean, std=std, input_size=input_size, unsafe_pickle=unsafe_pickle)
    if tuning:  # a file tuned for another model is refused
        load_tuning(tuning, expect_model_id=loaded.model_id)
    digest = corpus_digest(corpus.table)
    config = {
        "schema_version": SCHEMA_VERSION,
        "input": str(input),
        "corpus_kind": corpus.kind,
        "corpus_items": len(corpus),
        "corpus_digest": digest,
        "model": model,
        "weights": str(weights) if weights else None,
        "model_id": loaded.model_id,
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "input_size": loaded.input_size,
        "resize": resize,
        "temperature": temperature,
        "epsilon": epsilon,
    }
    out = Store(str(output))
    lock = RunLock(out.fs, out.path, display=str(output))
    try:
        lock.check_free()  # another run writing here: refuse before anything else
        existing = out.read_json(JOB_FILE)
        entries = [posixpath.basename(i.path) for i in out.listdir()] if out.exists() else []
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read output directory {output!r}: {exc}") from exc
    identity = ("schema_version", "corpus_digest", "model_id", "mean", "std", "input_size", "resize",
                "temperature", "epsilon")
    if existing is not None:
        old = existing.get("config", {})
        diff = [k for k in identity if old.get(k) != config[k]]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there vs {config[k]!r} now" for k in diff)
            raise ConfigError(f"{output!r} holds the output of another configuration ({shown}). "
                              "Use a new --output directory, or the same settings to resume.")
        if run_id is not None and run_id != existing.get("run_id"):
            raise ConfigError(f"{output!r} belongs to run_id {existing.get('run_id')!r}, not {run_id!r}: "
                              "drop --run-id to resume it, or use a new --output directory")
        run_id = existing["run_id"]
    else:
        stray = [e for e in entries if e not in (CORPUS_DIR, LOCK_FILE)]
        if stray:
            raise ConfigError(f"{output!r} is not empty and holds no odin score run ({JOB_FILE} missing); "
                              f"found {sorted(stray)[:10]}. Use a new or empty --output directory.")
        run_id = str(run_id) if run_id else _default_run_id()

    # Ray, when anything is left to score: connect and start one scoring actor before writing anything
    cluster, t_init = None, time.time()
    if existing is None or _committed_ids(out) < len(corpus):
        cluster = connect_cluster(ray_address, quiet=not verbose)
        if decode_device == "cuda" and not cluster.gpus:
            raise ConfigError(f"--decode-device cuda needs GPU scoring workers; the cluster has none "
                              f"({cluster.summary()})")
        preflight_scoring(spec=model, weights=weights, mean=loaded.mean, std=loaded.std, input_size=loaded.input_size,
                          unsafe_pickle=unsafe_pickle, model_id=loaded.model_id, gpus=cluster.gpus > 0,
                          cpus=min(cpus_per_worker, cluster.cpus), temperature=temperature, epsilon=epsilon)
    ray_init_s = time.time() - t_init
    lock.acquire()  # one writer at a time, released however this call ends
    try:
        # 2. the output directory is ours: corpus shards, then the job file (its presence = shards complete)
        if existing is None:
            n_shards = _write_corpus_shards(out, corpus.table, shard_rows)
            out.write_json(JOB_FILE, {"run_id": run_id, "config": config, "shard_rows": shard_rows,
                                      "n_shards": n_shards, "created_at": started_at})
        repaired = _repair_checkpoint(out)
        done_before = _committed_ids(out)

        metadata = {
            "odin.schema_version": str(SCHEMA_VERSION),
            "odin.model_id": loaded.model_id,
            "odin.model_spec": model,
            "odin.temperature": repr(temperature),
            "odin.epsilon": repr(epsilon),
            "odin.normalization": json.dumps({"mean": list(loaded.mean), "std": list(loaded.std),
                                              "pixel_range": [0, 1]}),
            "odin.input_size": str(loaded.input_size),
            "odin.resize": resize,
            "odin.run_id": run_id,
            "odin.versions": json.dumps(_versions()),
        }
        carried = pa.schema([corpus.table.schema.field(c) for c in corpus.carried_columns])
        schema = output_schema(carried, metadata)

        # 3. run the pipeline unless everything is already committed
        ray_stats = None
        t_pipeline = time.time()
        if done_before < len(corpus):
            import ray
            from ray.data.checkpoint import CheckpointConfig

            from jobs.gpu_decode import decode_stages
            from jobs.pipeline import CorpusShards  # Ray Data: not needed for --help
            from jobs.ray_utils import cluster_cpus, cluster_gpus

            connect_cluster(ray_address, quiet=not verbose)  # (already connected above, unless nothing was left)
            t_pipeline = time.time()
            gpus = cluster_gpus()
            # default pool: one actor per GPU, else as many CPU actors as the cluster has room for
            n_workers = workers or (gpus if gpus else max(1, int(cluster_cpus() // cpus_per_worker)))
            actor_cpus, threads = cpus_per_worker, max(1, int(round(cpus_per_worker)))
            if done_before and not gpus:
                # On resume Ray Data adds a CheckpointFilter actor that reserves 1 CPU; leave it one.
                spare = cluster_cpus() - 1
                if n_workers * actor_cpus > spare:
                    actor_cpus = max(0.01, spare / n_workers)
                    if verbose:
                        print(f"odin score: resuming; {n_workers} worker(s) reserve {actor_cpus:.2f} CPU each "
                              "(one CPU is left to Ray Data's checkpoint filter)", flush=True)
            ctx = ray.data.DataContext.get_current()
            ctx.checkpoint_config = CheckpointConfig(
                id_column="image_id",
                checkpoint_path=out.uri(CHECKPOINT_DIR),
                delete_checkpoint_on_success=False,
                override_filesystem=None if isinstance(out.fs, pafs.LocalFileSystem) else out.fs,
            )
            ctx.enable_progress_bars = verbose
            read_fs = None if isinstance(out.fs, pafs.LocalFileSystem) else out.fs
            shard_files = sorted(i.path for i in out.listdir(CORPUS_DIR) if i.path.endswith(".parquet"))
            # Reading a shard is a few KB of I/O: num_cpus=0 so the actors can never starve it, and
            # two long read tasks stream all the shards (not a short task, and maybe a fresh worker
            # process, per shard).
            ds = ray.data.read_datasource(CorpusShards(out.fs, shard_files, read_tasks=2), num_cpus=0, concurrency=2)
            read_fn, read_kwargs, actor_cls, actor_extra = decode_stages(decode_device, loaded.input_size, resize)
            ds = ds.map_batches(read_fn, batch_format="pyarrow", batch_size=batch_size, num_cpus=decode_cpus,
                                fn_kwargs=read_kwargs)
            sink = schema.serialize().to_pybytes()
            ds = ds.map_batches(
                reporting_start_failures(actor_cls),
                fn_constructor_kwargs=dict(
                    spec=model, weights=weights, mean=list(loaded.mean), std=list(loaded.std),
                    input_size=loaded.input_size,
                    temperature=temperature, epsilon=epsilon, batch_size=batch_size, model_id=loaded.model_id,
                    run_id=run_id, threads=None if gpus else threads,
                    unsafe_pickle=unsafe_pickle, schema_bytes=sink, device="cuda" if gpus else "cpu", **actor_extra,
                ),
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=n_workers),
                num_gpus=1 if gpus else 0,
                num_cpus=0 if gpus else actor_cpus,
            )
            # Encoding a shard's rows is light: like the read, it reserves no CPU (the actors have
            # them) and runs at most 2 at a time.
            try:
                ds.write_parquet(out.p(SCORES_DIR), filesystem=read_fs, ray_remote_args={"num_cpus": 0}, concurrency=2)
            except Exception as exc:
                raise_actor_start_failure(exc)  # a scoring actor that cannot start: one line, exit 2
                raise
            ray_stats = {"workers": n_workers, "gpus_per_worker": 1 if gpus else 0,
                         "cpus_per_worker": 0 if gpus else actor_cpus, "decode_device": decode_device}
        t_end = time.time()

        # 4. verify exactly-once against the corpus and write run.json
        check = _verify(out, corpus)
        scored_now = max(0, check["rows"] - done_before)
        pipeline_s = t_end - t_pipeline
        previous = out.read_json(RUN_JSON) or {}
        attempt = {
            "started_at": started_at,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "already_done": done_before,
            "scored": scored_now,
            "ray_init_s": round(ray_init_s, 3),
            "pipeline_s": round(pipeline_s, 3),
            "total_s": round(time.time() - t_start, 3),
            "images_per_s": round(scored_now / pipeline_s, 2) if pipeline_s > 0 and scored_now else 0.0,
            "repaired_checkpoints": repaired,
            "execution": ray_stats,
            "cluster": cluster.as_dict() if cluster else None,
            "argv": sys.argv,
        }
        result = {
            "run_id": run_id,
            "config": config,
            "execution": {"batch_size": batch_size, "workers": workers, "cpus_per_worker": cpus_per_worker,
                          "decode_cpus": decode_cpus, "shard_rows": shard_rows},
            "output": {"root": out.root_uri, "scores": out.uri(SCORES_DIR), "files": check["files"]},
            "counts": {**check["by_status"], "total": check["rows"]},
            "verification": {k: check[k] for k in ("duplicates", "missing", "unexpected", "exactly_once")},
            "durations": {"this_attempt_s": attempt["total_s"], "pipeline_s": attempt["pipeline_s"]},
            "images_per_s": attempt["images_per_s"],
            "attempts": list(previous.get("attempts", [])) + [attempt],
            "versions": _versions(),
            "parquet_metadata": metadata,
        }
        out.write_json(RUN_JSON, result)
        if verbose:
            c = result["counts"]
            print(
                f"odin score: {c['total']} rows ({c['ok']} ok, {c['error']} error) in {out.uri(SCORES_DIR)}; "
                f"this attempt scored {scored_now} ({done_before} already done) in {pipeline_s:.1f}s "
                f"= {attempt['images_per_s']} images/s {cluster.summary() if cluster else '(no Ray needed)'}; "
                f"exactly once: {check['exactly_once']}"
                + ("" if check["exactly_once"] else
                   f" (duplicates {check['duplicates']}, missing {check['missing']}, unexpected {check['unexpected']})"),
                flush=True,
            )
        return result
    finally:
        lock.release()


# --------------------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser) -> None:
    from jobs import options

    options.add_config_option(parser)
    parser.add_argument("--input", help="directory (recursive) or .parquet/.csv manifest; local, s3://, gs://, file://")
    parser.add_argument("--output", help="output directory (local or object store); rerun the same command to resume")
    options.add_model_options(parser)
    options.add_odin_options(parser)
    options.add_batch_size_option(parser)
    options.add_workers_option(parser)
    parser.add_argument("--run-id", default=None, help="id stored in every row (default: generated; kept on resume)")
    options.add_resize_option(parser)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per CPU actor")
    parser.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs reserved per read/decode task")
    parser.add_argument("--shard-rows", type=int, default=1024,
                        help="corpus rows per input shard (the unit of checkpointing)")
    parser.add_argument("--decode-device", choices=DECODE_DEVICES, default="cpu",
                        help="where JPEGs are decoded: CPU tasks, or the scoring GPU (nvJPEG, in batches)")
    options.add_ray_options(parser)
    options.add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    result = score_corpus(
        args.input, args.output, args.model, args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
        temperature=args.temperature, epsilon=args.epsilon, tuning=args.tuning, batch_size=args.batch_size, workers=args.workers,
        run_id=args.run_id, resize=args.resize, cpus_per_worker=args.cpus_per_worker,
        decode_cpus=args.decode_cpus, shard_rows=args.shard_rows, unsafe_pickle=args.unsafe_pickle,
        ray_address=args.ray_address, verbose=not args.quiet, decode_device=args.decode_device,
    )
    return 0 if result["verification"]["exactly_once"] else 1


if __name__ == "__main__":
    from jobs.options import run_main

    sys.exit(run_main(build_parser, run, prog="python -m jobs.score", section="score"))
