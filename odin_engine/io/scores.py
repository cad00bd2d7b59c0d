"""The score table: its schema, its streaming reader, and the checks on the settings it was scored with.

One row per image (``image_id``, ``uri``, ``status``/``error``, size, ``pred``, one float column
per score method of :data:`odin_engine.methods.TABLE_METHODS`, provenance; ``label``/``split``
carried from a manifest). **Any Parquet dataset in this schema is a valid input** to the decision
stage: the score job's ``<output>/scores/``, a DuckDB- or Spark-compacted copy, a filtered
subset, one file or a tree of folders, local or ``s3://``/``gs://``/``file://``. Files and folders
whose names start with ``_`` or ``.`` are not part of it (the score job keeps its own state there;
Spark its ``_SUCCESS``/``.crc`` files). A **Delta Lake table** (a folder with ``_delta_log/``) is
read as its current version — the files its log names, never a glob of the folder, which still
holds replaced files until vacuumed — through delta-rs (deltalake); ``ScoreTable.open(…, as_of=…)`` reads an earlier version.

:class:`ScoreTable` reads it as a ``pyarrow.dataset``: only the columns asked for, with a filter
pushed into the scan, in bounded batches — memory does not grow with the table. Settings checks:
one ``(model_id, temperature, epsilon)`` per table (:meth:`ScoreTable.settings`), and every
``image_id`` at most once (:meth:`ScoreTable.check_unique_ids`, exact, in bounded memory).
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from odin_engine.errors import ConfigError
from odin_engine.io.delta import is_delta_table
from odin_engine.methods import TABLE_METHODS

SCHEMA_VERSION = 1
SCORE_METHODS: tuple[str, ...] = TABLE_METHODS
FLOAT_COLUMNS: tuple[str, ...] = TABLE_METHODS  # the float score columns, in schema order
SETTING_COLUMNS = ("model_id", "temperature", "epsilon")
FIT_ID_KEY = "odin.fit_id"  # Parquet key-value metadata: the --fit's digest ("" without one)
REQUIRED_COLUMNS = ("image_id", "status", *SETTING_COLUMNS)
SCORES_DIR = "scores"  # where the score job keeps its table under its --output
BATCH_ROWS = 65_536  # rows per scanned batch
UNIQUE_BUDGET = 1 << 22  # image_id hashes held at once by check_unique_ids (32 MiB)


def output_schema(carried: pa.Schema | None = None, metadata: dict | None = None) -> pa.Schema:
    """The ``scores/`` schema; ``carried`` holds the manifest's label/split fields."""
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # null when ok
        pa.field("width", pa.int32()),  # displayed size (after EXIF rotation); null if undecodable
        pa.field("height", pa.int32()),
        pa.field("pred", pa.int64()),  # argmax class of the clean input; null on error
        *(pa.field(m, pa.float64()) for m in TABLE_METHODS),  # higher = more in-distribution; null on error
        pa.field("temperature", pa.float64()),
        pa.field("epsilon", pa.float64()),
        pa.field("model_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC")),
        pa.field("version", pa.string()),  # the listed version of the bytes scored (size:mtime_ns, ETag, …)
    ]
    fields += list(carried or [])
    return pa.schema(fields, metadata=metadata)


def _canonical(found: pa.Schema) -> pa.Schema:
    """``found`` (the first file's schema) with the score schema's types for its columns, and
    all-null columns read as strings: each file is cast to it, so a file whose ``error`` or
    ``label`` column happens to be all null does not fix the type for the others."""
    canon = output_schema()
    fields = []
    for f in found:
        if f.name in canon.names:
            fields.append(canon.field(f.name))
        elif pa.types.is_null(f.type):
            fields.append(pa.field(f.name, pa.string()))
        else:
            fields.append(f)
    return pa.schema(fields, metadata=found.metadata)


OK = pc.field("status") == "ok"
NOT_OK = pc.field("status") != "ok"


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def list_parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """The Parquet files of a dataset folder (recursive), without ``_``/``.``-prefixed names."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    base = path.rstrip("/") + "/"
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                  and not _hidden(i.path[len(base):] if i.path.startswith(base) else posixpath.basename(i.path)))


def _delta_dataset(fs: pafs.FileSystem, path: str, source: str, what: str, as_of: Any = None) -> ds.FileSystemDataset:
    """The current snapshot (or the version ``as_of`` names: a version number, a run or audit id, a
    date — :func:`odin_engine.io.maintenance.resolve_version`) of the Delta table at ``path``: exactly
    the files its log names (a folder glob would also read the files that later commits replaced,
    until they are vacuumed), read through ``fs`` — the same filesystem and credentials as any other
    input — in the score schema's types (:func:`_canonical`), with the settings the score job stored
    in the table (``odin.*``, :func:`odin_engine.io.delta.settings_of`) as the schema's metadata."""
    from odin_engine.io.delta import DeltaLocation, settings_of
    from odin_engine.io.maintenance import open_delta_version

    loc = DeltaLocation(fs, path)
    table = loc.open(what=what)
    settings = settings_of(table)

    def schema(found: pa.Schema) -> pa.Schema:
        return _canonical(found.with_metadata({**(found.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in settings.items()}}))

    return open_delta_version(loc, as_of, schema=schema, what=what, table=table).dataset


def _named_in(column: str, expr: pc.Expression) -> bool:
    """Whether ``expr`` may refer to ``column`` (its name appears in the expression's text as a
    whole word): never a false no for the score table's plain names; a false yes (the name inside a
    string literal) only reads one more column."""
    return re.search(rf"(?<!\w){re.escape(column)}(?!\w)", str(expr)) is not None


@dataclass(frozen=True)
class ScoreTable:
    """A score dataset (optionally filtered). Open one with :meth:`open`."""

    source: str
    dataset: ds.Dataset = field(repr=False)
    filter: pc.Expression | None = field(default=None, repr=False)
    files: int = 0
    filter_after_cast: bool = False  # see :meth:`batches`; set for Delta tables

    # ---------------------------------------------------------------- open
    @classmethod
    def open(cls, source: str, what: str = "scores", as_of: Any = None) -> "ScoreTable":
        """``source``: a score job's ``--output`` (its ``scores/`` is used), a folder of Parquet files
        (nested folders fine), one Parquet file, or a Delta table (its current version, or the one
        ``as_of`` names: a version number, a run id, an ISO date or time); local or object store."""
        from odin_engine.io.store import resolve

        fs, path = resolve(str(source))
        try:
            info = fs.get_file_info(path)
            delta = info.type == pafs.FileType.Directory and is_delta_table(fs, path)
            if info.type == pafs.FileType.Directory and not delta and \
                    fs.get_file_info(posixpath.join(path, SCORES_DIR)).type == pafs.FileType.Directory:
                path = posixpath.join(path, SCORES_DIR)
                delta = is_delta_table(fs, path)
            if delta:  # its log names the files: never globbed (replaced files stay on disk until vacuumed)
                dataset = _delta_dataset(fs, path, str(source), what, as_of)
                return cls._checked(str(source), dataset, len(dataset.files), filter_after_cast=True)
            if as_of is not None:
                raise ConfigError(f"{source} is not a Delta table: it has one version, so as_of={as_of!r} "
                                  "cannot be read (only Delta tables keep their earlier versions)")
            if info.type == pafs.FileType.File:
                files = [path]
            elif info.type == pafs.FileType.Directory:
                files = list_parquet_files(fs, path)
            else:
                raise ConfigError(f"{what} not found: {source} (give a score job's --output, a Parquet dataset "
                                  "or a Delta table)")
            if not files:
                raise ConfigError(f"no Parquet files in {source} (give a score job's --output, a Parquet dataset "
                                  "or a Delta table)")
            first = ds.dataset(files[:1], filesystem=fs, format="parquet").schema
            dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=_canonical(first))
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(f"cannot read the {what} at {source}: {exc}") from exc
        return cls._checked(str(source), dataset, len(files))

    @classmethod
    def _checked(cls, source: str, dataset: ds.Dataset, files: int, filter_after_cast: bool = False) -> "ScoreTable":
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.schema.names]
        if missing:
            raise ConfigError(f"{source} is not a score table: columns {missing} are missing")
        return cls(source, dataset, None, files, filter_after_cast)

    @classmethod
    def from_table(cls, table: "pa.Table | Any", source: str = "<in memory>") -> "ScoreTable":
        """An in-memory table (a ``pyarrow.Table`` or a pandas DataFrame) in the score schema."""
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ConfigError(f"{source} is not a score table: columns {missing} are missing")
        return cls(source, ds.dataset(table), None, 0)

    def where(self, expr: pc.Expression) -> "ScoreTable":
        """The rows that also satisfy ``expr``."""
        return replace(self, filter=expr if self.filter is None else self.filter & expr)

    # ---------------------------------------------------------------- read
    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.schema.names)

    def fit_id(self) -> str | None:
        """The digest of the ``--fit`` the rows were scored with (Parquet key ``odin.fit_id``, read
        from the first file); ``None`` when scored without a fit or the metadata was not kept (a
        table rewritten by another tool)."""
        value = (self.dataset.schema.metadata or {}).get(FIT_ID_KEY.encode())
        return value.decode() if value else None

    def require(self, columns: Sequence[str], what: str = "scores") -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise ConfigError(f"the {what} ({self.source}) have no column(s) {missing}")

    def _filter(self, extra: pc.Expression | None) -> pc.Expression | None:
        if extra is None:
            return self.filter
        return extra if self.filter is None else self.filter & extra

    def batches(self, columns: Sequence[str] | None = None, where: pc.Expression | None = None,
                batch_size: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` (all when None) of the rows matching the filters.

        Read-ahead is kept small (one file, two batches) and decoding stays on this thread: the
        threaded scanner reads row groups ahead of a slower consumer (the flag writer, the id
        hashing) until hundreds of MB are in flight — peak memory then grew with the table
        (1.8× from 1 M to 8 M rows) — and on 2 cores it was not faster
        (``python -m benchmarks.decision_scale``). Parquet's ``pre_buffer`` is off: it fetches the
        projected column chunks of *every row group of a file* before the first batch, so the
        scan held a whole file's columns in pyarrow's pool — memory that grew with the rows per
        file, i.e. with the corpus for a table of a fixed number of files (docs/decision-stage.md).

        With ``filter_after_cast`` (Delta tables) the filter is applied after the scan has cast each
        file's columns to the table's types: delta-rs writes the files its DML rewrites with
        ``string_view`` columns, a scan filters a file's batches in the file's own types, and
        pyarrow (26) has no kernel comparing ``string_view`` with the filter's ``string`` values
        (``status == "ok"`` fails). The scan then also reads the filter's columns."""
        kw = dict(batch_readahead=2, fragment_readahead=1,
                  fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False)) \
            if isinstance(self.dataset, ds.FileSystemDataset) else {}
        names = list(columns) if columns is not None else None
        flt = self._filter(where)
        if self.filter_after_cast and flt is not None:
            # each cast batch filtered as it comes: a scanner over them would read ahead (memory)
            wanted = self.columns if names is None else names
            used = [c for c in self.columns if c in wanted or _named_in(c, flt)]
            cast = self.dataset.scanner(columns=used, batch_size=batch_size, use_threads=False, **kw)
            for batch in cast.to_batches():
                batch = batch.filter(flt).select(wanted)
                if batch.num_rows:
                    yield batch
            return
        else:
            scanner = self.dataset.scanner(columns=names, filter=flt, batch_size=batch_size, use_threads=False, **kw)
        for batch in scanner.to_batches():
            if batch.num_rows:
                yield batch

    def read(self, columns: Sequence[str] | None = None, where: pc.Expression | None = None) -> pa.Table:
        """The matching rows as one table: for small sets (held-out, labelled OOD), not the corpus."""
        names = list(columns) if columns is not None else None
        if self.filter_after_cast and self._filter(where) is not None:
            schema = pa.schema([self.schema.field(c) for c in (names if names is not None else self.columns)])
            return pa.Table.from_batches(list(self.batches(names, where)), schema=schema)
        return self.dataset.to_table(columns=names, filter=self._filter(where))

    def count(self, where: pc.Expression | None = None) -> int:
        if self.filter_after_cast and self._filter(where) is not None:
            return sum(b.num_rows for b in self.batches([], where))
        return int(self.dataset.count_rows(filter=self._filter(where)))

    # ---------------------------------------------------------------- checks
    def settings(self, what: str = "scores") -> dict[str, Any] | None:
        """The one ``(model_id, temperature, epsilon)`` of the ok rows; mixed settings are refused.

        ``None`` when the table has no ok row. One pass over those three columns.
        """
        seen: dict[str, set] = {c: set() for c in SETTING_COLUMNS}
        for batch in self.batches(SETTING_COLUMNS, OK):
            for c in SETTING_COLUMNS:
                seen[c].update(v for v in pc.unique(batch.column(c)).to_pylist() if v is not None)
                if len(seen[c]) > 1:
                    raise ConfigError(
                        f"the {what} mix several values of {c} ({sorted(map(str, seen[c]))[:5]}); "
                        "score each setting into its own output directory")
        if not any(seen.values()):
            return None
        missing = [c for c, v in seen.items() if not v]
        if missing:
            raise ConfigError(f"the {what} have ok rows without {missing}")
        out = {c: next(iter(seen[c])) for c in SETTING_COLUMNS}
        return {"model_id": str(out["model_id"]), "temperature": float(out["temperature"]),
                "epsilon": float(out["epsilon"])}

    def check_unique_ids(self, what: str = "scores", budget: int = UNIQUE_BUDGET) -> int:
        """Refuse a table that holds an ``image_id`` more than once; returns the row count.

        Exact, in bounded memory: ``image_id`` is hashed to 64 bits; pass ``p`` of
        ``P = ceil(rows / budget)`` keeps the hashes ``≡ p (mod P)`` (at most about ``budget`` of
        them) and finds repeats by sorting. Equal hashes are then confirmed on the ids themselves
        in one more pass over the few candidates, so a hash collision never refuses a valid table.
        """
        n = self.count()
        passes = max(1, math.ceil(n / budget))
        candidates: list[np.ndarray] = []
        for p in range(passes):
            kept = []
            for batch in self.batches(["image_id"]):
                h = hash_strings(batch.column(0))
                kept.append(h[h % np.uint64(passes) == p] if passes > 1 else h)
            hs = np.concatenate(kept) if kept else np.empty(0, np.uint64)
            del kept
            hs.sort()  # in place: the partition's hashes are held once
            repeat = hs[1:] == hs[:-1]
            if repeat.any():
                candidates.append(np.unique(hs[1:][repeat]))
        if not candidates:
            return n
        cand = np.concatenate(candidates)
        ids = []
        for batch in self.batches(["image_id"]):
            col = batch.column(0)
            hit = np.isin(hash_strings(col), cand)
            if hit.any():
                ids.append(col.filter(pa.array(hit)))
        counts = pc.value_counts(pa.chunked_array(ids, pa.string()) if ids else pa.array([], pa.string()))
        dup = [d["values"] for d in counts.to_pylist() if d["counts"] > 1]
        if dup:
            raise ConfigError(
                f"the {what} ({self.source}) hold {len(dup)} image_ids more than once (e.g. {sorted(dup)[:3]}): "
                "that score run is not exactly-once; rerun the same `odin-audit score` command to repair it, "
                "or deduplicate the dataset")
        return n


# --------------------------------------------------------------------------- hashing
def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash per string (pandas' SipHash). Callers confirm equal hashes on the strings."""
    import pandas as pd

    values = arr.to_numpy(zero_copy_only=False)
    return pd.util.hash_array(values.astype(object, copy=False), categorize=False)


# --------------------------------------------------------------------------- settings across tables
def check_same_settings(corpus: Mapping[str, Any], heldout: Mapping[str, Any], what: str = "held-out") -> None:
    """Refuse scores computed with a different model, T, ε or method than the corpus's."""
    diffs = []
    for key in (*SETTING_COLUMNS, "method"):
        if key not in corpus and key not in heldout:
            continue
        a, b = corpus.get(key), heldout.get(key)
        same = math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            diffs.append(f"{key}: corpus {a!r} vs {what} {b!r}")
    if diffs:
        raise ConfigError(
            f"{what} scores were computed with different settings than the corpus's ("
            + "; ".join(diffs) + f"): rescore the {what} set with the same model, weights, temperature and epsilon"
        )
