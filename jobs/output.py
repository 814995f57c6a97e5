"""Output dir layout, schemas and atomic commits.

    <out>/part-<shard>.parquet          one per shard: rows keyed by note id
    <out>/errors/part-<shard>.parquet   only for shards with bad rows: id, shard, row, reason
    <out>/_job.json  _report.json  _SUCCESS (last)   <out>/_staged/ (staged inputs)

A shard is committed when its part file exists under its final name. Writers stream to a
temporary name in the same dir and rename at the end, after the errors part, so a crash never
leaves a partial file under a final name. Paths are local or URIs (pyarrow.fs).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata as importlib_metadata
from typing import Any

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from .corpus import filesystem

PART_PREFIX, TMP_PREFIX = "part-", ".tmp-"
META_FILES = ("_job.json", "_report.json", "_SUCCESS")
STATS_KEY = "clinicalbert_shard_stats"


class ReasonCode(enum.StrEnum):
    """Why an input row has no output row (errors parts hold only these codes, never text)."""

    NULL = "null"  # text is null
    EMPTY = "empty"  # text is empty or whitespace only
    NOT_TEXT = "not_text"  # not a string (a number, a blob with NUL bytes, ...)
    UNDECODABLE = "undecodable"  # bytes that are not UTF-8
    TOO_LONG = "too_long"  # more than run.max_note_chars characters
    NULL_ID = "null_id"  # the id is null: the row could not be identified in the output


def package_version() -> str:
    try:
        return importlib_metadata.version("clinicalbert-jobs")
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
    """Schema of a part file. `windows`: one row per window (with char offsets)."""
    fields = [pa.field("id", id_type), *keep_fields]
    if embeddings:
        value = pa.float16() if vector_dtype == "float16" else pa.float32()
        fields.append(pa.field("embedding", pa.list_(value, hidden)))
    fields += [
        pa.field("n_tokens", pa.int64()),  # word pieces of the note (of the window: windows)
        pa.field("n_windows", pa.int32()),
        pa.field("truncated", pa.bool_()),
    ]
    if windows:
        fields += [
            pa.field("window_index", pa.int32()),
            pa.field("char_start", pa.int64()),
            pa.field("char_end", pa.int64()),
        ]
    if mlm:
        fields += [
            pa.field("mlm_window", pa.list_(pa.int32())),
            pa.field("mlm_position", pa.list_(pa.int32())),
            pa.field("mlm_char_start", pa.list_(pa.int64())),
            pa.field("mlm_top_ids", pa.list_(pa.list_(pa.int32()))),
            pa.field("mlm_top_tokens", pa.list_(pa.list_(pa.string()))),
            pa.field("mlm_top_logprobs", pa.list_(pa.list_(pa.float32()))),
        ]
    return pa.schema(fields)


def errors_schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", id_type),
            pa.field("shard", pa.string()),
            pa.field("row_index", pa.int64()),
            pa.field("reason", pa.string()),
        ]
    )


class PartWriter:
    """Streams one shard's rows to a temporary file; `commit` makes it final."""

    def __init__(self, out: OutputDir, shard_id: str, schema: pa.Schema, meta: dict[str, str]):
        self.out, self.shard_id = out, shard_id
        self.schema = schema.with_metadata(
            {**meta, "version": package_version(), "shard": shard_id}
        )
        self.tmp = out._join(f"{TMP_PREFIX}{shard_id}-{uuid.uuid4().hex}.parquet")
        self._writer = pq.ParquetWriter(self.out.fs.open_output_stream(self.tmp), self.schema)
        self.committed = False

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table.replace_schema_metadata(self.schema.metadata))

    def commit(self, errors: pa.Table | None, stats: dict[str, Any] | None = None) -> None:
        """Errors part first, then the part under its final name. `stats` (counts only) go in
        the part's footer so a resumed job can still report the whole output."""
        if stats is not None:
            self._writer.add_key_value_metadata({STATS_KEY: json.dumps(stats)})
        self._writer.close()
        if errors is not None and errors.num_rows:
            self.out._write_atomic(
                self.out.errors_path(self.shard_id),
                lambda sink: pq.write_table(errors, sink),
            )
        self.out.fs.move(self.tmp, self.out.part_path(self.shard_id))
        self.committed = True

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            _delete(self.out.fs, self.tmp)


class OutputDir:
    def __init__(self, path: str):
        self.uri = path
        self.fs, self.root = filesystem(path)
        self.root = self.root.rstrip("/")

    # ---- paths -----------------------------------------------------------------------------
    def _join(self, *names: str) -> str:
        return "/".join([self.root, *names])

    def part_path(self, shard_id: str) -> str:
        return self._join(f"{PART_PREFIX}{shard_id}.parquet")

    def errors_path(self, shard_id: str) -> str:
        return self._join("errors", f"{PART_PREFIX}{shard_id}.parquet")

    @property
    def staging_dir(self) -> str:
        """Where non-Parquet inputs are staged (a path or URI like the output's)."""
        base = self.uri.rstrip("/")
        return f"{base}/_staged"

    # ---- state -----------------------------------------------------------------------------
    def _names(self, sub: str = "") -> list[str]:
        path = self._join(sub) if sub else self.root
        try:
            infos = self.fs.get_file_info(pa_fs.FileSelector(path, allow_not_found=True))
        except FileNotFoundError:
            return []
        return [i.base_name for i in infos]

    def committed(self) -> set[str]:
        """Shard ids whose part file is present under its final name."""
        return {
            n[len(PART_PREFIX) : -len(".parquet")]
            for n in self._names()
            if n.startswith(PART_PREFIX) and n.endswith(".parquet")
        }

    def check_spec(self, spec_hash: str, resolved: dict[str, Any], overwrite: bool) -> None:
        """Resume (same spec), refuse (other spec), or wipe and start over (`overwrite`)."""
        self.fs.create_dir(self.root, recursive=True)
        job = self._read_json("_job.json")
        parts = self.committed()
        if job is not None and job.get("spec_hash") == spec_hash:
            self.clean_temp()
            return
        if job is not None or parts:
            if not overwrite:
                have = job.get("spec_hash", "?")[:12] if job else "none (no _job.json)"
                raise ValueError(
                    f"output dir {self.uri} holds the output of a different job spec (spec hash "
                    f"{have}, this spec {spec_hash[:12]}, {len(parts)} part files); use another "
                    "output.path, or --overwrite to delete that output"
                )
            self.clear()
        self.clean_temp()
        self.write_json("_job.json", {"spec_hash": spec_hash, "spec": resolved})

    def clear(self) -> None:
        """Delete the previous job's outputs (not staged inputs: they depend on the corpus)."""
        for name in self._names():
            if name.startswith((PART_PREFIX, TMP_PREFIX)) or name in META_FILES:
                _delete(self.fs, self._join(name))
        _delete_dir(self.fs, self._join("errors"))

    def clean_temp(self) -> None:
        for sub in ("", "errors"):
            for name in self._names(sub):
                if name.startswith(TMP_PREFIX):
                    _delete(self.fs, self._join(sub, name) if sub else self._join(name))

    # ---- writing ---------------------------------------------------------------------------
    @contextmanager
    def part_writer(
        self, shard_id: str, schema: pa.Schema, meta: dict[str, str]
    ) -> Iterator[PartWriter]:
        writer = PartWriter(self, shard_id, schema, meta)
        try:
            yield writer
        finally:
            if not writer.committed:
                writer.abort()

    def _write_atomic(self, path: str, write: Any) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as sink:
                write(sink)
            self.fs.move(tmp, path)
        except BaseException:
            _delete(self.fs, tmp)
            raise

    def write_json(self, name: str, obj: Any) -> None:
        data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
        self._write_atomic(self._join(name), lambda sink: sink.write(data))

    def _read_json(self, name: str) -> Any:
        try:
            with self.fs.open_input_stream(self._join(name)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def mark_success(self) -> None:
        self._write_atomic(self._join("_SUCCESS"), lambda sink: sink.write(b""))

    # ---- reading ---------------------------------------------------------------------------
    def shard_stats(self, shard_id: str) -> dict[str, Any]:
        """The counts a committed shard's writer recorded (read from the footer only)."""
        with self.fs.open_input_file(self.part_path(shard_id)) as f:
            meta = pq.read_metadata(f).metadata or {}
        return json.loads(meta.get(STATS_KEY.encode(), b"{}"))

    def read_table(self) -> pa.Table:
        paths = [self.part_path(s) for s in sorted(self.committed())]
        return pa.concat_tables(pq.read_table(p, filesystem=self.fs) for p in paths)

    def read_errors(self) -> pa.Table | None:
        names = [n for n in self._names("errors") if n.startswith(PART_PREFIX)]
        if not names:
            return None
        return pa.concat_tables(
            pq.read_table(self._join("errors", n), filesystem=self.fs) for n in sorted(names)
        )


def _delete(fs: pa_fs.FileSystem, path: str) -> None:
    with suppress(FileNotFoundError):
        fs.delete_file(path)


def _delete_dir(fs: pa_fs.FileSystem, path: str) -> None:
    with suppress(FileNotFoundError):
        fs.delete_dir(path)
