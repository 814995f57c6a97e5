"""Output dir layout, schemas and atomic commits.

    <out>/part-<shard>.parquet           one per shard: rows keyed by note id
    <out>/_errors/part-<shard>.parquet   only for shards with bad rows: id, shard, row, reason
    <out>/_job.json  _report.json  _SUCCESS (last)

Everything but the parts has a name dataset discovery skips (leading `_` or `.`), so pandas,
pyarrow, polars and duckdb read exactly the output rows. No note text is ever written here
(staged inputs live outside, see JobSpec.staging_dir).

A shard is committed when its part file exists under its final name. Writers stream to a
temporary name (`.tmp-...`) in the same dir and rename at the end, after the errors part, so a
crash never leaves a partial file under a final name and a committed shard's errors part is
always complete. Paths are local paths or URIs (`pyarrow.fs`). No Ray here.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import socket
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import MISSING, asdict, dataclass, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from .corpus import filesystem

log = logging.getLogger(__name__)

PART_PREFIX, TMP_PREFIX = "part-", ".tmp-"
ERRORS_DIR = "_errors"
META_FILES = ("_job.json", "_report.json", "_SUCCESS")
LOCK_FILE = "_lock.json"
STATS_KEY = "clinicalbert_shard_stats"  # footer key: the shard's counts (see PartWriter.commit)
DISTRIBUTION = "clinicalbert-jobs"
_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
VECTOR_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


class ReasonCode(enum.StrEnum):
    """Why an input row has no output row (errors parts hold only these codes, never text)."""

    NULL = "null"  # text is null
    EMPTY = "empty"  # text is empty or whitespace only
    NOT_TEXT = "not_text"  # not a string (a number, a blob with NUL bytes, ...)
    UNDECODABLE = "undecodable"  # bytes that are not UTF-8
    TOO_LONG = "too_long"  # more than run.max_note_chars characters
    NULL_ID = "null_id"  # the id is null, NaN, empty or blank: the row could not be identified
    # A JSONL line that is not a JSON object, or whose id/kept/where value has another JSON
    # type than its column's: nothing of it is read (its id is null; row_index names it).
    NOT_JSON = "not_json"
    # A CSV row with more or fewer fields than the header: nothing of it is read (as not_json).
    NOT_CSV = "not_csv"
    # The model's output for the note held NaN or inf (a vector, after the cast to
    # output.vector_dtype, or an MLM log-probability): an overflow (fp16) or a broken model.
    NON_FINITE = "non_finite"
    # Not a row error: the row is written, with this kept column's value (not UTF-8) as null;
    # the errors table names the column. Counted apart (Report.nulled_values).
    UNDECODABLE_VALUE = "undecodable_value"


ROW_REASONS = tuple(r.value for r in ReasonCode if r is not ReasonCode.UNDECODABLE_VALUE)


def package_version() -> str:
    """This project's version: from the pyproject.toml beside the code (a checkout, or the
    `--working-dir` upload of `ray job submit`, where nothing is installed), else from the
    installed distribution, else "0+unknown"."""
    if _PYPROJECT.is_file():
        project = tomllib.loads(_PYPROJECT.read_text()).get("project", {})
        if project.get("name") == DISTRIBUTION and "version" in project:
            return str(project["version"])
    try:
        return importlib_metadata.version(DISTRIBUTION)
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def output_schema(
    id_type: pa.DataType,
    keep_fields: list[pa.Field],
    hidden: int,
    vector_dtype: str,
    embeddings: bool,
    windows: bool,
    mlm: bool,
) -> pa.Schema:
    """Schema of a part file.

    id (input type), kept columns, [embedding fixed_size_list<vector_dtype>[hidden]], n_tokens
    (word pieces of the note, or of the window), n_windows, truncated; `windows` (one row per
    window): window_index, char_start, char_end; `mlm`: one list entry per predicted position,
    in (window, position) order: mlm_window, mlm_position (token index in that window),
    mlm_char_start, and per position the top-k mlm_top_ids / mlm_top_tokens / mlm_top_logprobs.
    """
    if vector_dtype not in VECTOR_TYPES:
        raise ValueError(
            f"vector_dtype must be one of {sorted(VECTOR_TYPES)}, got {vector_dtype!r}"
        )
    if embeddings and hidden < 1:
        raise ValueError(f"hidden must be positive, got {hidden}")
    fields_ = [pa.field("id", id_type), *keep_fields]
    if embeddings:
        fields_.append(pa.field("embedding", pa.list_(VECTOR_TYPES[vector_dtype], hidden)))
    fields_ += [
        pa.field("n_tokens", pa.int64()),
        pa.field("n_windows", pa.int32()),
        pa.field("truncated", pa.bool_()),
    ]
    if windows:
        fields_ += [
            pa.field("window_index", pa.int32()),
            pa.field("char_start", pa.int64()),
            pa.field("char_end", pa.int64()),
        ]
    if mlm:
        fields_ += [
            pa.field("mlm_window", pa.list_(pa.int32())),
            pa.field("mlm_position", pa.list_(pa.int32())),
            pa.field("mlm_char_start", pa.list_(pa.int64())),
            pa.field("mlm_top_ids", pa.list_(pa.list_(pa.int32()))),
            pa.field("mlm_top_tokens", pa.list_(pa.list_(pa.string()))),
            pa.field("mlm_top_logprobs", pa.list_(pa.list_(pa.float32()))),
        ]
    names = [f.name for f in fields_]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"kept columns clash with output columns: {clash}")
    return pa.schema(fields_)


def errors_schema(id_type: pa.DataType) -> pa.Schema:
    """Schema of an errors part: id (input type, nullable), shard, row_index, reason code, and
    `column` (the kept column a value was nulled in, for reason undecodable_value; else null)."""
    return pa.schema(
        [
            pa.field("id", id_type),
            pa.field("shard", pa.string()),
            pa.field("row_index", pa.int64()),
            pa.field("reason", pa.string()),
            pa.field("column", pa.string()),
        ]
    )


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
    """Streams one shard's rows to a temporary file; `commit` makes it final."""

    def __init__(self, out: OutputDir, shard_id: str, schema: pa.Schema, meta: dict[str, str]):
        self.out, self.shard_id = out, shard_id
        self.schema = schema.with_metadata(
            {**meta, "version": package_version(), "shard": shard_id}
        )
        out.fs.create_dir(out.root, recursive=True)
        self.tmp = out._join(f"{TMP_PREFIX}{shard_id}-{uuid.uuid4().hex}.parquet")
        self._sink = out.fs.open_output_stream(self.tmp)
        try:
            self._writer = pq.ParquetWriter(self._sink, self.schema)
        except BaseException:
            self._sink.close()
            _delete(out.fs, self.tmp)
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
        errors_path = self.out.errors_path(self.shard_id)
        if errors is not None and errors.num_rows:
            self.out._write_atomic(errors_path, lambda sink: pq.write_table(errors, sink))
        else:  # left by an earlier attempt that crashed between the two renames
            _delete(self.out.fs, errors_path)
        self.out.fs.move(self.tmp, self.out.part_path(self.shard_id))
        self.committed = True

    def abort(self) -> None:
        """Drop the temporary file (the shard stays uncommitted)."""
        try:
            self._close()
        finally:
            _delete(self.out.fs, self.tmp)

    def _close(self) -> None:
        # ParquetWriter does not close a stream it was handed; an S3 upload completes on close
        try:
            self._writer.close()
        finally:
            if not self._sink.closed:
                self._sink.close()


class OutputDir:
    """A job's output dir (local path or URI): paths, resume state, atomic writes, reading."""

    def __init__(self, path: str):
        self.uri = path.rstrip("/") or path
        self.fs, root = filesystem(path)
        self.root = root.rstrip("/") or root

    # ---- paths -----------------------------------------------------------------------------
    def _join(self, *names: str) -> str:
        return "/".join([self.root, *names])

    def part_path(self, shard_id: str) -> str:
        """Path (within `fs`) of a shard's part file."""
        return self._join(f"{PART_PREFIX}{shard_id}.parquet")

    def errors_path(self, shard_id: str) -> str:
        """Path (within `fs`) of a shard's errors part."""
        return self._join(ERRORS_DIR, f"{PART_PREFIX}{shard_id}.parquet")

    # ---- state -----------------------------------------------------------------------------
    def _names(self, sub: str = "") -> list[str]:
        path = self._join(sub) if sub else self.root
        try:
            infos = self.fs.get_file_info(pa_fs.FileSelector(path, allow_not_found=True))
        except FileNotFoundError:
            return []
        return [i.base_name for i in infos]

    def committed(self) -> set[str]:
        """Shard ids whose part file is present under its final name (temp files ignored)."""
        return {
            n[len(PART_PREFIX) : -len(".parquet")]
            for n in self._names()
            if n.startswith(PART_PREFIX) and n.endswith(".parquet")
        }

    def check_spec(self, spec_hash: str, resolved: dict[str, Any], overwrite: bool) -> None:
        """Resume (same spec hash: nothing deleted), refuse (another spec's committed output:
        ValueError), or with `overwrite` delete the output and start over (same spec too).
        A dir whose earlier run committed no part is simply taken over. Writes `_job.json`."""
        self.fs.create_dir(self.root, recursive=True)
        try:
            job = self.read_json("_job.json")
            if job is not None and not isinstance(job, dict):
                raise ValueError(f"{self.uri}/_job.json is not a JSON object")
        except ValueError as e:
            if not overwrite:
                raise ValueError(f"{e}; use another output.path, or --overwrite") from e
            job = {}  # unreadable: another job's, replaced below
        parts = self.committed()
        had, has = _weights((job or {}).get("spec", {})), _weights(resolved)
        same_spec = job is not None and job.get("spec_hash") == spec_hash
        if same_spec and not (had and has and had != has) and not overwrite:
            self.clean_temp()  # resume
            return
        if parts and not overwrite:  # a start that committed nothing blocks no corrected spec
            if same_spec:
                why = f"was written with model weights sha256 {had}; this run's model has {has}"
            else:
                have = f"spec hash {job.get('spec_hash')}" if job else "no _job.json"
                why = f"holds another job's output ({have}, {len(parts)} part files); this "
                why += f"spec's hash is {spec_hash}"
            raise ValueError(
                f"output dir {self.uri} {why}. Use another output.path, or --overwrite to "
                "delete that output"
            )
        self.clear()
        self.clean_temp()
        self.write_json("_job.json", {"spec_hash": spec_hash, "spec": resolved})

    def clear(self) -> None:
        """Delete a previous job's outputs: parts, errors, temp files, _job/_report/_SUCCESS."""
        for name in self._names():
            if name.startswith((PART_PREFIX, TMP_PREFIX)) or name in META_FILES:
                _delete(self.fs, self._join(name))
        with suppress(FileNotFoundError):
            self.fs.delete_dir(self._join(ERRORS_DIR))

    def clean_temp(self) -> None:
        """Delete what crashed writers left: temp files, and errors parts of shards that never
        committed. Only while no writer runs (check_spec calls it before a run starts)."""
        for name in self._names():
            if name.startswith(TMP_PREFIX):
                _delete(self.fs, self._join(name))
        committed = self.committed()
        for name in self._names(ERRORS_DIR):
            shard = (
                name[len(PART_PREFIX) : -len(".parquet")] if name.startswith(PART_PREFIX) else None
            )
            if name.startswith(TMP_PREFIX) or (shard is not None and shard not in committed):
                _delete(self.fs, self._join(ERRORS_DIR, name))

    # ---- writing ---------------------------------------------------------------------------
    @contextmanager
    def part_writer(
        self, shard_id: str, schema: pa.Schema, meta: dict[str, str]
    ) -> Iterator[PartWriter]:
        """A PartWriter whose temp file is removed unless `commit` was called."""
        writer = PartWriter(self, shard_id, schema, meta)
        try:
            yield writer
        finally:
            if not writer.committed:
                writer.abort()

    def write_part(
        self, shard_id: str, table: pa.Table, errors: pa.Table | None, metadata: dict[str, str]
    ) -> None:
        """Commit a whole shard at once: errors part (if rows), then the part file."""
        with self.part_writer(shard_id, table.schema, metadata) as writer:
            writer.write(table)
            writer.commit(errors)

    def _write_atomic(self, path: str, write: Callable[[pa.NativeFile], Any]) -> None:
        parent, name = path.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/{TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as sink:
                write(sink)
            self.fs.move(tmp, path)
        except BaseException:
            _delete(self.fs, tmp)
            raise

    def write_json(self, name: str, obj: Any) -> None:
        """Write `<out>/<name>` atomically as indented JSON."""
        data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
        self._write_atomic(self._join(name), lambda sink: sink.write(data))

    def read_json(self, name: str) -> Any:
        """`<out>/<name>` parsed, or None when absent; ValueError when it is not JSON."""
        try:
            with self.fs.open_input_stream(self._join(name)) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.uri}/{name} is not valid JSON: {e}") from e

    def mark_success(self) -> None:
        """Write `_SUCCESS` (last, once every shard is committed)."""
        self._write_atomic(self._join("_SUCCESS"), lambda sink: sink.write(b""))

    # ---- reading ---------------------------------------------------------------------------
    def part_metadata(self, shard_id: str) -> dict[str, str]:
        """A committed part's key-value metadata (footer only; Arrow's own keys left out)."""
        with self.fs.open_input_file(self.part_path(shard_id)) as f:
            meta = pq.read_metadata(f).metadata or {}
        return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW:")}

    def shard_stats(self, shard_id: str) -> dict[str, Any]:
        """The counts a committed shard's writer recorded ({} if it recorded none), with the
        part's precision (parts written before the counts carried it have it as metadata)."""
        meta = self.part_metadata(shard_id)
        stats = json.loads(meta.get(STATS_KEY, "{}"))
        if stats and "precision" in meta:
            stats.setdefault("precision", meta["precision"])
        return stats

    def read_table(self) -> pa.Table | None:
        """All committed parts as one table (shard id order), or None when none is committed."""
        return self._read([self.part_path(s) for s in sorted(self.committed())])

    def read_errors(self) -> pa.Table | None:
        """Errors parts of committed shards as one table, or None when there are none."""
        shards = set(self._names(ERRORS_DIR))
        paths = [
            self.errors_path(s)
            for s in sorted(self.committed())
            if f"{PART_PREFIX}{s}.parquet" in shards
        ]
        return self._read(paths)

    def _read(self, paths: list[str]) -> pa.Table | None:
        if not paths:
            return None
        tables = [pq.read_table(p, filesystem=self.fs) for p in paths]
        return pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)


class OutputLock:
    """One run per output dir: `_lock.json` names the holder (host, pid, job, start) and holds a
    lease the holder renews every lease_s / 3 from a background thread. Another run is refused
    while the lease is fresh; a lock whose lease expired (its driver died), or whose holder was
    a process of this host that no longer exists, is taken over. On a local file system the lock
    is created exclusively (written whole, then hard-linked into place, so no reader sees it
    half-written); on object stores (s3://) it is read-check-write."""

    def __init__(self, out: OutputDir, job: str, lease_s: float = 60.0):
        self.out, self.lease_s = out, lease_s
        self.token = uuid.uuid4().hex
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
                   "token": self.token, "started_at": time.time(), "lease_s": lease_s}  # fmt: skip
        self.lost: str | None = None  # set when another run took the lock over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        self.out.fs.create_dir(self.out.root, recursive=True)
        path = self.out._join(LOCK_FILE)
        holder = self._read()
        if holder is not None and not self._stale(holder):
            raise RuntimeError(self._busy(holder))
        if holder is not None:
            log.warning("taking over the lock of a run that is gone: %s", _who(holder))
        self._write(exclusive=holder is None)
        if (self._read() or {}).get("token") != self.token:  # lost a race for a stale lock
            raise RuntimeError(self._busy(self._read() or {}))
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="lock-lease")
        self._thread.start()
        log.debug("locked %s", path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self._read() or {}).get("token") == self.token:
            _delete(self.out.fs, self.out._join(LOCK_FILE))

    def _renew_loop(self) -> None:
        failing = False  # a renewal that cannot be written (full disk, storage hiccup) is
        # retried at the next interval; the thread never dies of it (an unrenewed lease would
        # let another run in while this one still writes)
        while not self._stop.wait(self.lease_s / 3):
            try:
                holder = self._read()
                if (holder or {}).get("token") != self.token:
                    self.lost = f"another run took over the lock of {self.out.uri}: {_who(holder)}"
                    log.error("%s", self.lost)
                    return
                self._write(exclusive=False)
            except OSError as e:
                if not failing:
                    log.warning("cannot renew the lock of %s (%s); retrying", self.out.uri, e)
                failing = True
            else:
                failing = False

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = self.out.read_json(LOCK_FILE)
        except ValueError:  # half-written by a crashed writer: no valid holder
            return {"host": "?", "pid": -1, "job": "?", "renewed_at": 0, "lease_s": 0}
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if time.time() > holder.get("renewed_at", 0) + holder.get("lease_s", 0):
            return True
        if holder.get("host") == socket.gethostname():  # a dead process of this host
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                return False
        return False

    def _busy(self, holder: dict[str, Any]) -> str:
        left = holder.get("renewed_at", 0) + holder.get("lease_s", 0) - time.time()
        return (
            f"output dir {self.out.uri} is in use by another run ({_who(holder)}); its lease "
            f"expires in {max(left, 0):.0f}s unless renewed. Wait for that run, or use another "
            "output.path"
        )

    def _write(self, exclusive: bool) -> None:
        data = json.dumps({**self.me, "renewed_at": time.time()}, indent=2).encode()
        path = self.out._join(LOCK_FILE)
        if exclusive and isinstance(self.out.fs, pa_fs.LocalFileSystem):
            # written whole under a temp name, then linked into place: link fails if the lock
            # exists, and no reader ever sees a half-written lock (an O_EXCL create would show
            # an empty file until its write, which a reader must take for a crashed holder)
            # (the temp name is one clean_temp removes should this process die in between; a
            # holder's clean_temp removing it means the dir is held: busy as well)
            tmp = self.out._join(f"{TMP_PREFIX}{LOCK_FILE}-{self.token}")
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                _link_exclusive(tmp, path, data)
            except (FileExistsError, FileNotFoundError):
                raise RuntimeError(self._busy(self._read() or {})) from None
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        self.out._write_atomic(path, lambda sink: sink.write(data))


def _link_exclusive(tmp: str, path: str, data: bytes) -> None:
    """`path` created from `tmp` only if absent (FileExistsError otherwise). A file system
    without hard links (some network mounts) gets an exclusive create, then the write."""
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _who(holder: dict[str, Any] | None) -> str:
    h = holder or {}
    started = h.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)) if started else "?"
    return f"host {h.get('host')}, pid {h.get('pid')}, job {h.get('job')}, started {when} UTC"


@dataclass
class Report:
    """`_report.json`: counts cover the whole output (shards committed by earlier runs
    included); per-pool/per-actor figures, retries and wall time cover this run."""

    name: str
    spec_hash: str
    rows_in: int  # input rows read (before corpus.where)
    rows_out: int  # notes written; a note with one row per window counts once
    error_rows: int
    filtered_rows: int  # dropped by corpus.where
    errors_by_reason: dict[str, int]
    nulled_values: dict[str, int]  # kept column -> values written as null (not UTF-8)
    windows: int
    tokens: int
    truncated_notes: int
    shards: dict[str, Any]  # total, committed_before, processed, failed (shard_id, attempts, error)
    retries: int
    actor_restarts: int
    stalls: list[dict[str, Any]]  # actors killed for making no progress: actor, shard, quiet_s
    interrupted: bool  # the run was stopped before its end: shards left are not counted
    per_pool: dict[str, dict[str, Any]]  # name -> device, actors, precisions, shards, rows, ...
    per_actor: dict[str, dict[str, Any]]  # name -> pool, precision, shards, rows, tokens, ...
    wall_s: float
    tokens_per_s: float
    started_at: str
    finished_at: str
    # what ended the run before its shards were done (interrupted: true), in one line:
    # "interrupted (Ctrl-C or SIGTERM)", "NodeLost: the local Ray node ... died", ...
    stop_reason: str | None = None  # absent from reports written before it existed
    # ids on more than one input row (run.allow_duplicate_ids): {"ids": n, "extra_rows": m}
    repeated_ids: dict[str, int] | None = None
    # the output's notes (earlier runs' parts too) by the precision their part ran in; "" for
    # a part whose counts did not record it. Absent from reports written before it existed
    notes_by_precision: dict[str, int] | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Report:
        """A report from `_report.json`'s content; unknown or missing keys are a ValueError."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown, missing = sorted(set(obj) - names), sorted(required - set(obj))
        if unknown or missing:
            raise ValueError(f"report keys: unknown {unknown}, missing {missing}")
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        """The content of `_report.json`."""
        return asdict(self)

    def check(self) -> None:
        """Raise ValueError unless every input row and every shard is accounted for once."""
        problems = []
        if self.rows_in != self.rows_out + self.error_rows + self.filtered_rows:
            problems.append(
                f"rows_in {self.rows_in} != rows_out {self.rows_out} + error_rows "
                f"{self.error_rows} + filtered_rows {self.filtered_rows}"
            )
        if sum(self.errors_by_reason.values()) != self.error_rows:
            problems.append(
                f"errors_by_reason {self.errors_by_reason} do not sum to error_rows "
                f"{self.error_rows}"
            )
        by = self.notes_by_precision
        if by is not None and sum(by.values()) != self.rows_out:
            problems.append(f"notes_by_precision {by} do not sum to rows_out {self.rows_out}")
        if unknown := sorted(set(self.errors_by_reason) - set(ROW_REASONS)):
            problems.append(f"unknown reason codes {unknown}")
        s = self.shards
        done = s.get("committed_before", 0) + s.get("processed", 0) + len(s.get("failed", []))
        if missing := sorted({"total", "committed_before", "processed", "failed"} - set(s)):
            problems.append(f"shards lacks {missing}")
        elif s["total"] < done if self.interrupted else s["total"] != done:
            problems.append(
                f"shards total {s['total']} != committed_before {s['committed_before']} + "
                f"processed {s['processed']} + failed {len(s['failed'])}"
            )
        if problems:
            raise ValueError(f"report {self.name!r} does not add up: " + "; ".join(problems))


def _weights(resolved: dict[str, Any]) -> str | None:
    return (resolved.get("model_identity") or {}).get("weights_sha256")


def _delete(fs: pa_fs.FileSystem, path: str) -> None:
    with suppress(FileNotFoundError):
        fs.delete_file(path)
