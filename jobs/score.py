"""Score an image corpus with ODIN on Ray: one Parquet row per image, exactly once, incremental and resumable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import posixpath
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from pyarrow import fs as pafs

from odin_engine import __version__ as ENGINE_VERSION
from odin_engine.decide.tuning import load_tuning, resolve_settings, tuned_params
from odin_engine.errors import ConfigError
from odin_engine.io.corpus import CorpusSource, duplicate_error, empty_error, open_corpus
from odin_engine.io.images import RESIZE_POLICIES
from odin_engine.io.delta import (ATTEMPT_KEY, RUN_ID_KEY, DeltaLocation, add_action, commit as commit_version,
                                  remove_action, version_files)
from odin_engine.io.maintenance import compact, needs_compaction
from odin_engine.io.scores import FIT_ID_KEY, SCHEMA_VERSION, output_schema
from odin_engine.io.store import Store, ensure_folder, is_uri

from jobs import shards
from jobs.options import DECODE_DEVICES
from jobs.progress import PROGRESS_EVERY_S, ScoringProgress
from jobs.run_lock import LOCK_FILE, RunLock
from jobs.shards import COMMIT_DIR, LISTING_DIR, PLAN_DIR, SCORES_DIR, STAGING_DIR

JOB_FILE = "_odin_job.json"  # the model + settings this output directory belongs to, and its bucket layout
RUN_JSON = "run.json"
LAYOUT = 2  # 1: Ray Data row checkpoints + one corpus listing per directory; 2: hash buckets, incremental
PARTITION_ROWS = 131072  # listing rows a plan/commit task holds (whole buckets; at least one)
TABLE_FORMATS = ("delta", "buckets")  # scores/ as a Delta table (default), or one Parquet file per bucket (before 23)
IDENTITY = ("schema_version", "layout", "model_id", "mean", "std", "input_size", "resize", "temperature", "epsilon",
            "head", "fit_id", "params", "methods")
# (the last four are None for runs without --head/--fit/tuned parameters/--methods, and for older runs)


# --------------------------------------------------------------------------- 1. configuration
@dataclass(frozen=True)
class ScoreConfig:
    """The arguments of one ``score`` command, validated by :meth:`checked` (``ConfigError`` naming the flag)."""

    input: str
    output: str
    model: str
    weights: str | None = None
    mean: Sequence[float] | str | None = None
    std: Sequence[float] | str | None = None
    input_size: int | None = None
    temperature: float | None = None
    epsilon: float | None = None
    tuning: str | None = None
    batch_size: int = 256
    workers: int | None = None
    run_id: str | None = None
    resize: str = "crop"
    cpus_per_worker: float = 1.0
    decode_cpus: float = 1.0
    shard_rows: int = 1024
    unsafe_pickle: bool = False
    ray_address: str | None = None
    verbose: bool = True  # the tool's progress lines (False: `--quiet`: Ray's output goes to its log files too)
    ray_verbose: bool = False  # `--verbose`: Ray's own output on the console too (jobs/ray_output.py)
    label: str | None = None  # the set's name in the progress lines (`audit` scores several)
    progress_every_s: float = PROGRESS_EVERY_S  # the scoring progress line's period without a TTY
    print_summary: bool = True  # the one-line result (kept under `--quiet`; `audit` prints its own)
    decode_device: str = "cpu"  # where JPEGs are decoded: CPU tasks, or the scoring GPU (jobs/gpu_decode.py)
    partition_rows: int = PARTITION_ROWS  # listing rows per plan/commit task (tests make it small)
    object_store_mib: int | None = None  # the scoring pipeline's object-store budget (None: derived)
    fit: str | None = None  # fitted reference statistics (`odin-audit fit`): the fitted methods' columns
    head: str | None = None  # the classifier head's module name (default: found)
    methods: str | Sequence[str] | None = None  # `--methods`: None = the default set (odin_engine.methods)
    table_format: str | None = None  # `--table-format`: a new output's score table (None: the output's, else delta)

    def checked(self) -> "ScoreConfig":
        for name, value in (("--input", self.input), ("--output", self.output), ("--model", self.model)):
            if not value or not str(value).strip():
                raise ConfigError(f"{name} is required")
        temperature, epsilon, _ = resolve_settings(self.tuning, self.temperature, self.epsilon)
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(f"--resize must be one of {', '.join(RESIZE_POLICIES)}; got {self.resize!r}")
        for name, value in (("--batch-size", self.batch_size), ("--shard-rows", self.shard_rows),
                            ("partition_rows", self.partition_rows)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        if self.object_store_mib is not None and (not isinstance(self.object_store_mib, int)
                                                  or self.object_store_mib < 64):
            raise ConfigError(f"--object-store-mib must be an integer >= 64 (MiB); got {self.object_store_mib!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"--workers must be an integer >= 1; got {self.workers!r}")
        for name, value in (("--cpus-per-worker", self.cpus_per_worker), ("--decode-cpus", self.decode_cpus)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a number > 0; got {value!r}")
        if self.table_format is not None and self.table_format not in TABLE_FORMATS:
            raise ConfigError(f"--table-format must be one of {', '.join(TABLE_FORMATS)}; got {self.table_format!r}")
        if self.decode_device not in DECODE_DEVICES:
            raise ConfigError(f"--decode-device must be one of {', '.join(DECODE_DEVICES)}; got {self.decode_device!r}")
        if self.run_id is not None and (not str(self.run_id).strip() or len(str(self.run_id)) > 200):
            raise ConfigError(f"--run-id must be a non-empty string of at most 200 characters; got {self.run_id!r}")
        from odin_engine.methods import parse_methods, require_fit

        methods = parse_methods(self.methods)
        for m in methods or ():
            require_fit(m, self.fit is not None, "--methods")
        w = self.weights
        if w and not is_uri(str(w)) and w != "DEFAULT" and not os.path.isfile(w):
            raise ConfigError(f"weights file not found: {w}")
        return dataclasses.replace(self, input=str(self.input), output=str(self.output),
                                   temperature=temperature, epsilon=epsilon, methods=methods)


# --------------------------------------------------------------------------- 2. preparation (writes nothing)
@dataclass
class Prepared:
    """Everything checked before the first write: the model, the corpus source, the output directory."""

    cfg: ScoreConfig
    model_id: str
    mean: list[float]
    std: list[float]
    input_size: int
    source: CorpusSource
    out: Store
    lock: RunLock
    existing: dict | None  # the job file, when the directory holds a run
    fresh: bool  # the output directory did not exist or was empty
    run_id: str
    config: dict[str, Any]
    started_at: str
    t_start: float = field(default_factory=time.time)
    migrate: bool = False  # a bucket-file output becoming a Delta table (`--table-format delta`) in this run

    @property
    def carried(self) -> pa.Schema:
        return self.source.carried

    def schema(self) -> pa.Schema:
        """The score table's schema, with the Parquet key-value metadata every file carries."""
        cfg = self.cfg
        metadata = {
            "odin.schema_version": str(SCHEMA_VERSION), "odin.model_id": self.model_id, "odin.model_spec": cfg.model,
            "odin.temperature": repr(cfg.temperature), "odin.epsilon": repr(cfg.epsilon),
            "odin.normalization": _json({"mean": self.mean, "std": self.std, "pixel_range": [0, 1]}),
            "odin.input_size": str(self.input_size), "odin.resize": cfg.resize, "odin.run_id": self.run_id,
            "odin.versions": _json(_versions()), FIT_ID_KEY: self.config.get("fit_id") or "",
        }
        return output_schema(self.carried, metadata)


def _json(obj) -> str:
    import json

    return json.dumps(obj)


def _carried_spec(schema: pa.Schema) -> list[list[str]]:
    return [[f.name, str(f.type)] for f in schema]


def _widened(old: list | None, new: list) -> str:
    """The carried columns an earlier odin-audit kept in a type that ``delta_type`` now maps to
    today's (``label uint8 → int16``), as text; empty when the difference is the manifest's."""
    from odin_engine.io.delta import delta_type

    was = dict(map(tuple, old or []))
    changed = []
    for name, now in new:
        try:
            before = pa.type_for_alias(was.get(name, ""))
        except (ValueError, KeyError):
            continue
        if str(before) != now and str(delta_type(before)) == now:
            changed.append(f"{name} {before} → {now}")
    return ", ".join(changed)


def prepare(cfg: ScoreConfig) -> Prepared:
    """Validate the model, the corpus source and the output directory; raise ``ConfigError`` before any write."""
    started_at = datetime.now(timezone.utc).isoformat()
    source = open_corpus(cfg.input)
    if not source.units or source.rows_hint == 0:
        raise empty_error(source.source, source.kind)
    from odin_engine.loading import load_model

    loaded = load_model(cfg.model, cfg.weights, mean=cfg.mean, std=cfg.std, input_size=cfg.input_size,
                        unsafe_pickle=cfg.unsafe_pickle)
    if cfg.tuning:  # a file tuned for another model is refused
        load_tuning(cfg.tuning, expect_model_id=loaded.model_id)
    fit_id = check_fit(loaded, cfg.fit, cfg.head, cfg.temperature, cfg.methods)
    params = json.loads(json.dumps(tuned_params(cfg.tuning))) or None  # the tuned hyperparameters, JSON-shaped
    config = {
        "schema_version": SCHEMA_VERSION, "layout": LAYOUT, "model": cfg.model,
        "weights": str(cfg.weights) if cfg.weights else None, "model_id": loaded.model_id,
        "mean": list(loaded.mean), "std": list(loaded.std), "input_size": loaded.input_size, "resize": cfg.resize,
        "temperature": cfg.temperature, "epsilon": cfg.epsilon, "carried": _carried_spec(source.carried),
        "input": cfg.input, "corpus_kind": source.kind, "head": cfg.head, "fit_id": fit_id, "fit": cfg.fit,
        "params": params, "methods": list(cfg.methods) if cfg.methods else None,
    }
    out = Store(cfg.output)
    lock = RunLock(out.fs, out.path, display=cfg.output)
    try:
        lock.check_free()  # a file as --output, or another run writing here: refuse before anything else
        info = out.fs.get_file_info(out.path)
        existing = out.read_json(JOB_FILE)
        entries = [posixpath.basename(i.path) for i in out.listdir()] if info.type == pafs.FileType.Directory else []
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read output directory {cfg.output!r}: {exc}") from exc
    run_id = cfg.run_id
    if existing is not None:
        old = dict(existing.get("config", {}))
        old.setdefault("layout", 1)
        diff = [k for k in IDENTITY if old.get(k) != config[k]]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there vs {config[k]!r} now" for k in diff)
            hint = (" It was written by an older odin-audit (per-id checkpoints); score into a new --output."
                    if "layout" in diff else " Use a new --output directory, or the same settings to resume.")
            raise ConfigError(f"{cfg.output!r} holds the output of another configuration ({shown}).{hint}")
        if old.get("carried") != config["carried"]:
            widened = _widened(old.get("carried"), config["carried"])
            raise ConfigError(f"{cfg.output!r} holds scores whose carried manifest columns were {old.get('carried')}; "
                              f"today's corpus has {config['carried']}. " + (
                                  f"This odin-audit stores {widened} in the types a Delta table keeps; score into "
                                  "a new --output directory." if widened else
                                  "Keep the label/split columns (and their types) of the first run, or use a new "
                                  "--output directory."))
        fmt = table_format(existing)
        from odin_engine.io.delta import is_delta_table

        # a bucket-file output is migrated when asked, and a migration a kill interrupted goes on
        migrate = fmt == "buckets" and (cfg.table_format == "delta" or is_delta_table(out.fs, out.p(SCORES_DIR)))
        if cfg.table_format is not None and cfg.table_format != fmt and not migrate:
            raise ConfigError(f"{cfg.output!r} keeps its scores as a Delta table (its {JOB_FILE}); it cannot go "
                              "back to bucket files: drop --table-format buckets, or use a new --output")
        if run_id is not None and run_id != existing.get("run_id"):
            raise ConfigError(f"{cfg.output!r} belongs to run_id {existing.get('run_id')!r}, not {run_id!r}: "
                              "drop --run-id to resume it, or use a new --output directory")
        run_id = existing["run_id"]
        delta = fmt == "delta" or migrate
    else:
        stray = [e for e in entries if e not in (LISTING_DIR, PLAN_DIR, LOCK_FILE)]
        if stray:
            raise ConfigError(f"{cfg.output!r} is not empty and holds no odin score run ({JOB_FILE} missing); "
                              f"found {sorted(stray)[:10]}. Use a new or empty --output directory.")
        run_id = str(run_id) if run_id else _default_run_id()
        delta = table_format(None, cfg.table_format) == "delta"
    if delta:
        DeltaLocation(out.fs, out.p(SCORES_DIR)).check_reachable("score table")
    return Prepared(cfg, loaded.model_id, list(loaded.mean), list(loaded.std), loaded.input_size, source, out, lock,
                    existing, existing is None and not entries, run_id, config, started_at,
                    migrate=existing is not None and migrate)


def table_format(job: dict | None, requested: str | None = None) -> str:
    """The score table's format of an output: its job file's ``layout.format`` (outputs written
    before issue 23 have none: ``buckets``), or for a new output ``requested`` (default ``delta``)."""
    if job is None:
        return requested or "delta"
    return str(job.get("layout", {}).get("format", "buckets"))


def output_table_format(output: str, requested: str | None = None) -> str:
    """The table format of the score output ``output`` after a run asked for ``requested``: its
    job file's (:func:`table_format`), ``delta`` for a new output unless asked otherwise, and
    ``delta`` for a bucket-file output a run migrates (``--table-format delta``). An audit's flags
    take its corpus output's format (``jobs.audit``)."""
    try:
        job = Store(output).read_json(JOB_FILE)
    except (OSError, ValueError):
        job = None
    return decided_format(None if job is None else table_format(job), requested)


def decided_format(recorded: str | None, requested: str | None) -> str:
    """The format an output's table has after a run that asked for ``requested``
    (``--table-format``): a new output's (``recorded`` None) is ``requested``, default ``delta``;
    an existing output keeps ``recorded`` unless ``delta`` is asked (a migration). Going back from
    ``delta`` to ``buckets`` is refused where the output is checked."""
    if recorded is None:
        return requested or "delta"
    return "delta" if requested == "delta" else recorded


def check_fit(loaded, fit: str | None, head: str | None, temperature: float,
              methods: Sequence[str] | None = None) -> str | None:
    """Refuse (exit 2) a --fit of another model/head (or T, when ``--methods`` names adascale: its reference
    Q' was measured at the fit's T), or a --head the model lacks; the fit's digest or None."""
    if fit is None and head is None:
        return None
    import hashlib

    from odin_engine.detectors.features import find_head
    from odin_engine.detectors.fit import FitStats
    from odin_engine.io.store import read_bytes

    found = find_head(loaded.module, loaded.input_size, head)
    if fit is None:
        return None
    try:
        data = read_bytes(str(fit))
    except OSError as exc:
        raise ConfigError(f"--fit {fit}: cannot read it ({exc}); write one with `odin-audit fit`") from exc
    FitStats.from_bytes(data, f"--fit {fit}").check_model(loaded.model_id, found.name,
                                                          temperature if "adascale" in (methods or ()) else None)
    return hashlib.sha256(data).hexdigest()[:16]


# --------------------------------------------------------------------------- 3. the Ray part
def start_ray(prep: "Prepared") -> dict[str, Any]:
    """The one Ray setup point, before anything is written: connect to the cluster the address rules
    choose (``jobs.ray_utils``), run one probe task with a scoring actor's resources (a node that
    cannot run one ends the command in one line, exit 2), and size the scoring actor pool."""
    from jobs.preflight import preflight_scoring
    from jobs.ray_output import driver_log
    from jobs.ray_utils import connect_cluster

    cfg = prep.cfg
    t0 = time.time()
    cluster = connect_cluster(cfg.ray_address, quiet=not cfg.verbose, verbose=cfg.ray_verbose)
    if cluster.logs and not cluster.logs_announced:  # once per process (audit scores several sets)
        cluster.logs_announced = True
        _say(prep, f"Ray's own output is in {cluster.logs} (this driver's: {os.path.basename(driver_log() or '-')}, "
                   "Ray Data's: ray-data/)" + ("" if cfg.ray_verbose else "; --verbose shows it here"))
    gpus = cluster.gpus
    if cfg.decode_device == "cuda" and not gpus:
        raise ConfigError(f"--decode-device cuda needs GPU scoring workers; the cluster has none ({cluster.summary()})")
    preflight_scoring(spec=cfg.model, weights=cfg.weights, mean=prep.mean, std=prep.std, input_size=prep.input_size,
                      unsafe_pickle=cfg.unsafe_pickle, model_id=prep.model_id, gpus=gpus > 0,
                      cpus=min(cfg.cpus_per_worker, cluster.cpus), temperature=cfg.temperature, epsilon=cfg.epsilon)
    # default pool: one actor per GPU, else as many CPU actors as the cluster has room for
    workers = cfg.workers or (gpus if gpus else max(1, int(cluster.cpus // cfg.cpus_per_worker)))
    return {"init_s": time.time() - t0, "workers": workers, "gpus": gpus,
            "cpus": cluster.cpus, "actor_cpus": cfg.cpus_per_worker,
            "threads": max(1, int(round(cfg.cpus_per_worker))), "cluster": cluster.as_dict(),
            "cluster_summary": cluster.summary(), "decode_device": cfg.decode_device}


def _partitions(n_buckets: int, listed: int, partition_rows: int = PARTITION_ROWS) -> list[tuple[int, int]]:
    """Contiguous bucket ranges of about ``partition_rows`` listed rows each (whole buckets)."""
    per_bucket = max(1.0, listed / n_buckets)
    width = max(1, int(partition_rows // per_bucket))
    return [(lo, min(n_buckets, lo + width)) for lo in range(0, n_buckets, width)]


def _scan_scores(out: Store, n_buckets: int) -> tuple[dict[int, str], list[str]]:
    """``{bucket: file}`` of the committed table, and files in ``scores/`` that are no bucket file."""
    committed, stray = {}, []
    for info in out.listdir(SCORES_DIR):
        name = posixpath.basename(info.path)
        if info.type != pafs.FileType.File:
            stray.append(name)
            continue
        if name.startswith(".") and name.endswith(".tmp"):  # a local write interrupted before its rename
            out.fs.delete_file(info.path)
            continue
        b = shards.parse_bucket_file(name)
        if b is None or b >= n_buckets:
            stray.append(name)
        else:
            committed[b] = info.path
    return committed, stray


def _scan_staging(out: Store) -> list[tuple[int, int, str]]:
    found = []
    for info in out.listdir(STAGING_DIR):
        rng = shards.parse_staging_file(posixpath.basename(info.path))
        if info.type == pafs.FileType.File and rng:
            found.append((rng[0], rng[1], info.path))
    return found


def _delete_tree(out: Store, name: str) -> None:
    if out.exists(name):
        out.fs.delete_dir(out.p(name))


def _delete_other_attempts(out: Store, name: str, keep: str | None) -> None:
    """Remove ``<name>/<attempt>/`` folders of every attempt but ``keep`` (and ``<name>`` once empty)."""
    for info in out.listdir(name):
        if posixpath.basename(info.path) != keep:
            if info.type == pafs.FileType.Directory:
                out.fs.delete_dir(info.path)
            else:
                out.fs.delete_file(info.path)
    if keep is None and out.exists(name):
        out.fs.delete_dir(out.p(name))


def _prefix(cfg: ScoreConfig) -> str:
    return f"odin score [{cfg.label}]" if cfg.label else "odin score"


def _say(prep: Prepared, text: str) -> None:
    if prep.cfg.verbose:
        print(f"{_prefix(prep.cfg)}: {text}", flush=True)


def list_corpus(source: CorpusSource, out: Store, attempt: str) -> dict[str, Any]:
    """Listing tasks (one per corpus unit, and one per unit a key range hands off) write chunk files
    sorted by hash; the driver gets counts and paths, never entries."""
    from jobs.pipeline import run_growing_tasks

    directory = out.p(LISTING_DIR, attempt)
    carried = source.carried.serialize().to_pybytes()
    chunks, rows, errors, problems = [], 0, 0, []
    calls = [(unit, carried, out.fs, directory, f"u{k:06d}") for k, unit in enumerate(source.units)]
    n_tasks = len(calls)

    def more(res: dict) -> list[tuple]:
        nonlocal n_tasks
        new = [(unit, carried, out.fs, directory, f"u{n_tasks + k:06d}") for k, unit in enumerate(res.get("more", ()))]
        n_tasks += len(new)
        return new

    for res in run_growing_tasks(shards.list_unit_task, calls, more):
        if "config_error" in res:
            problems.append(res["config_error"])
            continue
        for c in res["chunks"]:
            chunks.append(c["path"])
            rows += c["rows"]
            errors += c["errors"]
    if problems:
        raise ConfigError(sorted(problems)[0])
    if rows == 0:
        raise empty_error(source.source, source.kind)
    return {"chunks": sorted(chunks), "listed": rows, "listing_errors": errors, "tasks": n_tasks}


def _by_partition(parts: list[tuple[int, int]], committed: dict[int, str],
                  staged: list[tuple[int, int, str]]) -> list[tuple[dict[int, str], list[str]]]:
    width = parts[0][1] - parts[0][0]
    per = [({}, []) for _ in parts]
    for b, path in committed.items():
        per[b // width][0][b] = path
    for lo, hi, path in staged:
        for k in range(lo // width, min(len(parts) - 1, hi // width) + 1):
            per[k][1].append(path)
    return per


def plan(prep: Prepared, listing: dict[str, Any], n_buckets: int, attempt: str) -> dict[str, Any]:
    """Plan tasks (one per bucket range): today's listing vs committed and staged rows → rows to score."""
    import ray

    from jobs.pipeline import run_tasks

    out = prep.out
    parts = _partitions(n_buckets, listing["listed"], prep.cfg.partition_rows)
    delta = table_format(prep.existing, prep.cfg.table_format) == "delta"
    committed = {} if delta else _scan_scores(out, n_buckets)[0]
    per = _by_partition(parts, committed, _scan_staging(out))
    if delta or prep.migrate:  # every task gets the version's file list and picks the files of its range
        version = _current_version(prep)[1]
        ref = ray.put(version)  # (Ray resolves a reference given as an argument, not one inside a tuple)
        per = [((legacy, version) if prep.migrate else ref, staged) for legacy, staged in per]
    ensure_folder(out.fs, out.p(PLAN_DIR, attempt))
    chunks = ray.put(listing["chunks"])
    schema = prep.source.schema
    calls = [(out.fs, out.path, schema, chunks, n_buckets, lo, hi, per[k][0], per[k][1],
              out.p(PLAN_DIR, attempt, f"p{k:06d}.parquet"), prep.cfg.shard_rows) for k, (lo, hi) in enumerate(parts)]
    totals: dict[str, Any] = {"plan_files": [], "partitions": len(parts)}
    dups, n_dups = [], 0
    for res in run_tasks(shards.plan_partition, calls):
        if "n_duplicates" in res:
            dups += res["duplicates"]
            n_dups += res["n_duplicates"]
            continue
        path = res.pop("plan")
        if path:
            totals["plan_files"].append(path)
        for k, v in res.items():
            totals[k] = totals.get(k, 0) + v
    if n_dups:
        raise duplicate_error(prep.source.source, dups, n_dups)
    return totals


def score_planned(prep: Prepared, ray_info: dict[str, Any], plan_files: list[str], total: int) -> dict[str, int]:
    from jobs.pipeline import object_store_budget, score_planned as run_pipeline

    cfg = prep.cfg
    budget = (cfg.object_store_mib * 2**20 if cfg.object_store_mib
              else object_store_budget(cfg.shard_rows, prep.input_size, ray_info["workers"]))
    schema = prep.schema().append(pa.field("bucket", pa.int64()))
    scorer_kwargs = dict(spec=cfg.model, weights=cfg.weights, mean=prep.mean, std=prep.std,
                         input_size=prep.input_size, temperature=cfg.temperature, epsilon=cfg.epsilon,
                         model_id=prep.model_id, run_id=prep.run_id, unsafe_pickle=cfg.unsafe_pickle,
                         fit=cfg.fit, head=cfg.head, params=prep.config.get("params"), methods=cfg.methods)
    # without a TTY (cron, Kubernetes, `ray job submit` logs) a timed line; on a TTY Ray Data's bars
    every = cfg.progress_every_s if cfg.verbose and not sys.stdout.isatty() else 0.0
    with ScoringProgress(total, lambda line: _say(prep, line), every) as progress:
        totals = run_pipeline(prep.out.fs, sorted(plan_files), prep.out.p(STAGING_DIR), schema,
                              scorer_kwargs=scorer_kwargs, batch_size=cfg.batch_size, block_rows=cfg.shard_rows,
                              decode_cpus=cfg.decode_cpus, input_size=prep.input_size, resize=cfg.resize,
                              workers=ray_info["workers"], gpus=ray_info["gpus"], actor_cpus=ray_info["actor_cpus"],
                              threads=ray_info["threads"], decode_device=cfg.decode_device,
                              object_store_bytes=budget, on_block=progress.add)
    return {**totals, "object_store_mib": round(budget / 2**20, 1)}


FAULT_BEFORE_COMMIT = "ODIN_FAULT_BEFORE_COMMIT"  # tests: a file to create, then wait, before the Delta commit


def _fault_point(variable: str) -> None:
    """Fault injection for the kill tests: with ``$variable`` naming a file, create it and wait
    (up to 10 minutes) — the moment between a night's data files and its commit, made observable."""
    marker = os.environ.get(variable)
    if marker:
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(600)


def _table_schema(prep: Prepared) -> pa.Schema:
    """The Delta score table's schema: the score schema and each row's hash ``bucket``."""
    return prep.schema().append(pa.field("bucket", pa.int64()))


def _current_version(prep: Prepared):
    """``(DeltaTable, VersionFiles)`` of the score table's current version; ``(None, None)`` before the first commit."""
    loc = DeltaLocation(prep.out.fs, prep.out.p(SCORES_DIR))
    if not loc.exists():
        return None, None
    table = loc.open(what="scores")
    return table, shards.VersionFiles(version_files(loc, table, "bucket"), _table_schema(prep))


def commit_delta(prep: Prepared, listing: dict[str, Any], n_buckets: int, attempt: str) -> dict[str, Any]:
    """One Delta version for the night (``jobs.table_commit``): range tasks write the new rows and
    record the removed ones, file tasks rewrite the touched files, the driver commits both, then
    verification tasks check the new version range by range; counts only."""
    import ray

    from jobs import table_commit
    from jobs.pipeline import run_tasks

    out = prep.out
    loc = DeltaLocation(out.fs, out.p(SCORES_DIR))
    parts = _partitions(n_buckets, listing["listed"], prep.cfg.partition_rows)
    base, version = _current_version(prep)
    staged = _scan_staging(out)
    legacy = _scan_scores(out, n_buckets)[0] if prep.migrate else {}  # bucket files becoming the Delta table
    per = _by_partition(parts, legacy, staged)
    work = out.p(COMMIT_DIR, attempt)
    ensure_folder(out.fs, work)
    ensure_folder(out.fs, loc.path)
    schema = _table_schema(prep)
    constants = {"temperature": prep.cfg.temperature, "epsilon": prep.cfg.epsilon, "model_id": prep.model_id,
                 "run_id": prep.run_id}
    chunks, vref = ray.put(listing["chunks"]), ray.put(version)
    calls = [(out.fs, loc.path, prep.source.schema, chunks, n_buckets, lo, hi, vref, per[k][1], schema, constants,
              f"part-{attempt}-{k:06d}.parquet", posixpath.join(work, f"r{k:06d}.parquet"), per[k][0] or None)
             for k, (lo, hi) in enumerate(parts)]
    entries, removals, removal_files = [], {}, []
    totals: dict[str, Any] = dict.fromkeys(("listed", "written_rows", "kept_rows", "from_staging", "dropped",
                                            "torn_staging"), 0)
    for res in run_tasks(table_commit.commit_range, calls):
        for k in totals:
            totals[k] += res[k]
        if res["entry"]:
            entries.append(res["entry"])
        if res.get("removals_file"):
            removal_files.append(res["removals_file"])
        for path, n in res["removals"].items():
            removals[path] = removals.get(path, 0) + n
    rows_of = {f.path: f for f in version.files} if version else {}
    emptied = [p for p, n in removals.items() if rows_of[p].rows is not None and n >= rows_of[p].rows]
    rewrites = [(out.fs, loc.path, path, removal_files, schema, f"part-{attempt}-w{i:06d}.parquet")
                for i, path in enumerate(sorted(set(removals) - set(emptied)))]
    entries += list(run_tasks(table_commit.rewrite_file, rewrites))
    _fault_point(FAULT_BEFORE_COMMIT)
    prep.lock.check_held()  # a run that lost its lease commits nothing
    adds = [add_action(e) for e in entries]
    removes = [remove_action(loc, p, rows_of[p].size) for p in sorted(removals)]
    # the table's settings: the score files' metadata but the library versions (they change between runs)
    settings = {k.decode(): v.decode() for k, v in schema.metadata.items() if k != b"odin.versions"}
    new_version = base.version() if base is not None else None
    if adds or removes:
        new_version = commit_version(loc, schema, adds, removes, base=base, settings=settings,
                                     metadata={RUN_ID_KEY: prep.run_id, ATTEMPT_KEY: attempt})
    # small files past the rule (odin_engine.io.maintenance.needs_compaction): merged now, one more
    # version with the same rows, under this run's lease
    compaction = None
    if new_version is not None and needs_compaction(loc.open(what="scores")):
        prep.lock.check_held()
        done = compact(loc, custom_metadata={RUN_ID_KEY: prep.run_id, ATTEMPT_KEY: attempt})
        compaction = {"version": done.version_after, "files_before": done.files_before,
                      "files_after": done.files_after, "bytes_written": done.bytes_written}
    # verification: the version readers now see, range by range, against today's listing
    after = ray.put(_current_version(prep)[1])
    checks = dict.fromkeys(("rows", "ok", "error", "duplicates", "missing", "unexpected"), 0)
    for res in run_tasks(table_commit.verify_range, [(out.fs, prep.source.schema, chunks, n_buckets, lo, hi, after)
                                                      for lo, hi in parts]):
        for k in checks:
            checks[k] += res[k]
    for _, _, path in staged:  # every staged row is in the version now (or its image is no longer listed)
        out.fs.delete_file(path)
    if prep.migrate:  # the bucket files' rows are in the table now: drop the files, then say so in the job file
        for path in legacy.values():
            out.fs.delete_file(path)
        prep.existing["layout"]["format"] = "delta"
        prep.lock.check_held()
        out.write_json(JOB_FILE, prep.existing)
    _delete_tree(out, COMMIT_DIR)
    if out.exists(STAGING_DIR) and not out.listdir(STAGING_DIR):
        out.fs.delete_dir(out.p(STAGING_DIR))
    kept = len(rows_of) - len(removals)
    return {**totals, **checks, "written": len(adds), "unchanged": kept, "deleted": len(removes),
            "rewritten": len(rewrites), "table_version": new_version, "compaction": compaction,
            "migrated_bucket_files": len(legacy),
            "stray_files": 0, "stray_examples": []}


def commit(prep: Prepared, listing: dict[str, Any], n_buckets: int) -> dict[str, Any]:
    """Commit tasks (one per bucket range): each bucket's new file where it changed, verified; counts only."""
    import ray

    from jobs.pipeline import run_tasks

    out = prep.out
    parts = _partitions(n_buckets, listing["listed"], prep.cfg.partition_rows)
    committed, stray = _scan_scores(out, n_buckets)
    staged = _scan_staging(out)
    per = _by_partition(parts, committed, staged)
    ensure_folder(out.fs, out.p(SCORES_DIR))
    chunks = ray.put(listing["chunks"])
    schema = prep.schema()
    constants = {"temperature": prep.cfg.temperature, "epsilon": prep.cfg.epsilon, "model_id": prep.model_id,
                 "run_id": prep.run_id}
    calls = [(out.fs, out.p(SCORES_DIR), prep.source.schema, chunks, n_buckets, lo, hi, per[k][0], per[k][1],
              schema, constants) for k, (lo, hi) in enumerate(parts)]
    totals: dict[str, Any] = {}
    for res in run_tasks(shards.commit_partition, calls):
        for k, v in res.items():
            totals[k] = totals.get(k, 0) + v
    # every staged row is now in a bucket file (or belonged to an image no longer listed); the
    # commit tasks deleted the staging files inside their range, the driver the straddling ones
    for lo, hi, path in staged:
        if any(plo <= lo and hi < phi for plo, phi in parts):
            continue
        out.fs.delete_file(path)
    if out.exists(STAGING_DIR) and not out.listdir(STAGING_DIR):
        out.fs.delete_dir(out.p(STAGING_DIR))
    totals["stray_files"] = len(stray)
    totals["stray_examples"] = sorted(stray)[:10]
    return totals


def run_attempt(prep: Prepared, ray_info: dict[str, Any]) -> dict[str, Any]:
    """List → plan → score → commit under the lease; returns the attempt's aggregates."""
    out, cfg = prep.out, prep.cfg
    attempt = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    for leftover in (LISTING_DIR, PLAN_DIR, COMMIT_DIR):  # dead attempts' (this run holds the lease): never this one's
        _delete_other_attempts(out, leftover, attempt)
    t = time.time()
    listing = list_corpus(prep.source, out, attempt)
    prep.lock.check_held()
    t_list = time.time() - t
    _say(prep, f"listed {listing['listed']} items in {t_list:.1f}s ({listing['tasks']} listing tasks)")
    if prep.existing is None:
        n_buckets = max(1, math.ceil(listing["listed"] / cfg.shard_rows))
    else:
        n_buckets = int(prep.existing["layout"]["buckets"])
    t = time.time()
    planned = plan(prep, listing, n_buckets, attempt)
    t_plan = time.time() - t
    prep.lock.check_held()
    if prep.existing is None:  # the job file = this directory is a run (written once, before any score)
        prep.existing = {"run_id": prep.run_id, "config": prep.config, "created_at": prep.started_at,
                         "layout": {"buckets": n_buckets, "hash": shards.HASH, "shard_rows": cfg.shard_rows,
                                    "format": table_format(None, cfg.table_format)}}
        out.write_json(JOB_FILE, prep.existing)
    _say(prep, f"{planned['todo']} to score ({planned['new']} new, {planned['changed']} changed, "
               f"{planned['retried']} retried), {planned['reused']} already done; {n_buckets} buckets "
               f"in {planned['partitions']} ranges, planned in {t_plan:.1f}s")
    t = time.time()
    scored = {"rows": 0, "ok": 0, "files": 0}
    if planned["plan_files"]:
        scored = score_planned(prep, ray_info, planned["plan_files"], planned["todo"])
    t_score = time.time() - t
    prep.lock.check_held()  # a run that lost its lease commits nothing
    t = time.time()
    if table_format(prep.existing) == "delta" or prep.migrate:
        committed = commit_delta(prep, listing, n_buckets, attempt)
    else:
        committed = commit(prep, listing, n_buckets)
    t_commit = time.time() - t
    for done in (LISTING_DIR, PLAN_DIR):
        _delete_other_attempts(out, done, None)
    return {"ray": ray_info, "listing": listing, "plan": planned, "scored": scored, "commit": committed,
            "n_buckets": n_buckets,
            "durations": {"ray_init_s": ray_info["init_s"], "list_s": t_list, "plan_s": t_plan,
                          "pipeline_s": t_score, "commit_s": t_commit}}


# --------------------------------------------------------------------------- 4. finish
def finish(prep: Prepared, stats: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the attempt into run.json (counts, durations, verification: no per-image lists) and print."""
    cfg, out = prep.cfg, prep.out
    c, p, d = stats["commit"], stats["plan"], stats["durations"]
    listed = stats["listing"]["listed"]
    exactly_once = (c["duplicates"] == 0 and c["missing"] == 0 and c["unexpected"] == 0 and c["stray_files"] == 0
                    and c["rows"] == listed)
    scored_now = stats["scored"]["rows"]
    pipeline_s = d["pipeline_s"]
    previous = out.read_json(RUN_JSON) or {}
    attempt = {
        "started_at": prep.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "listed": listed,
        "already_done": p["reused"],
        "scored": scored_now,
        "new": p["new"], "changed": p["changed"], "retried": p["retried"], "dropped": c["dropped"],
        "listing_errors": stats["listing"]["listing_errors"],
        "buckets": {"total": stats["n_buckets"], "written": c["written"], "unchanged": c["unchanged"],
                    "deleted": c["deleted"], "ranges": p["partitions"]},
        # a Delta table: the version this attempt committed (None: nothing changed), its files
        # added (new rows and rewrites), rewritten, removed and kept, and its rows written and kept
        **({"table": {"format": "delta", "version": c["table_version"], "files_added": c["written"],
                      "files_rewritten": c["rewritten"], "files_removed": c["deleted"],
                      "files_kept": c["unchanged"], "rows_written": c["written_rows"],
                      "rows_kept": c["kept_rows"], "compaction": c["compaction"],
                      "migrated_bucket_files": c["migrated_bucket_files"]}} if "table_version" in c else {}),
        "staging": {"files_written": stats["scored"]["files"], "rows_committed": c["from_staging"],
                    "torn_files": c.get("torn_staging", 0)},
        **{k: round(v, 3) for k, v in d.items()},
        "total_s": round(time.time() - prep.t_start, 3),
        "images_per_s": round(scored_now / pipeline_s, 2) if pipeline_s > 0 and scored_now else 0.0,
        "execution": {"workers": stats["ray"]["workers"], "gpus_per_worker": 1 if stats["ray"]["gpus"] else 0,
                      "cpus_per_worker": 0 if stats["ray"]["gpus"] else stats["ray"]["actor_cpus"],
                      "listing_tasks": stats["listing"]["tasks"], "decode_device": stats["ray"]["decode_device"],
                      "object_store_mib": stats["scored"].get("object_store_mib"),
                      "actors": stats["scored"].get("actors", 0)},  # the pool started: ≤ workers, ≤ blocks
        "cluster": stats["ray"]["cluster"],
        "argv": sys.argv,
    }
    result = {
        "run_id": prep.run_id,
        "config": {**prep.config, "corpus_items": listed},
        "layout": prep.existing["layout"],
        "execution": {"batch_size": cfg.batch_size, "workers": cfg.workers, "cpus_per_worker": cfg.cpus_per_worker,
                      "decode_cpus": cfg.decode_cpus, "shard_rows": cfg.shard_rows},
        "output": {"root": out.root_uri, "scores": out.uri(SCORES_DIR), "files": c["written"] + c["unchanged"]},
        "counts": {"ok": c["ok"], "error": c["error"], "total": c["rows"]},
        "verification": {"listed": listed, "rows": c["rows"], "duplicates": c["duplicates"], "missing": c["missing"],
                         "unexpected": c["unexpected"], "stray_files": c["stray_examples"],
                         "checked_in": ("verification tasks over the committed Delta version, bucket range by "
                                        "bucket range" if "table_version" in c else "commit tasks, bucket by bucket"),
                         "exactly_once": exactly_once},
        "durations": {"this_attempt_s": attempt["total_s"], "pipeline_s": attempt["pipeline_s"]},
        "images_per_s": attempt["images_per_s"],
        "attempts": list(previous.get("attempts", [])) + [attempt],
        "versions": _versions(),
        "parquet_metadata": dict((k.decode(), v.decode()) for k, v in prep.schema().metadata.items()),
    }
    prep.lock.check_held()
    out.write_json(RUN_JSON, result)
    if cfg.print_summary:
        n = result["counts"]
        print(
            f"{_prefix(cfg)}: {n['total']} rows ({n['ok']} ok, {n['error']} error) in {out.uri(SCORES_DIR)}; "
            f"this attempt scored {scored_now} ({p['reused']} already done) in {pipeline_s:.1f}s "
            f"= {attempt['images_per_s']} images/s [new {p['new']}, changed {p['changed']}, retried {p['retried']}, "
            f"dropped {c['dropped']}] {stats['ray']['cluster_summary']}; exactly once: {exactly_once}"
            + ("" if exactly_once else
               f" (listed {listed}, duplicates {c['duplicates']}, missing {c['missing']}, unexpected "
               f"{c['unexpected']}, stray files {c['stray_examples']})"),
            flush=True,
        )
    return result


def _versions() -> dict[str, str]:
    import PIL
    import ray
    import torch

    return {"odin_engine": ENGINE_VERSION, "torch": torch.__version__, "ray": ray.__version__,
            "pyarrow": pa.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _discard(prep: Prepared) -> None:
    """After a configuration error found by the listing: remove what this attempt wrote."""
    for name in (LISTING_DIR, PLAN_DIR):
        _delete_tree(prep.out, name)


# --------------------------------------------------------------------------- the job
def score_corpus(input: str, output: str, model: str, weights: str | None = None, **options: Any) -> dict[str, Any]:
    """Score every image of ``input`` into ``<output>/scores/``; return the run.json dict.

    ``input``: a directory (recursive) or a .parquet/.csv manifest, local or ``s3://``/``gs://``/
    ``file://``. ``output``: a directory, local or object store; it belongs to one model and its
    settings (model_id, T, ε, mean/std, input size, resize), not to one corpus listing. Options
    are :class:`ScoreConfig`'s fields (``temperature``/``epsilon`` default 1000/0.0014, or
    ``tuning``: a tuning.json for this model; ``workers``, ``batch_size``, ``shard_rows`` …).
    Calling it again scores only what is new, changed, or failed retryably since the last call,
    keeps every other row, and drops rows of images no longer listed; bad arguments or an
    output directory of another configuration raise ``ConfigError`` before anything is written.
    Ray: uses the running session, else ``ray.init(address=ray_address)`` (``RAY_ADDRESS``, or a
    new local cluster). The returned dict's ``counts`` has ``ok``/``error``/``total``.
    """
    # Ray Data warns when a stage's concurrency cap exceeds its inputs (small corpora): harmless
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    cfg = ScoreConfig(input, output, model, weights, **options).checked()
    prep = prepare(cfg)
    _say(prep, f"scoring {cfg.input} into {cfg.output} with {cfg.model} (T={cfg.temperature:g}, ε={cfg.epsilon:g})")
    ray_info = start_ray(prep)  # cluster and scoring actors checked before the first write
    prep.lock.acquire()  # one writer at a time, released however this call ends
    try:
        try:
            stats = run_attempt(prep, ray_info)
        except ConfigError:
            _discard(prep)
            raise
        return finish(prep, stats)
    finally:
        prep.lock.release()
        if prep.fresh and prep.existing is None and prep.out.exists():
            _remove_if_empty(prep.out)


def _remove_if_empty(out: Store) -> None:
    """A fresh output directory that ended with no run in it (configuration error) is removed again."""
    if not out.listdir():
        out.fs.delete_dir(out.path)


# --------------------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser) -> None:
    from jobs import options

    options.add_config_option(parser)
    parser.add_argument("--input", help="directory (recursive) or .parquet/.csv manifest; local, s3://, gs://, file://")
    parser.add_argument("--output", help="output directory (local or object store) for this model and settings; "
                                         "rerun the same command to resume or to score what is new")
    options.add_model_options(parser)
    options.add_odin_options(parser)
    options.add_detector_options(parser)
    options.add_methods_option(parser)
    options.add_batch_size_option(parser)
    options.add_workers_option(parser)
    parser.add_argument("--run-id", default=None, help="id stored in every row (default: generated; kept on resume)")
    options.add_resize_option(parser)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per CPU actor")
    parser.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs reserved per read/decode task")
    options.add_scale_options(parser)
    parser.add_argument("--decode-device", choices=DECODE_DEVICES, default="cpu",
                        help="where JPEGs are decoded: CPU tasks, or the scoring GPU (nvJPEG, in batches)")
    options.add_ray_options(parser)
    options.add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    result = score_corpus(
        args.input, args.output, args.model, args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
        temperature=args.temperature, epsilon=args.epsilon, tuning=args.tuning, batch_size=args.batch_size,
        workers=args.workers, run_id=args.run_id, resize=args.resize, cpus_per_worker=args.cpus_per_worker,
        decode_cpus=args.decode_cpus, shard_rows=args.shard_rows, unsafe_pickle=args.unsafe_pickle,
        ray_address=args.ray_address, verbose=args.verbose or not args.quiet, ray_verbose=args.verbose,
        decode_device=args.decode_device,
        object_store_mib=args.object_store_mib, fit=args.fit, head=args.head, methods=args.methods,
        table_format=args.table_format,
    )
    return 0 if result["verification"]["exactly_once"] else 1


if __name__ == "__main__":
    from jobs.options import run_main

    sys.exit(run_main(build_parser, run, prog="python -m jobs.score", section="score"))
