"""Part files: naming, writing, the commit gate, shard stats, reading back.

    <out>/part-<shard>.parquet           one per shard: rows keyed by note id
    <out>/_errors/part-<shard>.parquet   only for shards with bad rows: id, shard, row, reason

A shard is committed when its part file exists under its final name. Writers stream to a
temporary name (`fs.TMP_PREFIX`) in the same dir and rename at the end, after the errors part,
so a crash never leaves a partial file under a final name and a committed shard's errors part
is always complete. The part's footer holds the shard's counts (`STATS_KEY`), so a resumed job
can report the whole output without reading its rows. Paths are within a `pyarrow.fs` file
system. No Ray here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from .fs import delete, temp_path, write_atomic
from .reasons import ReasonCode

PART_PREFIX = "part-"
ERRORS_DIR = "_errors"
STATS_KEY = "clinicalbert_shard_stats"  # footer key: the shard's counts (see PartWriter.commit)
READ_BATCH_ROWS = 8192  # rows per batch when a part is read batch by batch


# ---- naming ----------------------------------------------------------------------------------
def part_name(shard_id: str) -> str:
    """The base name of a shard's part file (and of its errors part, under ERRORS_DIR)."""
    return f"{PART_PREFIX}{shard_id}.parquet"


_PART_NAME = re.compile(rf"{PART_PREFIX}([0-9A-Za-z]{{1,64}})\.parquet")  # ids: 16 hex digits


def shard_of(name: str) -> str | None:
    """The shard id a part file's base name names, or None for any other name (another
    tool's `part-00000-....parquet` included)."""
    match = _PART_NAME.fullmatch(name)
    return match.group(1) if match else None


def part_path(root: str, shard_id: str) -> str:
    """Path (within the output dir's file system) of a shard's part file."""
    return f"{root}/{part_name(shard_id)}"


def errors_path(root: str, shard_id: str) -> str:
    """Path (within the output dir's file system) of a shard's errors part."""
    return f"{root}/{ERRORS_DIR}/{part_name(shard_id)}"


# ---- shard stats -----------------------------------------------------------------------------
@dataclass
class ShardResult:
    """What an actor reports for one committed shard (counts only, never text)."""

    shard_id: str
    pool: str
    actor: str
    precision: str = ""  # the precision the actor resolved (runner.precision)
    rows_in: int = 0  # rows read from the shard
    rows_out: int = 0  # notes written (each note once, whatever its window rows)
    output_rows: int = 0  # rows in the part file (windows when not aggregated)
    error_rows: int = 0
    filtered_rows: int = 0  # dropped by corpus.where
    windows: int = 0
    tokens: int = 0
    truncated: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    nulled: dict[str, int] = field(default_factory=dict)  # kept column -> values nulled
    seconds: float = 0.0  # busy time in the actor
    batches: int = 0  # record batches read
    attempt: str = ""  # the attempt id the driver trusted with this shard

    def stats(self) -> dict[str, Any]:
        """Counts for the part file's footer."""
        return asdict(self)

    def count_errors(self, errors: pa.Table) -> None:
        """Count the shard's errors part: error rows by reason, and the kept values nulled
        (reason undecodable_value: the row itself is written) by column."""
        nulled = pc.equal(errors["reason"], ReasonCode.UNDECODABLE_VALUE.value)
        for column in errors.filter(nulled)["column"].to_pylist():
            self.nulled[column] = self.nulled.get(column, 0) + 1
        row_errors = errors.filter(pc.invert(nulled))
        self.error_rows = row_errors.num_rows
        reasons = row_errors["reason"].to_numpy(False)
        for reason, count in zip(*np.unique(reasons, return_counts=True)):
            self.reasons[str(reason)] = int(count)


# ---- writing ---------------------------------------------------------------------------------
class StaleAttempt(RuntimeError):
    """A shard attempt the driver no longer trusts tried to commit."""


class CommitGate:
    """Fencing: which attempt of each shard may commit (a Ray actor in a job, one method call
    at a time). The driver `trust`s an attempt when it dispatches it, after the previous one
    is known dead; an attempt `claim`s the commit once its part is complete; only the trusted
    attempt's first claim is granted, so a stalled attempt that wakes up later cannot land."""

    def __init__(self) -> None:
        self.trusted: dict[str, str] = {}
        self.claimed: dict[str, str] = {}
        self.closed = False

    def trust(self, shard_id: str, attempt: str) -> None:
        self.trusted[shard_id] = attempt
        self.claimed.pop(shard_id, None)  # its previous attempt is dead: its claim lapses

    def close(self) -> None:
        """The run is stopping (interrupted): no attempt may start or commit any more."""
        self.closed = True
        self.trusted.clear()

    def may_start(self, shard_id: str, attempt: str) -> bool:
        return not self.closed and self.trusted.get(shard_id) == attempt

    def revoke(self, shard_id: str, attempt: str) -> None:
        if self.trusted.get(shard_id) == attempt:
            del self.trusted[shard_id]

    def claim(self, shard_id: str, attempt: str) -> bool:
        if not self.may_start(shard_id, attempt) or shard_id in self.claimed:
            return False
        self.claimed[shard_id] = attempt
        return True


class PartWriter:
    """Streams one shard's rows to a temporary file; `commit` makes it final. `meta` goes in
    the part's key-value metadata, with `shard` added."""

    def __init__(
        self,
        fs: pa_fs.FileSystem,
        root: str,
        shard_id: str,
        schema: pa.Schema,
        meta: dict[str, str],
    ):
        self.fs, self.root, self.shard_id = fs, root, shard_id
        self.schema = schema.with_metadata({**meta, "shard": shard_id})
        fs.create_dir(root, recursive=True)
        self.tmp = temp_path(part_path(root, shard_id))
        self._sink = fs.open_output_stream(self.tmp)
        try:
            self._writer = pq.ParquetWriter(self._sink, self.schema)
        except BaseException:
            self._sink.close()
            delete(fs, self.tmp)
            raise
        self.committed = False

    def write(self, table: pa.Table) -> None:
        """Append rows (a table of the writer's schema; its own metadata is ignored)."""
        self._writer.write_table(table.replace_schema_metadata(self.schema.metadata))

    def commit(
        self,
        errors: pa.Table | None,
        stats: dict[str, Any] | None = None,
        may_commit: Callable[[], bool] | None = None,
    ) -> None:
        """Errors part first (or a stale one removed), then the part under its final name.
        `stats` (counts only) go in the part's footer so a resumed job can report the whole
        output without reading its rows. `may_commit()` (fencing): asked once the part is
        complete, before anything is renamed; False -> StaleAttempt, nothing committed."""
        if stats is not None:
            self._writer.add_key_value_metadata({STATS_KEY: json.dumps(stats)})
        self._close()
        if may_commit is not None and not may_commit():
            raise StaleAttempt(
                f"shard {self.shard_id}: this attempt is no longer the one the driver trusts "
                "(it was declared stalled and re-queued); its part is discarded"
            )
        errors_at = errors_path(self.root, self.shard_id)
        if errors is not None and errors.num_rows:
            write_atomic(self.fs, errors_at, lambda sink: pq.write_table(errors, sink))
        else:  # left by an earlier attempt that crashed between the two renames
            delete(self.fs, errors_at)
        self.fs.move(self.tmp, part_path(self.root, self.shard_id))
        self.committed = True

    def abort(self) -> None:
        """Drop the temporary file (the shard stays uncommitted)."""
        try:
            self._close()
        finally:
            delete(self.fs, self.tmp)

    def _close(self) -> None:
        # ParquetWriter does not close a stream it was handed; an S3 upload completes on close
        try:
            self._writer.close()
        finally:
            if not self._sink.closed:
                self._sink.close()


@contextmanager
def part_writer(
    fs: pa_fs.FileSystem, root: str, shard_id: str, schema: pa.Schema, meta: dict[str, str]
) -> Iterator[PartWriter]:
    """A PartWriter whose temp file is removed unless `commit` was called."""
    writer = PartWriter(fs, root, shard_id, schema, meta)
    try:
        yield writer
    finally:
        if not writer.committed:
            writer.abort()


# ---- reading ---------------------------------------------------------------------------------
def _plain_metadata(meta: dict[bytes, bytes] | None) -> dict[str, str]:
    """Key-value metadata as str, Arrow's own keys left out."""
    return {k.decode(): v.decode() for k, v in (meta or {}).items() if not k.startswith(b"ARROW:")}


def part_metadata(fs: pa_fs.FileSystem, path: str) -> dict[str, str]:
    """A committed part's key-value metadata (footer only; Arrow's own keys left out)."""
    with fs.open_input_file(path) as f:
        return _plain_metadata(pq.read_metadata(f).metadata)


def shard_stats(fs: pa_fs.FileSystem, path: str) -> dict[str, Any]:
    """The counts a committed shard's writer recorded ({} if it recorded none), with the
    part's precision (parts written before the counts carried it have it as metadata)."""
    meta = part_metadata(fs, path)
    stats = json.loads(meta.get(STATS_KEY, "{}"))
    if stats and "precision" in meta:
        stats.setdefault("precision", meta["precision"])
    return stats


def read_part(fs: pa_fs.FileSystem, path: str) -> pa.Table | None:
    """A whole part (or errors part) as a table; None when it is absent."""
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f)
    except FileNotFoundError:
        return None


def read_parts(fs: pa_fs.FileSystem, paths: list[str]) -> pa.Table | None:
    """Parts as one table (in `paths` order, no metadata), or None when `paths` is empty."""
    if not paths:
        return None
    tables = [pq.read_table(p, filesystem=fs) for p in paths]
    return pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)


@dataclass
class PartFile:
    """A part open for reading: its schema (without metadata), its key-value metadata (Arrow's
    own keys left out) and its rows batch by batch (one batch in memory, whatever its size)."""

    schema: pa.Schema
    metadata: dict[str, str]
    parquet: pq.ParquetFile

    def batches(self, batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        return self.parquet.iter_batches(batch_size=batch_rows)


@contextmanager
def open_part(fs: pa_fs.FileSystem, path: str) -> Iterator[PartFile]:
    """The part at `path`, open for reading batch by batch."""
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        meta = _plain_metadata(parquet.metadata.metadata)
        yield PartFile(parquet.schema_arrow.remove_metadata(), meta, parquet)
