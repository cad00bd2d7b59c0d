"""The score table on an open table format: Apache Iceberg (pyiceberg) vs Delta Lake (delta-rs), measured.

    python -m benchmarks.table_formats [--rows 1000000] [--kill-rows 100000] [--kill-trials 6]
                                       [--s3-rows 20000] [--no-s3] [--work /tmp/odin-tables] [--json out.json]

Issue 23, step 1 ("decide with measurements"). Needs the ``tables`` extra (``pip install -e '.[tables]'``).
One workload, three layouts, the rows of the real score schema (``odin_engine.io.scores.output_schema``,
synthesized):

* **today** — one Parquet file per hash bucket of ``--shard-rows`` rows (``jobs.shards``' bucket hash
  and atomic writer); a night rewrites every bucket whose rows changed, as ``commit_partition`` does;
* **iceberg** — pyiceberg 0.12, ``SqlCatalog`` on SQLite (embedded, no server); a night is one
  ``overwrite(rows, overwrite_filter=In(image_id, new ∪ changed ∪ gone))`` (and, as
  ``iceberg-upsert``, ``delete(In(image_id, gone))`` + ``upsert(join_cols=[image_id])`` in one
  transaction);
* **delta** — deltalake (delta-rs) 1.x; a night is one ``merge`` (delete gone, update changed,
  insert new).

Measured: (1) bytes written by a night of +1 % new images (append) and by a mixed night
(+1 % new, −0.1 % gone, 0.1 % changed) against the table's bytes, the three layouts side by side;
(2) after 8 more nights of +1 % new images, full-scan and lookup times with DuckDB and pyarrow over
each layout's current files, as ratios to the same rows in one Parquet file, before and after
(3) compaction; which readers open each table offline (pandas, pyarrow, DuckDB, Polars if installed),
and what a plain Parquet glob of the table's directory reads;
(4) SIGKILL of a writer process mid-night at spread-out instants (and, for Iceberg, inside the
catalog's commit transaction): readers see the previous or the next snapshot whole, a rerun gives
one row per image; (5) two writer processes committing at once; (6) time travel by version and by
timestamp; (7) the commit, kill and two-writer checks again on a moto S3 server on loopback.
``tests/test_table_formats.py`` runs the same functions at 2,000 rows and asserts the behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
TABLE = "odin.scores"
GONE = "_gone"  # the merge source's marker column: this image left the corpus


def have_tables_extra() -> str | None:
    """None when pyiceberg, deltalake and sqlalchemy import; else what is missing."""
    missing = []
    for mod in ("pyiceberg", "deltalake", "sqlalchemy"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return None if not missing else f"{', '.join(missing)} not installed (pip install -e '.[tables]')"


# =========================================================================== rows
def schema() -> pa.Schema:
    from odin_engine.io.scores import output_schema

    return output_schema()


def make_rows(n: int, seed: int = 0, prefix: str = "corpus", run_id: str = "night-0") -> pa.Table:
    """``n`` synthetic rows of the score schema: ids ``<prefix>/<ddd>/img_<i>.jpg``, 1 % error rows."""
    from odin_engine.io.scores import FLOAT_COLUMNS

    rng = np.random.default_rng(seed)
    sch = schema()
    ids = pa.array([f"{prefix}/{i % 997:03d}/img_{i:09d}.jpg" for i in range(n)], pa.string())
    err = rng.random(n) < 0.01
    ok = pa.array(~err)
    cols: dict[str, Any] = {
        "image_id": ids,
        "uri": pc.binary_join_element_wise("s3://corpus-bucket/", ids, ""),
        "status": pa.array(np.where(err, "error", "ok"), pa.string()),
        "error": pc.if_else(ok, pa.scalar(None, pa.string()), pa.scalar("not an image", pa.string())),
        "width": pc.if_else(ok, pa.array(rng.integers(16, 4096, n).astype(np.int32)), pa.scalar(None, pa.int32())),
        "height": pc.if_else(ok, pa.array(rng.integers(16, 4096, n).astype(np.int32)), pa.scalar(None, pa.int32())),
        "pred": pc.if_else(ok, pa.array(rng.integers(0, 1000, n)), pa.scalar(None, pa.int64())),
    }
    for m in FLOAT_COLUMNS:
        cols[m] = pc.if_else(ok, pa.array(rng.random(n)), pa.scalar(None, pa.float64()))
    stamp = int(datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp() * 1e6)
    cols.update(
        temperature=pa.array(np.full(n, 1000.0)), epsilon=pa.array(np.full(n, 0.0014)),
        model_id=pa.array(["cifar_resnet20@sha256:12fca82f0000beef"] * n, pa.string()),
        run_id=pa.array([run_id] * n, pa.string()),
        scored_at=pa.array(stamp + rng.integers(0, 86_400_000_000, n), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        version=pa.array([f"{s}:{t}" for s, t in zip(rng.integers(1000, 10**6, n), rng.integers(1, 10**18, n))],
                         pa.string()),
    )
    return pa.table([cols[f.name] for f in sch], schema=sch)


@dataclass
class Night:
    """One nightly delta: ``upsert`` = new + changed rows, ``gone`` = the departed rows, ``after`` = the expected table."""

    upsert: pa.Table
    gone: pa.Table
    after: pa.Table
    counts: dict[str, int] = field(default_factory=dict)

    def merge_source(self) -> pa.Table:
        """Upsert rows (``_gone`` false) and the departed rows (``_gone`` true), one table."""
        up = self.upsert.append_column(GONE, pa.array(np.zeros(self.upsert.num_rows, bool)))
        gone = self.gone.append_column(GONE, pa.array(np.ones(self.gone.num_rows, bool)))
        return pa.concat_tables([up, gone])

    @staticmethod
    def from_source(src: pa.Table) -> "Night":
        mask = src.column(GONE)
        return Night(src.filter(pc.invert(mask)).drop_columns([GONE]), src.filter(mask).drop_columns([GONE]),
                     src.schema.empty_table().drop_columns([GONE]))


def make_night(before: pa.Table, seed: int, new: float = 0.01, gone: float = 0.001,
               changed: float = 0.001) -> Night:
    """+``new`` new images, −``gone`` departed, ``changed`` rescored (new version and scores)."""
    rng = np.random.default_rng(1000 + seed)
    n = before.num_rows
    n_new, n_gone, n_changed = round(n * new), round(n * gone), round(n * changed)
    pick = rng.choice(n, n_gone + n_changed, replace=False)
    gone_rows = before.take(pa.array(pick[:n_gone]))
    old = before.take(pa.array(pick[n_gone:]))
    fresh = make_rows(n_changed, seed=2000 + seed, run_id=f"night-{seed}")
    keep = ("image_id", "uri")
    changed_rows = pa.table([old.column(c) if c in keep else fresh.column(c) for c in before.column_names],
                            schema=before.schema)
    new_rows = make_rows(n_new, seed=3000 + seed, prefix=f"night{seed:03d}-{uuid.uuid4().hex[:6]}",
                         run_id=f"night-{seed}")
    upsert = pa.concat_tables([changed_rows, new_rows])
    drop = pc.is_in(before.column("image_id"), value_set=pa.concat_arrays(
        [gone_rows.column("image_id").combine_chunks(), old.column("image_id").combine_chunks()]))
    after = pa.concat_tables([before.filter(pc.invert(drop)), upsert])
    return Night(upsert, gone_rows, after, {"new": n_new, "gone": n_gone, "changed": n_changed})


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    """The same images with the same version, scores and run (order ignored)."""
    cols = ["image_id", "version", "odin", "run_id"]
    if a.num_rows != b.num_rows:
        return False
    a, b = a.select(cols).sort_by("image_id"), b.select(cols).sort_by("image_id")
    return all(a.column(c).equals(b.column(c)) for c in cols)


def unique_ids(t: pa.Table) -> bool:
    return len(pc.unique(t.column("image_id"))) == t.num_rows


# =========================================================================== file accounting
def snapshot_files(root: str, s3: "S3 | None" = None) -> dict[str, tuple]:
    """``{path: (size, identity)}`` of every file under ``root`` (local dir or ``s3://bucket/prefix``)."""
    if root.startswith("s3://"):
        bucket, _, prefix = root[5:].partition("/")
        out = {}
        for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[f"s3://{bucket}/{o['Key']}"] = (o["Size"], o["ETag"], o["LastModified"])
        return out
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p)
            except FileNotFoundError:  # a writer's temporary file renamed between the listing and the stat
                continue
            out[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def written_bytes(before: dict, after: dict) -> tuple[int, int]:
    """(bytes, files) new or replaced between two :func:`snapshot_files`."""
    changed = [k for k, v in after.items() if before.get(k) != v]
    return sum(after[k][0] for k in changed), len(changed)


# =========================================================================== layouts
class Layout:
    """What the benchmark needs of a layout."""

    name = "?"

    def create(self, table: pa.Table) -> None: ...
    def append(self, rows: pa.Table) -> None: ...
    def apply(self, night: Night) -> None: ...
    def read(self) -> pa.Table: ...
    def data_files(self) -> list[tuple[str, int]]: ...  # the current snapshot's data files and sizes
    def reload(self) -> None: ...

    def data_bytes(self) -> int:
        return sum(s for _, s in self.data_files())


class Today(Layout):
    """Today's layout: ``scores/part-<bucket>.parquet``, one file per hash bucket of about ``shard_rows`` rows."""

    name = "today"

    def __init__(self, root: str, shard_rows: int = 1024):
        self.root = root
        self.shard_rows = shard_rows
        self.n_buckets = 0

    def _bucket_of(self, t: pa.Table) -> np.ndarray:
        from jobs.shards import Buckets, id_hash

        return Buckets(self.n_buckets).of(id_hash(t.column("image_id").to_pylist()))

    def _write(self, b: int, rows: pa.Table) -> None:
        from jobs.shards import bucket_file, write_parquet_atomic
        from pyarrow import fs as pafs

        write_parquet_atomic(pafs.LocalFileSystem(), os.path.join(self.root, bucket_file(b)), rows.sort_by("image_id"))

    def create(self, table: pa.Table) -> None:
        os.makedirs(self.root, exist_ok=True)
        self.n_buckets = max(1, math.ceil(table.num_rows / self.shard_rows))
        self._by_bucket(table, {})

    def _by_bucket(self, upsert: pa.Table, gone: dict[int, set]) -> None:
        """Rewrite every bucket that gets a row or loses one (commit_partition writes a bucket only if it differs)."""
        from jobs.shards import bucket_file

        b = self._bucket_of(upsert) if upsert.num_rows else np.zeros(0, np.int64)
        order = np.argsort(b, kind="stable")
        b_sorted = b[order]
        upsert = upsert.take(pa.array(order))
        touched = sorted(set(np.unique(b_sorted).tolist()) | set(gone))
        for bk in touched:
            lo, hi = np.searchsorted(b_sorted, [bk, bk + 1])
            new = upsert.slice(lo, hi - lo)
            path = os.path.join(self.root, bucket_file(bk))
            parts = []
            if os.path.exists(path):
                old = pq.read_table(path, schema=new.schema)
                drop = set(new.column("image_id").to_pylist()) | gone.get(bk, set())
                if drop:
                    old = old.filter(pc.invert(pc.is_in(old.column("image_id"), value_set=pa.array(list(drop), pa.string()))))
                parts.append(old)
            parts.append(new)
            rows = pa.concat_tables(parts)
            if rows.num_rows:
                self._write(bk, rows)
            elif os.path.exists(path):
                os.unlink(path)

    def append(self, rows: pa.Table) -> None:
        self._by_bucket(rows, {})

    def apply(self, night: Night) -> None:
        gone: dict[int, set] = {}
        if night.gone.num_rows:
            for bk, i in zip(self._bucket_of(night.gone), night.gone.column("image_id").to_pylist()):
                gone.setdefault(int(bk), set()).add(i)
        self._by_bucket(night.upsert, gone)

    def data_files(self) -> list[tuple[str, int]]:
        return sorted((str(p), p.stat().st_size) for p in Path(self.root).glob("part-*.parquet"))

    def read(self) -> pa.Table:
        return pads.dataset([p for p, _ in self.data_files()], format="parquet").to_table()

    def reload(self) -> None:
        pass


@dataclass
class S3:
    """A moto S3 server on loopback."""

    endpoint: str
    proc: Any = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    @classmethod
    def start(cls) -> "S3":
        exe = shutil.which("moto_server", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        if exe is None:
            raise RuntimeError("no moto_server (pip install 'moto[server]')")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return cls(f"http://127.0.0.1:{port}", proc)
            time.sleep(0.1)
        proc.kill()
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


class Iceberg(Layout):
    """Apache Iceberg through pyiceberg: ``SqlCatalog`` on a SQLite file, table in ``<root>/warehouse``."""

    name = "iceberg"

    def __init__(self, root: str, catalog_db: str, endpoint: str | None = None, night_op: str = "overwrite"):
        self.root, self.catalog_db, self.endpoint, self.night_op = root, catalog_db, endpoint, night_op
        self._tbl = None
        if night_op != "overwrite":
            self.name = f"iceberg-{night_op}"

    def spec(self) -> dict:
        return {"kind": "iceberg", "root": self.root, "catalog_db": self.catalog_db, "endpoint": self.endpoint,
                "night_op": self.night_op}

    def catalog(self):
        from pyiceberg.catalog.sql import SqlCatalog

        props = {"uri": f"sqlite:///{self.catalog_db}", "warehouse": self.root if self.root.startswith("s3://")
                 else f"file://{self.root}"}
        if self.endpoint:
            props.update({"s3.endpoint": self.endpoint, "s3.access-key-id": "testing",
                          "s3.secret-access-key": "testing", "s3.region": "us-east-1"})
        return SqlCatalog("odin", **props)

    @property
    def tbl(self):
        if self._tbl is None:
            self._tbl = self.catalog().load_table(TABLE)
        return self._tbl

    def reload(self) -> None:
        self._tbl = None

    def create(self, table: pa.Table) -> None:
        if not self.root.startswith("s3://"):
            os.makedirs(self.root, exist_ok=True)
        os.makedirs(os.path.dirname(self.catalog_db), exist_ok=True)
        cat = self.catalog()
        cat.create_namespace_if_not_exists("odin")
        self._tbl = cat.create_table(TABLE, schema=table.schema)
        self._tbl.append(table)

    def append(self, rows: pa.Table) -> None:
        self.tbl.append(rows)
        self.reload()

    def apply(self, night: Night) -> None:
        """One snapshot commit. ``overwrite`` (default): ``overwrite(upsert rows, overwrite_filter=In(image_id,
        new ∪ changed ∪ gone))`` — one copy-on-write pass; ``upsert``: ``delete(In(gone))`` then
        ``upsert(join_cols=[image_id])`` in one transaction — two passes over the touched files."""
        from pyiceberg.expressions import In

        if self.night_op == "overwrite":
            ids = night.upsert.column("image_id").to_pylist() + night.gone.column("image_id").to_pylist()
            self.tbl.overwrite(night.upsert, overwrite_filter=In("image_id", ids))
        else:
            with self.tbl.transaction() as tx:
                if night.gone.num_rows:
                    tx.delete(In("image_id", night.gone.column("image_id").to_pylist()))
                if night.upsert.num_rows:
                    tx.upsert(night.upsert, join_cols=["image_id"])
        self.reload()

    def read(self) -> pa.Table:
        return self.tbl.scan().to_arrow()

    def version(self) -> int:
        return self.tbl.current_snapshot().snapshot_id

    def history_len(self) -> int:
        """Snapshots in the table's history (one commit can add several: overwrite = delete + append)."""
        return len(self.tbl.snapshots())

    def read_version(self, v: int) -> pa.Table:
        return self.tbl.scan(snapshot_id=v).to_arrow()

    def read_as_of(self, when: datetime) -> pa.Table:
        snap = self.tbl.snapshot_as_of_timestamp(int(when.timestamp() * 1000))
        return self.tbl.scan(snapshot_id=snap.snapshot_id).to_arrow()

    def data_files(self) -> list[tuple[str, int]]:
        tasks = list(self.tbl.scan().plan_files())
        assert not any(t.delete_files for t in tasks), "merge-on-read delete files present"
        return [(t.file.file_path.removeprefix("file://"), t.file.file_size_in_bytes) for t in tasks]

    def compact(self) -> dict:
        """pyiceberg 0.12 has no rewrite_data_files: the only in-library way is a full overwrite."""
        t = self.read()
        self.tbl.overwrite(t)
        self.reload()
        return {"method": "overwrite(scan().to_arrow()) — whole table in memory"}


class Delta(Layout):
    """Delta Lake through deltalake (delta-rs)."""

    name = "delta"

    def __init__(self, root: str, endpoint: str | None = None):
        self.root, self.endpoint = root, endpoint
        self._dt = None

    def spec(self) -> dict:
        return {"kind": "delta", "root": self.root, "endpoint": self.endpoint}

    @property
    def opts(self) -> dict | None:
        if not self.endpoint:
            return None
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    @property
    def dt(self):
        from deltalake import DeltaTable

        if self._dt is None:
            self._dt = DeltaTable(self.root, storage_options=self.opts)
        return self._dt

    def reload(self) -> None:
        self._dt = None

    def create(self, table: pa.Table) -> None:
        from deltalake import write_deltalake

        write_deltalake(self.root, table, mode="error", storage_options=self.opts)

    def append(self, rows: pa.Table) -> None:
        from deltalake import write_deltalake

        write_deltalake(self.root, rows, mode="append", storage_options=self.opts)
        self.reload()

    def apply(self, night: Night) -> None:
        """One commit: a merge that deletes the departed rows, updates changed ones and inserts new ones."""
        cols = night.upsert.column_names
        (self.dt.merge(night.merge_source(), predicate="t.image_id = s.image_id", source_alias="s", target_alias="t")
         .when_matched_delete(predicate=f"s.{GONE}")
         .when_matched_update(updates={c: f"s.{c}" for c in cols}, predicate=f"NOT s.{GONE}")
         .when_not_matched_insert(updates={c: f"s.{c}" for c in cols}, predicate=f"NOT s.{GONE}")
         .execute())
        self.reload()

    def read(self) -> pa.Table:
        return self.dt.to_pyarrow_table()

    def version(self) -> int:
        return self.dt.version()

    def history_len(self) -> int:
        return self.dt.version() + 1

    def read_version(self, v: int) -> pa.Table:
        from deltalake import DeltaTable

        return DeltaTable(self.root, version=v, storage_options=self.opts).to_pyarrow_table()

    def read_as_of(self, when: datetime) -> pa.Table:
        from deltalake import DeltaTable

        dt = DeltaTable(self.root, storage_options=self.opts)
        dt.load_as_version(when)
        return dt.to_pyarrow_table()

    def data_files(self) -> list[tuple[str, int]]:
        adds = pa.table(self.dt.get_add_actions(flatten=True))
        base = self.root.rstrip("/")
        return [(f"{base}/{p}", int(s)) for p, s in zip(adds.column("path").to_pylist(),
                                                         adds.column("size_bytes").to_pylist())]

    def compact(self, target_size: int = 128 << 20) -> dict:
        out = self.dt.optimize.compact(target_size=target_size)
        self.reload()
        return {"method": f"optimize.compact(target_size={target_size >> 20} MiB)", "files_added": out.get("numFilesAdded"),
                "files_removed": out.get("numFilesRemoved")}


def open_layout(spec: dict) -> Layout:
    if spec["kind"] == "iceberg":
        return Iceberg(spec["root"], spec["catalog_db"], spec.get("endpoint"), spec.get("night_op", "overwrite"))
    return Delta(spec["root"], spec.get("endpoint"))


# =========================================================================== measurements
def measure_night(lay: Layout, op: str, rows: "pa.Table | Night", s3: S3 | None = None) -> dict:
    """Bytes written by one night vs the table's bytes: ``op`` "append" (``rows``: the new images only)
    or "apply" (``rows``: a mixed :class:`Night`, one commit). ``written`` counts every file created or
    replaced (data, manifests, logs); ``written_data`` only the data files of the new snapshot."""
    root = lay.root
    table_bytes = lay.data_bytes()
    commits = lay.history_len() if hasattr(lay, "history_len") else None
    before = snapshot_files(root, s3)
    t0 = time.perf_counter()
    lay.append(rows) if op == "append" else lay.apply(rows)
    secs = time.perf_counter() - t0
    lay.reload()
    after = snapshot_files(root, s3)
    wrote, files = written_bytes(before, after)
    data_files = {p for p, _ in lay.data_files()}
    data_wrote = sum(after[p][0] for p in after if before.get(p) != after[p] and p in data_files)
    return {"layout": lay.name, "op": op, "table_bytes": table_bytes, "written_bytes": wrote,
            "written_data_bytes": data_wrote, "files_written": files, "ratio": wrote / table_bytes,
            "data_files_after": len(data_files), "seconds": secs,
            "snapshots_added": lay.history_len() - commits if commits is not None else None}


def _best(fn, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def scan_times(files: list[str], ref: str, probe: str, repeat: int = 5) -> dict:
    """DuckDB group-by and lookup, pyarrow full read: ``files`` vs the one compacted file ``ref``.

    Best of ``repeat``, the two sides interleaved (a load change on a shared machine hits both)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads TO 2")

    def q(paths, sql, *args):
        return lambda: con.execute(sql.format(src="read_parquet($paths)"), {"paths": paths, **dict(args)}).fetchall()

    out: dict[str, Any] = {"table": {}, "one_file": {}}
    for _ in range(repeat):
        for label, paths in (("table", files), ("one_file", [ref])):
            for k, fn in (("duckdb_groupby", q(paths, "SELECT status, count(*) FROM {src} GROUP BY status")),
                          ("duckdb_lookup", q(paths, "SELECT * FROM {src} WHERE image_id = $id", ("id", probe))),
                          ("pyarrow_read", lambda: pads.dataset(paths, format="parquet").to_table())):
                out[label][k] = min(out[label].get(k, math.inf), _best(fn, 1))
    out["ratio"] = {k: out["table"][k] / out["one_file"][k] for k in out["table"]}
    out["files"] = len(files)
    return out


# ---------------------------------------------------------------- child processes (kill, two writers)
def _child(argv: list[str]) -> int:
    """``--child SPEC_JSON NIGHT_PARQUET MODE``: load the layout, print READY, then commit the night.

    MODE ``plain``: commit, print DONE <seconds>. ``sqlkill``: SIGKILL itself inside the catalog's
    commit transaction (Iceberg). ``race:<barrier>``: wait for the barrier file, commit, on failure
    report it, reload and commit once more; prints one JSON line."""
    spec, night_path, mode = json.loads(argv[0]), argv[1], argv[2]
    lay = open_layout(spec)
    night = Night.from_source(pq.read_table(night_path))
    lay.reload()
    _ = lay.version()  # the table as it is now: the base of this writer's commit
    if mode == "sqlkill":
        from sqlalchemy import event

        cat = lay.catalog()
        lay._tbl = cat.load_table(TABLE)

        @event.listens_for(cat.engine, "after_cursor_execute")
        def _kill(conn, cursor, statement, *a):  # the UPDATE ran inside the transaction, not yet committed
            if statement.lstrip().upper().startswith("UPDATE"):
                os.kill(os.getpid(), signal.SIGKILL)
    print("READY", flush=True)
    if mode.startswith("race:"):
        barrier = mode[5:]
        while not os.path.exists(barrier):
            time.sleep(0.005)
        res: dict[str, Any] = {}
        try:
            lay.apply(night)
            res["first"] = "committed"
        except Exception as exc:  # noqa: BLE001 — what a losing writer gets is the measurement
            res["first"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            lay.reload()
            try:
                lay.apply(night)
                res["retry"] = "committed"
            except Exception as exc2:  # noqa: BLE001
                res["retry"] = f"{type(exc2).__name__}: {str(exc2)[:200]}"
        print(json.dumps(res), flush=True)
        return 0
    t0 = time.perf_counter()
    lay.apply(night)
    print(f"DONE {time.perf_counter() - t0:.4f}", flush=True)
    return 0


def _spawn(spec: dict, night: Night, work: Path, mode: str, env: dict | None = None) -> subprocess.Popen:
    path = work / f"night-{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(night.merge_source(), path)
    return subprocess.Popen([sys.executable, "-m", "benchmarks.table_formats", "--child", json.dumps(spec), str(path),
                             mode], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_line(proc: subprocess.Popen, want: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child ended without {want!r}: {proc.stderr.read()[-2000:]}")
        if line.startswith(want):
            return line.strip()
    raise RuntimeError(f"child did not print {want!r} in {timeout} s")


def state_of(lay: Layout, before: pa.Table, after: pa.Table) -> str:
    """"before" / "after" when the reader sees one of the two snapshots whole, else "PARTIAL"."""
    lay.reload()
    now = lay.read()
    if same_rows(now, before):
        return "before"
    if same_rows(now, after):
        return "after"
    return "PARTIAL"


def kill_trials(lay: Layout, current: pa.Table, work: Path, trials: int, s3: S3 | None = None,
                sqlkill: bool = False) -> tuple[list[dict], pa.Table]:
    """SIGKILL a writer process at spread-out instants of its commit; check what readers see, then rerun.

    A first night runs unkilled and gives ``D``, the time from the writer's READY (everything loaded,
    nothing written) to its exit. Then: with ``sqlkill`` (Iceberg), a writer that SIGKILLs itself
    inside the catalog's commit transaction (the UPDATE ran, the COMMIT did not); a writer killed as
    soon as its first new file appears under the table (its data is being written, nothing committed);
    and writers killed ``k/trials · 1.2 D`` after READY, k = 1…trials. Each trial: the table must be the
    previous snapshot or the next one, whole; then the same night is committed again in this process,
    after which the table must be exactly the expected rows, one per image. Returns the trial records
    and the table's rows at the end."""
    spec, env = lay.spec(), (s3.env if s3 else None)
    night = make_night(current, seed=100)
    p = _spawn(spec, night, work, "plain", env)
    _wait_line(p, "READY")
    t0 = time.perf_counter()
    p.wait()
    dur = time.perf_counter() - t0
    lay.reload()
    assert same_rows(lay.read(), night.after)
    current = night.after
    out = []
    plan = [("sqlkill", None)] if sqlkill else []
    plan += [("firstfile", None)] + [("plain", k / trials * 1.2 * dur) for k in range(1, trials + 1)]
    for i, (mode, delay) in enumerate(plan):
        night = make_night(current, seed=101 + i)
        files_before = snapshot_files(lay.root, s3)
        v_before = lay.version()
        p = _spawn(spec, night, work, "plain" if mode == "firstfile" else mode, env)
        _wait_line(p, "READY")
        t0 = time.perf_counter()
        if mode == "firstfile":
            while p.poll() is None and snapshot_files(lay.root, s3).keys() <= files_before.keys():
                time.sleep(0.001)
            p.send_signal(signal.SIGKILL)
            delay = time.perf_counter() - t0
        elif delay is not None:
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
        rc = p.wait()
        seen = state_of(lay, current, night.after)
        lay.reload()
        new_files = written_bytes(files_before, snapshot_files(lay.root, s3))[1]
        rec = {"mode": mode, "delay_s": delay, "killed": rc == -signal.SIGKILL, "reader_saw": seen,
               "files_left_by_killed_writer": new_files if seen == "before" else None,
               "version_moved": lay.version() != v_before}
        # the rerun: the same night again (an upsert by image_id and a delete of departed ids are idempotent)
        lay.apply(night)
        lay.reload()
        final = lay.read()
        rec["rerun_exact"] = same_rows(final, night.after)
        rec["rerun_unique"] = unique_ids(final)
        out.append(rec)
        current = night.after
    return out, current


def two_writers(lay: Layout, current: pa.Table, work: Path, s3: S3 | None = None) -> tuple[dict, pa.Table]:
    """Two writer processes load the same snapshot, then commit overlapping nights at once (a barrier
    file). Each reports its first attempt; a loser reloads and commits again. Returns the outcome and the
    table's rows at the end (checked against applying the two nights in the winners' order)."""
    a = make_night(current, seed=201)
    # night B changes the same rows as A (a write-write conflict) plus its own new images
    b_fresh = make_night(current, seed=202)
    a_changed = a.upsert.slice(0, a.counts["changed"])
    keep = ("image_id", "uri")
    b_changed = pa.table([a_changed.column(c) if c in keep else b_fresh.upsert.slice(0, a.counts["changed"]).column(c)
                          for c in current.column_names], schema=current.schema)
    b_upsert = pa.concat_tables([b_changed, b_fresh.upsert.slice(b_fresh.counts["changed"])])
    b = Night(b_upsert, current.slice(0, 0), current.slice(0, 0), dict(b_fresh.counts))
    barrier, env = work / f"go-{uuid.uuid4().hex[:6]}", (s3.env if s3 else None)
    procs = {name: _spawn(lay.spec(), n, work, f"race:{barrier}", env) for name, n in (("A", a), ("B", b))}
    for p in procs.values():
        _wait_line(p, "READY")
    barrier.touch()
    res = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        line = [ln for ln in out.splitlines() if ln.startswith("{")]
        res[name] = json.loads(line[-1]) if line else {"first": f"crashed rc={p.returncode}: {err[-500:]}"}
    lay.reload()
    final = lay.read()
    winners = [k for k, v in res.items() if v.get("first") == "committed"]

    def apply_rows(base: pa.Table, n: Night) -> pa.Table:
        drop = pc.is_in(base.column("image_id"), value_set=pa.concat_arrays(
            [n.upsert.column("image_id").combine_chunks(), n.gone.column("image_id").combine_chunks()]))
        return pa.concat_tables([base.filter(pc.invert(drop)), n.upsert])

    nights = {"A": a, "B": b}
    order = winners + [k for k in ("A", "B") if k not in winners and res[k].get("retry") == "committed"]
    expect = current
    for k in order:
        expect = apply_rows(expect, nights[k])
    res["both_first_attempts_committed"] = len(winners) == 2
    res["final_matches_commit_order"] = same_rows(final, expect)
    res["final_unique"] = unique_ids(final)
    return res, final


def time_travel(lay: Layout, current: pa.Table) -> dict:
    """Commit one more night; read the previous snapshot by version/snapshot id and by timestamp."""
    v0 = lay.version()
    time.sleep(1.1)
    mid = datetime.now(timezone.utc)
    time.sleep(1.1)
    night = make_night(current, seed=301)
    lay.apply(night)
    lay.reload()
    return {"by_version": same_rows(lay.read_version(v0), current),
            "by_timestamp": same_rows(lay.read_as_of(mid), current),
            "latest": same_rows(lay.read(), night.after)}, night.after


def readers(lay: Layout) -> dict:
    """Which readers open the table here, offline."""
    out: dict[str, Any] = {}
    files = [p for p, _ in lay.data_files()]
    if isinstance(lay, Delta):
        out["pandas"] = len(lay.dt.to_pandas(columns=["image_id"]))
        out["pyarrow_dataset"] = lay.dt.to_pyarrow_dataset().count_rows()
    elif isinstance(lay, Iceberg):
        out["pandas"] = len(lay.tbl.scan(selected_fields=("image_id",)).to_pandas())
        out["pyarrow_dataset"] = lay.tbl.scan(selected_fields=("image_id",)).to_arrow().num_rows
    import duckdb

    con = duckdb.connect()
    out["duckdb_read_parquet_current_files"] = con.execute(
        "SELECT count(*) FROM read_parquet($p)", {"p": files}).fetchone()[0]
    glob = f"{lay.root}/*.parquet" if isinstance(lay, Delta) else f"{lay.root}/**/*.parquet"
    out["duckdb_read_parquet_directory_glob"] = con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()[0]
    out["table_rows"] = lay.dt.count() if isinstance(lay, Delta) else out["pyarrow_dataset"]
    ext = "delta" if isinstance(lay, Delta) else "iceberg"
    try:
        con.execute(f"LOAD {ext}")
        out[f"duckdb_{ext}_extension"] = "loaded"
    except Exception as exc:  # noqa: BLE001
        out[f"duckdb_{ext}_extension"] = f"not available offline: {str(exc).splitlines()[0][:160]}"
    try:
        import polars as pl

        if isinstance(lay, Delta):
            out["polars"] = pl.scan_delta(lay.root, storage_options=lay.opts).select(pl.len()).collect().item()
        else:
            out["polars"] = pl.scan_iceberg(lay.tbl).select(pl.len()).collect().item()
    except ImportError:
        out["polars"] = "not installed here (not part of the tables extra)"
    except Exception as exc:  # noqa: BLE001 — what a reader does with the table is the measurement
        out["polars"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
    return out


# =========================================================================== the run
def local_run(rows: int, work: Path, kill_rows: int, kill_trials_n: int, shard_rows: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"rows": rows}
    t0 = time.perf_counter()
    base = make_rows(rows, seed=0)
    print(f"[rows] {rows:,} synthetic score rows ({len(base.schema)} columns) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    new_rows = make_rows(round(rows * 0.01), seed=1, prefix="added", run_id="night-1")
    night = make_night(pa.concat_tables([base, new_rows]), seed=2)
    ref = str(work / "one_file.parquet")
    layouts = {"today": Today(str(work / "today" / "scores"), shard_rows),
               "iceberg": Iceberg(str(work / "iceberg" / "warehouse"), str(work / "iceberg" / "catalog.db")),
               "iceberg-upsert": Iceberg(str(work / "iceberg-u" / "warehouse"), str(work / "iceberg-u" / "catalog.db"),
                                         night_op="upsert"),
               "delta": Delta(str(work / "delta" / "scores"))}
    nights: dict[str, list] = {}
    for name, lay in layouts.items():
        t0 = time.perf_counter()
        lay.create(base)
        lay.reload()
        create_s = time.perf_counter() - t0
        m_append = measure_night(lay, "append", new_rows)  # night 1: +1 % new images only
        m_apply = measure_night(lay, "apply", night)  # night 2: +1 % new, -0.1 % gone, 0.1 % changed
        lay.reload()
        got = lay.read()
        m_apply["exact"] = same_rows(got, night.after) and unique_ids(got)
        nights[name] = [dict(m_append, create_s=create_s), m_apply]
        print(f"[night] {name}: created {create_s:.1f} s; +1% new: {m_append['written_bytes'] / 2**20:.2f} MiB of "
              f"{m_append['table_bytes'] / 2**20:.2f} MiB ({m_append['ratio']:.1%}) in {m_append['seconds']:.1f} s; "
              f"mixed night: {m_apply['written_bytes'] / 2**20:.2f} MiB ({m_apply['ratio']:.1%}) in "
              f"{m_apply['seconds']:.1f} s, {m_apply['snapshots_added']} snapshot(s); exact {m_apply['exact']}", flush=True)
    res["nights"] = nights
    # eight more nights of +1 % new images: small appended files, then scans before/after compaction
    extra = [make_rows(round(rows * 0.01), seed=10 + i, prefix=f"extra{i}", run_id=f"night-{3 + i}") for i in range(8)]
    for name, lay in layouts.items():
        if name == "today":
            lay.append(pa.concat_tables(extra))  # the same 977-file layout whatever the number of nights
        elif name != "iceberg-upsert":
            for e in extra:
                lay.append(e)
    final = pa.concat_tables([night.after, *extra])
    pq.write_table(final, ref)
    res["ref_file_bytes"] = os.path.getsize(ref)
    probe = final.column("image_id")[final.num_rows // 2].as_py()
    scans: dict[str, Any] = {}
    for name, lay in layouts.items():
        if name == "iceberg-upsert":
            continue
        lay.reload()
        scans[name] = {"before_compaction": scan_times([p for p, _ in lay.data_files()], ref, probe)}
    for name in ("iceberg", "delta"):
        lay = layouts[name]
        before = snapshot_files(lay.root)
        t0 = time.perf_counter()
        info = lay.compact()
        info["seconds"] = time.perf_counter() - t0
        info["written_bytes"] = written_bytes(before, snapshot_files(lay.root))[0]
        lay.reload()
        info["files_before"] = scans[name]["before_compaction"]["files"]
        info["exact_after"] = same_rows(lay.read(), final)
        info["files_after"] = len(lay.data_files())
        scans[name]["compaction"] = info
        print(f"[compact] {name}: {info['method']}: {info['files_before']} → {info['files_after']} data files, wrote "
              f"{info['written_bytes'] / 2**20:.1f} MiB in {info['seconds']:.1f} s; exact {info['exact_after']}", flush=True)
        scans[name]["after_compaction"] = scan_times([p for p, _ in lay.data_files()], ref, probe)
    res["scans"] = scans
    for name, s in scans.items():
        for when in ("before_compaction", "after_compaction"):
            if when in s:
                r = s[when]["ratio"]
                print(f"[scan] {name} {when}: {s[when]['files']} files; ratio to one file: duckdb group-by "
                      f"{r['duckdb_groupby']:.2f}x, lookup {r['duckdb_lookup']:.2f}x, pyarrow read "
                      f"{r['pyarrow_read']:.2f}x", flush=True)
    res["readers"] = {name: readers(layouts[name]) for name in ("iceberg", "delta")}
    for name, r in res["readers"].items():
        print(f"[readers] {name}: {r}", flush=True)
    # kill, two writers, time travel: on a smaller table of their own
    res["kill"], res["two_writers"], res["time_travel"] = {}, {}, {}
    small = make_rows(kill_rows, seed=7)
    for cls in (Iceberg, Delta):
        name = cls.name
        d = work / f"{name}-k"
        lay = Iceberg(str(d / "warehouse"), str(d / "catalog.db")) if cls is Iceberg else Delta(str(d / "scores"))
        lay.create(small)
        lay.reload()
        trials, cur = kill_trials(lay, small, work, kill_trials_n, sqlkill=cls is Iceberg)
        res["kill"][name] = trials
        res["two_writers"][name], cur = two_writers(lay, cur, work)
        res["time_travel"][name], cur = time_travel(lay, cur)
        print(f"[kill] {name}: " + "; ".join(f"{t['mode']}@{t['delay_s'] or 0:.2f}s→{t['reader_saw']}"
                                             f"{'' if t['files_left_by_killed_writer'] is None else '+' + str(t['files_left_by_killed_writer']) + ' orphan files'}"
                                             f"{'' if t['rerun_exact'] else ' RERUN-BAD'}" for t in trials), flush=True)
        print(f"[writers] {name}: {res['two_writers'][name]}", flush=True)
        print(f"[time travel] {name}: {res['time_travel'][name]}", flush=True)
    return res


def s3_run(rows: int, work: Path, trials: int) -> dict:
    """Create, one mixed night, kill trials and two writers with the tables in moto S3 (catalog DB local)."""
    s3 = S3.start()
    out: dict[str, Any] = {"rows": rows}
    try:
        s3.client().create_bucket(Bucket="odin-tables")
        base = make_rows(rows, seed=11)
        for cls in (Iceberg, Delta):
            name = cls.name
            lay = (Iceberg("s3://odin-tables/iceberg", str(work / "s3-iceberg" / "catalog.db"), s3.endpoint)
                   if cls is Iceberg else Delta("s3://odin-tables/delta/scores", s3.endpoint))
            t0 = time.perf_counter()
            lay.create(base)
            lay.reload()
            night = make_night(base, seed=12)
            m = measure_night(lay, "apply", night, s3)
            lay.reload()
            m["exact"] = same_rows(lay.read(), night.after)
            m["create_s"] = time.perf_counter() - t0 - m["seconds"]
            res = {"night": m}
            res["kill"], cur = kill_trials(lay, night.after, work, trials, s3=s3, sqlkill=cls is Iceberg)
            res["two_writers"], cur = two_writers(lay, cur, work, s3=s3)
            out[name] = res
            print(f"[s3] {name}: mixed night wrote {m['ratio']:.1%} of the table, exact {m['exact']}; kill: "
                  + "; ".join(f"{t['mode']}→{t['reader_saw']}{'' if t['rerun_exact'] else ' RERUN-BAD'}"
                              for t in res["kill"]) + f"; writers: {res['two_writers']}", flush=True)
    finally:
        s3.stop()
    return out


def ray_sinks() -> dict:
    """Whether the installed Ray Data has Iceberg/Delta sinks (read from its source, no Ray started)."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None:
        return {"ray": "not installed"}
    src = (Path(spec.origin).parent / "data" / "dataset.py").read_text()
    import ray

    return {"ray": ray.__version__, "write_iceberg": "def write_iceberg(" in src, "write_delta": "def write_delta(" in src,
            "write_iceberg_upsert": "SaveMode.UPSERT" in src,
            "write_delta_modes": "APPEND, OVERWRITE (prototype)" if "This is a prototype that supports ``APPEND`` and "
                                                                    "``OVERWRITE``" in src else "see source"}


def versions() -> dict:
    import duckdb
    import deltalake
    import pyiceberg

    return {"pyiceberg": pyiceberg.__version__, "deltalake": deltalake.__version__, "pyarrow": pa.__version__,
            "duckdb": duckdb.__version__}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the main table (default 10⁶)")
    ap.add_argument("--shard-rows", type=int, default=1024, help="today's rows per bucket file (the job's default)")
    ap.add_argument("--kill-rows", type=int, default=100_000, help="rows of the kill / two-writer / time-travel table")
    ap.add_argument("--kill-trials", type=int, default=6, help="SIGKILL instants spread over one commit")
    ap.add_argument("--s3-rows", type=int, default=20_000, help="rows of the table on moto S3")
    ap.add_argument("--s3-trials", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--work", default="/tmp/odin-tables")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args(argv)
    missing = have_tables_extra()
    if missing:
        print(f"table_formats: {missing}", file=sys.stderr)
        return 2
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"versions": versions(), "ray_sinks": ray_sinks(),
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(f"[versions] {res['versions']}; ray sinks: {res['ray_sinks']}", flush=True)
    res["local"] = local_run(args.rows, work / "local", args.kill_rows, args.kill_trials, args.shard_rows)
    if not args.no_s3:
        res["s3"] = s3_run(args.s3_rows, work / "s3", args.s3_trials)
    res["seconds"] = time.perf_counter() - t0
    print(f"[done] {res['seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
