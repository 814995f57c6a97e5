"""Corpus readers, staging to Parquet, and shard planning.

Every input ends up as Parquet row groups. Parquet inputs are read in place; jsonl, csv and
text inputs (plain or compressed, e.g. `.gz`) are staged once into Parquet files under a
staging dir, with row groups of `shard_rows` rows. A `Shard` is a deterministic slice of one
Parquet file: a run of its row groups, optionally cut at `row_limit` rows (only for
`corpus.limit`). Paths are local paths or URIs `pyarrow.fs` understands.

Pure functions, no Ray: the driver passes its own `map_fn` to `plan_shards` to stage sources in
parallel tasks, and actors call `read_shard`. Nothing here logs or raises with note text.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from .spec import CorpusSpec, CsvOptions, has_glob, is_uri

STAGING_VERSION = 2  # bump when the staged layout changes: old staged files are then ignored
UNDECODABLE = "_undecodable"  # staged column: which id/kept columns of a row were not UTF-8
ROW_REASON = "_reason"  # staged column (JSONL/CSV files with broken rows): a row's error reason
STAGING_MARKER = "_staging"  # empty file in a staging dir
# Files that mark a dir a job writes (output.LOCK_FILE and META_FILES' _job.json; the marker):
# a corpus dir or glob never reads such a dir as notes.
OWN_DIR_MARKERS = ("_job.json", "_lock.json", STAGING_MARKER)
INFER_BLOCK_BYTES = 16 << 20  # csv/jsonl block size; types are inferred from the first block
_ARROW_TYPES = {
    "string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
    "date32": pa.date32(), "timestamp": pa.timestamp("s"),
}  # fmt: skip
_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


@dataclass(frozen=True)
class Source:
    """One unit of input: a file, or (format text) a chunk of the files under `path`."""

    path: str  # file, or for text the dir ids are relative to (local path or URI)
    size: int
    mtime_ns: int | None
    files: tuple[tuple[str, int, int | None], ...] = ()  # text: (relative path, size, mtime_ns)
    name: str = ""  # the path relative to its spec path's base: what identifies it, wherever
    # the corpus is mounted


@dataclass(frozen=True)
class ParquetInput:
    """A Parquet file ready to shard: an input itself, or the staged copy of a Source."""

    path: str
    identity: str  # hex key: what the shard ids of this file derive from
    row_group_rows: tuple[int, ...]
    source: str  # the original input, for reports
    column_types: tuple[tuple[str, str], ...] = ()  # (column, arrow type) of id + keep columns


@dataclass(frozen=True)
class Shard:
    """A deterministic slice of one Parquet file; plain fields, cheap to ship to actors."""

    id: str  # hex hash of (file identity: path/size/mtime, row_groups, row_limit)
    path: str  # Parquet file to read (local path or URI)
    row_groups: tuple[int, ...]
    num_rows: int  # input rows the shard covers (before `where`)
    source: str  # the original input path, for reports
    row_limit: int | None = None  # read only the first row_limit rows (set by corpus.limit)


class ShardReader(Iterator[pa.RecordBatch]):
    """Iterates a shard's record batches; `rows_in` and `rows_filtered` count as it goes.

    Each batch has columns `id`, `text`, the keep columns (input names and types), for staged
    CSV `_undecodable` (the id/kept columns whose value in that row was not UTF-8), and
    `row_index` (int64, the row's position within the shard, before `where`). Rows failing
    `where` are dropped and counted in `rows_filtered`; when exhausted,
    rows_in = rows yielded + rows_filtered. Text is passed through as stored: it may be
    null, empty, binary (staged csv/text inputs always are) or not text at all.
    """

    def __init__(
        self, shard: Shard, corpus: CorpusSpec, batch_rows: int, batch_bytes: int | None = None
    ):
        """batch_bytes: also cut batches so their note text stays under this many bytes (at
        least one row per batch), so memory follows the budget, not the notes' length."""
        self.shard, self.corpus, self.batch_rows = shard, corpus, batch_rows
        self.batch_bytes = batch_bytes
        self.rows_in = 0
        self.rows_filtered = 0
        self._batches = self._read()

    def __next__(self) -> pa.RecordBatch:
        return next(self._batches)

    def _read(self) -> Iterator[pa.RecordBatch]:
        shard, corpus = self.shard, self.corpus
        columns = corpus.read_columns()
        keep = list(corpus.keep_columns)
        limit = shard.num_rows
        fs, path = filesystem(shard.path)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            check_columns(pf.schema_arrow.names, corpus, shard.path)
            marks = [c for c in (UNDECODABLE, ROW_REASON) if c in pf.schema_arrow.names]
            batches = pf.iter_batches(
                batch_size=self.batch_rows, row_groups=list(shard.row_groups),
                columns=[*columns, *marks],
            )  # fmt: skip
            for batch in batches:
                if self.rows_in >= limit:
                    break
                batch = batch.slice(0, limit - self.rows_in)
                n, start = batch.num_rows, self.rows_in
                self.rows_in += n
                out = pa.RecordBatch.from_arrays(
                    [
                        _plain(batch.column(corpus.id_column)),
                        as_plain_text(batch.column(corpus.text_column)),
                        *(_plain(batch.column(c)) for c in keep),
                        *(batch.column(c) for c in marks),
                        pa.array(np.arange(start, start + n, dtype=np.int64)),
                    ],
                    names=["id", "text", *keep, *marks, "row_index"],
                )
                if corpus.where:
                    keep_rows = where_mask(batch, corpus.where, shard.path)
                    if ROW_REASON in marks:  # a broken line is an error row, never filtered
                        keep_rows = pc.or_(pc.fill_null(keep_rows, False),
                                           pc.is_valid(batch.column(ROW_REASON)))  # fmt: skip
                    out = out.filter(keep_rows)
                    self.rows_filtered += n - out.num_rows
                if out.num_rows:
                    yield from cut_by_bytes(out, "text", self.batch_bytes)


def _plain(values: pa.Array) -> pa.Array:
    """A dictionary-encoded column as its values (`plain_type`); others as they are."""
    return values.dictionary_decode() if pa.types.is_dictionary(values.type) else values


def as_plain_text(texts: pa.Array) -> pa.Array:
    """A text column in any of Arrow's text layouts as string or binary: dictionary-encoded
    (pandas' category, written to Parquet as such), string/binary views. Other types pass
    through (their rows are `not_text`)."""
    texts = _plain(texts)
    if pa.types.is_string_view(texts.type):
        texts = texts.cast(pa.string())
    elif pa.types.is_binary_view(texts.type):
        texts = texts.cast(pa.binary())
    return texts


def cut_by_bytes(batch: pa.RecordBatch, column: str, limit: int | None) -> Iterator[pa.RecordBatch]:
    """Slices of `batch` whose `column` (string/binary) holds at most `limit` bytes each, or one
    row when a single value is larger."""
    arr = batch.column(column)
    if limit is None or not (pa.types.is_string(arr.type) or pa.types.is_binary(arr.type)
                             or pa.types.is_large_string(arr.type)
                             or pa.types.is_large_binary(arr.type)):  # fmt: skip
        yield batch
        return
    sizes = pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False)
    start, used = 0, 0
    for i, n in enumerate(sizes):
        if i > start and used + n > limit:
            yield batch.slice(start, i - start)
            start, used = i, 0
        used += int(n)
    yield batch.slice(start)


def read_shard(
    shard: Shard, corpus: CorpusSpec, batch_rows: int, batch_bytes: int | None = None
) -> ShardReader:
    """Stream a shard as record batches of at most `batch_rows` rows and (when given)
    `batch_bytes` bytes of note text (see ShardReader)."""
    return ShardReader(shard, corpus, batch_rows, batch_bytes)


def plan_shards(
    corpus: CorpusSpec,
    staging_dir: str,
    shard_rows: int,
    map_fn: Callable[
        [Callable[[Source], ParquetInput], Iterable[Source]], Iterable[ParquetInput]
    ] = map,
) -> list[Shard]:
    """List the corpus, stage what needs it, and cut it into shards, in a deterministic order.

    map_fn(fn, sources) must return fn's results in order (the builtin `map`, or the driver's
    parallel map over Ray tasks; `fn` pickles). Inputs: spec path order, then sorted within a
    dir or glob; a file matched twice is used once. Parquet row groups are grouped greedily up
    to `shard_rows` rows (a larger row group is a shard of its own). `corpus.limit`: shards are
    kept in order until N rows pass `where`; the shard crossing the limit gets a `row_limit`
    (input rows to read) and later shards are dropped.
    """
    sources = list_sources(corpus, shard_rows)
    fn = partial(stage_source, corpus=corpus, staging_dir=staging_dir, shard_rows=shard_rows)
    inputs = list(map_fn(fn, sources))
    check_column_types(inputs)
    shards = [s for parquet in inputs for s in _split(parquet, shard_rows)]
    return shards if corpus.limit is None else _apply_limit(shards, corpus)


def injected_delay(key: str) -> float:
    """Test-only knob, 0 unless set: CLINICALBERT_TEST_SLOWDOWN='key=seconds,...' slows a
    pool's actors (key: the pool's name) per record batch, or staging ('staging') per input."""
    for item in os.environ.get("CLINICALBERT_TEST_SLOWDOWN", "").split(","):
        name, _, seconds = item.partition("=")
        if name == key and seconds:
            return float(seconds)
    return 0.0


def list_sources(corpus: CorpusSpec, shard_rows: int) -> list[Source]:
    """The corpus's inputs in plan order; text files are grouped `shard_rows` to a Source."""
    seen: set[str] = set()
    sources: list[Source] = []
    for spec_path in corpus.paths:
        base, files = _expand(spec_path)
        files = [f for f in files if f.path not in seen]
        seen.update(f.path for f in files)
        if corpus.format != "text":
            sources += [
                Source(_uri(spec_path, f.path), f.size, f.mtime_ns, (), _relative(base, f.path))
                for f in files
            ]
            continue
        rel = [(_relative(base, f.path), f.size, f.mtime_ns) for f in files]
        name = os.path.basename(base.rstrip("/"))
        for i in range(0, len(rel), shard_rows):
            chunk = tuple(rel[i : i + shard_rows])
            size = sum(s for _, s, _ in chunk)
            sources.append(Source(_uri(spec_path, base), size, None, chunk, name))
    return sources


def stage_source(
    source: Source, corpus: CorpusSpec, staging_dir: str, shard_rows: int
) -> ParquetInput:
    """Describe a Parquet input, or stage a jsonl/csv/text source into Parquet and describe that.

    The staged file's name derives from the source (its name relative to the spec path, size,
    a digest of its first and last 64 KiB, the text files' names, sizes and mtimes), the
    columns read, the csv options and `shard_rows`, never from where the corpus is mounted; it is written under a temporary name and renamed,
    so a staged file that exists is complete and is reused as is.
    """
    time.sleep(injected_delay("staging"))
    if corpus.format == "parquet":
        if source.size == 0:  # an empty file is zero rows
            identity = _hash(["parquet", source.name, 0])
            return ParquetInput(source.path, identity, (), source.path)
        fs, path = filesystem(source.path)
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
        except (OSError, *_ARROW_ERRORS) as e:
            raise ValueError(f"{source.path}: not a readable Parquet file: {_redact(e)}") from None
        schema = meta.schema.to_arrow_schema()
        check_columns(schema.names, corpus, source.path)
        rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        # name, size and footer (row groups, their statistics, writer): the same file gets the
        # same shard ids wherever it is mounted, a rewritten one new ids
        footer = json.dumps(meta.to_dict(), sort_keys=True, default=str)
        identity = _hash(["parquet", source.name, source.size, footer])
        types = _types(schema, corpus, source.path)
        return ParquetInput(source.path, identity, rows, source.path, types)

    key = _hash(
        [
            STAGING_VERSION, corpus.format, source.name, source.size, _edges(source),
            source.files, corpus.read_columns(), (corpus.csv or CsvOptions()).model_dump(),
            shard_rows,
        ]
    )  # fmt: skip
    name = f"{_safe_stem(source)}-{key[:16]}.parquet"
    final = _join(staging_dir, name)
    fs, final_path = filesystem(final)
    if fs.get_file_info(final_path).type != pa_fs.FileType.File:
        if corpus.format == "text":
            batches = _text_batches(source)
        elif source.size == 0:  # an empty file is zero rows
            batches = iter(())
        else:
            batches = _table_batches(source, corpus)
        try:
            _write_atomic(fs, final_path, batches, shard_rows)
        except BadJsonlLine as e:  # a few broken lines: those become error rows
            _write_atomic(fs, final_path, _jsonl_by_line(source, corpus, str(e)), shard_rows)
        except RaggedCsvRow as e:  # a few ragged rows: those become error rows
            _write_atomic(fs, final_path, _csv_with_ragged_rows(source, corpus, str(e)),
                          shard_rows)  # fmt: skip
        _mark_staging(staging_dir)  # once a staged file is there (temp files are hidden)
    with fs.open_input_file(final_path) as f:
        meta = pq.ParquetFile(f).metadata
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    types = _types(meta.schema.to_arrow_schema(), corpus, source.path) if rows else ()
    return ParquetInput(final, key, rows, source.path, types)


def _types(schema: pa.Schema, corpus: CorpusSpec, source: str) -> tuple[tuple[str, str], ...]:
    """(column, type) of the id and kept columns; ValueError for an id column of a nested type
    (a struct, list or map is no id to find a row by)."""
    columns = (corpus.id_column, *corpus.keep_columns) if corpus.format != "text" else ("id",)
    kind = plain_type(schema.field(columns[0]).type)
    if pa.types.is_nested(kind):
        raise ValueError(
            f"{source}: its id column {columns[0]!r} (corpus.id_column) is {kind}: an id must be "
            "one value (an integer, a string, ...), not a struct, list or map"
        )
    text = "text" if corpus.format == "text" else corpus.text_column
    kind = plain_type(schema.field(text).type)
    if not (_is_text(kind) or pa.types.is_null(kind)):  # null: a column of only null notes
        raise ValueError(
            f"{source}: its text column {text!r} (corpus.text_column) is {kind}, not text: "
            "notes must be strings (or UTF-8 bytes). Is corpus.text_column the notes' column?"
        )
    return tuple((c, str(plain_type(schema.field(c).type))) for c in columns)


def missing_ids(ids: pa.Array) -> pa.Array:
    """Per row: the id is null, NaN (pandas' null in a float column), or a text id that is
    empty or only whitespace (a quoted "" in a CSV, "" in JSONL): the row cannot be found by
    its id (`null_id`)."""
    ids = as_plain_text(ids)
    missing = pc.is_null(ids, nan_is_null=True)
    if _is_text(ids.type):
        missing = pc.or_(missing, pc.fill_null(pc.match_substring_regex(ids, r"^\s*$"), True))
    return missing


def _is_text(kind: pa.DataType) -> bool:
    """A string or binary type, in any of Arrow's layouts but dictionary-encoded."""
    return any(
        test(kind) for test in (
            pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
            pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view,
        )
    )  # fmt: skip


def plain_type(kind: pa.DataType) -> pa.DataType:
    """The type a column is read and written as: a dictionary-encoded one as its values'."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def check_column_types(inputs: list[ParquetInput]) -> None:
    """Every input must give the id and keep columns one type, so the parts form one table:
    ValueError naming the column, two inputs and their types."""
    first: dict[str, tuple[str, str]] = {}
    for parquet in inputs:
        for column, kind in parquet.column_types:
            seen = first.setdefault(column, (kind, parquet.source))
            if seen[0] != kind:
                raise ValueError(
                    f"column {column!r} is {seen[0]} in {seen[1]} but {kind} in "
                    f"{parquet.source}: the output parts would not form one table. Give the "
                    "inputs one type (csv: pin it with corpus.csv.column_types)"
                )


def _mark_staging(staging_dir: str) -> None:
    """Mark a staging dir as one (see `_own_dirs`): staged copies are never corpus files."""
    fs, root = filesystem(staging_dir)
    marker = f"{root.rstrip('/')}/{STAGING_MARKER}"
    if fs.get_file_info(marker).type != pa_fs.FileType.File:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(marker):
            pass


def clean_staging(staging_dir: str) -> None:
    """Remove the temporary files a killed staging run left (`.<name>.<uuid>.tmp`); complete
    staged files are kept and reused. Only while no other run stages into this dir."""
    fs, root = filesystem(staging_dir)
    selector = pa_fs.FileSelector(root, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
            with suppress(FileNotFoundError):
                fs.delete_file(info.path)


def remove_staged(staging_dir: str, shards: list[Shard]) -> None:
    """Delete the staged files these shards read (note text outside the output dir), then
    the staging dir itself if nothing else is left in it."""
    fs, root = filesystem(staging_dir)
    prefix = root.rstrip("/") + "/"
    for path in sorted({filesystem(s.path)[1] for s in shards}):
        if path.startswith(prefix):
            with suppress(FileNotFoundError):
                fs.delete_file(path)
    with suppress(FileNotFoundError, OSError):
        left = fs.get_file_info(pa_fs.FileSelector(root, allow_not_found=True))
        if [i.base_name for i in left] == [STAGING_MARKER]:
            fs.delete_file(left[0].path)
            left = []
        if not left:
            fs.delete_dir(root)


def check_columns(available: list[str], corpus: CorpusSpec, path: str) -> None:
    """Raise ValueError naming the first column the corpus needs that `available` lacks."""
    roles = [("id_column", corpus.id_column), ("text_column", corpus.text_column)]
    roles += [("keep_columns", c) for c in corpus.keep_columns]
    roles += [("where", c) for c in corpus.where or {}]
    for role, column in roles:
        if column not in available:
            raise ValueError(
                f"{path}: column {column!r} (corpus.{role}) not found; available columns: "
                f"{', '.join(map(repr, available)) or 'none'}"
            )
        if (times := available.count(column)) > 1:
            raise ValueError(repeated_column(path, role, column, times))


def repeated_column(path: str, role: str, column: str, times: int) -> str:
    """The error for a column the corpus reads that the file has more than once."""
    return (f"corpus.{role}: {path} has {times} columns named {column!r}: the job cannot "
            "tell which one to read; rename the others")  # fmt: skip


def where_mask(batch: pa.RecordBatch, where: dict[str, Any], path: str) -> pa.BooleanArray:
    """True for rows matching every condition (value: equality, tuple: membership, None: null)."""
    mask = None
    for column, value in where.items():
        arr = batch.column(column)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        values = value if isinstance(value, tuple) else (value,)
        wanted = [v for v in values if v is not None]
        match = None
        if wanted:
            try:
                value_set = pa.array(wanted).cast(arr.type)
                match = pc.is_in(arr, value_set=value_set)
            except _ARROW_ERRORS as e:
                raise ValueError(
                    f"{path}: corpus.where.{column}: cannot compare {value!r} with column type "
                    f"{arr.type}"
                ) from e
        if len(wanted) < len(values):
            nulls = pc.is_null(arr)
            match = nulls if match is None else pc.or_(match, nulls)
        mask = match if mask is None else pc.and_(mask, match)
    assert mask is not None, "where must not be empty"
    return mask


def filesystem(path: str) -> tuple[pa_fs.FileSystem, str]:
    """The pyarrow file system for a local path or URI, and the path within it."""
    return pa_fs.FileSystem.from_uri(path if is_uri(path) else os.path.abspath(path))


# -- listing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    path: str  # path within the file system
    size: int
    mtime_ns: int | None


def _expand(spec_path: str) -> tuple[str, list[_File]]:
    """(base dir, files) for a file, dir (recursive) or glob; files sorted, base in fs terms."""
    fs, path = filesystem(spec_path)
    if has_glob(path):
        parts = path.split("/")
        fixed = next(i for i, p in enumerate(parts) if has_glob(p))
        base = "/".join(parts[:fixed]) or "/"
        recursive = "**" in parts or len(parts) - fixed > 1
        infos = _list(fs, base, recursive) if _is_dir(fs, base) else []
        files = [i for i in _not_in_own_dirs(infos) if _glob_match(parts, i.path.split("/"))]
        if not files:
            raise ValueError(f"corpus path {spec_path!r} matches no file")
        return base, files
    info = fs.get_file_info(path)
    if info.type == pa_fs.FileType.Directory:
        listed = _list(fs, path)
        if _own_dirs(listed) & {path.rstrip("/")}:
            raise ValueError(
                f"corpus path {spec_path!r} is an output or staging dir of a clinicalbert job "
                f"(it holds {' or '.join(OWN_DIR_MARKERS)}), not notes"
            )
        files = [f for f in _not_in_own_dirs(listed) if not _hidden(_relative(path, f.path))]
        return path, files
    if info.type == pa_fs.FileType.File:
        return os.path.dirname(path), [_File(info.path, info.size, info.mtime_ns)]
    raise ValueError(f"corpus path {spec_path!r} does not exist")


def _own_dirs(files: list[_File]) -> set[str]:
    """The dirs among these files' parents that a job writes: output dirs (`_job.json`,
    `_lock.json`) and staging dirs (STAGING_MARKER)."""
    return {f.path.rsplit("/", 1)[0] for f in files if f.path.rsplit("/", 1)[-1] in OWN_DIR_MARKERS}


def _not_in_own_dirs(files: list[_File]) -> list[_File]:
    """The files outside every job's output and staging dirs: a corpus dir that holds a
    job's output (`output.path: notes/embedded`) never reads it back as notes."""
    own = tuple(d + "/" for d in _own_dirs(files))
    return [f for f in files if not f.path.startswith(own)] if own else files


def _is_dir(fs: pa_fs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pa_fs.FileType.Directory


def _list(fs: pa_fs.FileSystem, base: str, recursive: bool = True) -> list[_File]:
    infos = fs.get_file_info(pa_fs.FileSelector(base, recursive=recursive))
    files = [_File(i.path, i.size, i.mtime_ns) for i in infos if i.type == pa_fs.FileType.File]
    return sorted(files, key=lambda f: f.path)


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Component-wise glob: `*`, `?`, `[..]` stay within one component; `**` spans any number."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _glob_match(pattern[1:], parts[1:])
    )


def _relative(base: str, path: str) -> str:
    return path[len(base) :].lstrip("/") if path.startswith(base) else os.path.basename(path)


def _uri(spec_path: str, fs_path: str) -> str:
    """Turn a path within the spec path's file system back into a path `filesystem` accepts."""
    if not is_uri(spec_path):
        return fs_path
    _, inner = pa_fs.FileSystem.from_uri(spec_path)
    prefix = spec_path[: len(spec_path) - len(inner)] if spec_path.endswith(inner) else None
    return (prefix if prefix is not None else spec_path.split("://", 1)[0] + "://") + fs_path


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if is_uri(directory) else os.path.join(directory, name)


# -- staging ---------------------------------------------------------------------------------


def _table_batches(source: Source, corpus: CorpusSpec) -> Iterator[pa.RecordBatch]:
    """Stream a csv or jsonl file as record batches of the columns the corpus reads."""
    columns = list(corpus.read_columns())
    fs, path = filesystem(source.path)
    try:
        if corpus.format == "csv":
            batches = _csv_reader(fs, path, source.path, corpus, columns)
        else:
            batches = _jsonl_reader(fs, path, source.path, corpus, columns)
        decode = (corpus.id_column, *corpus.keep_columns) if corpus.format == "csv" else ()
        for batch in batches:
            yield _decoded(batch.select(columns), decode) if decode else batch.select(columns)
    except (OSError, UnicodeError, *_ARROW_ERRORS) as e:  # OSError: a truncated or corrupt .gz
        hint = ""
        if corpus.format == "jsonl" and isinstance(e, pa.ArrowInvalid):  # staging reads it
            # line by line then; pyarrow counts rows per block, so name the line itself
            line = _first_bad_jsonl_line(fs, path, columns) or _redact(e)
            raise BadJsonlLine(f"{source.path}: cannot read as jsonl: {line}") from None
        if corpus.format == "csv" and _RAGGED.search(str(e)):  # staging skips those rows
            raise RaggedCsvRow(f"{source.path}: cannot read as csv: {_redact(e)}") from None
        if "conversion error" in str(e):
            hint = (
                " (types are inferred from the first 16 MiB: pin them with corpus.csv.column_types)"
            )
        # from None: pyarrow's own message may quote the row, i.e. note text
        raise ValueError(
            f"{source.path}: cannot read as {corpus.format}: {_redact(e)}{hint}"
        ) from None


_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object"}  # fmt: skip


def _first_bad_jsonl_line(fs: pa_fs.FileSystem, path: str, columns: list[str]) -> str | None:
    """The first line of a JSONL file that is not a JSON object, or whose value of a read
    column has another JSON type than on the first line holding one, as one line that names
    the line and column (never a value); None when every line is consistent."""
    kinds: dict[str, tuple[str, int]] = {}
    with fs.open_input_stream(path, compression="detect") as f:
        for number, raw in enumerate(
            io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace"), 1
        ):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                return f"line {number:,} is not valid JSON"
            if not isinstance(record, dict):
                return f"line {number:,} is not a JSON object"
            for column in columns:
                value = record.get(column)
                if value is None:
                    continue
                kind = _JSON_KINDS.get(type(value), type(value).__name__)
                first = kinds.setdefault(column, (kind, number))
                if first[0] != kind:
                    return (f"line {number:,}: {column!r} is {kind}, where line {first[1]:,} "
                            f"has {first[0]}")  # fmt: skip
    return None


class BadJsonlLine(ValueError):
    """A JSONL file pyarrow cannot read whole (a line that is not JSON, a column whose JSON
    type changes): staging reads it line by line instead (`_jsonl_by_line`)."""


JSONL_LINES_PER_BATCH = 4096


# Row reasons the line reader gives: ReasonCode values (jobs.output imports this module).
NOT_JSON, NOT_TEXT, UNDECODABLE_LINE = "not_json", "not_text", "undecodable"


class _JsonObject(dict):
    """A JSON object, with the keys it gives more than once (json.loads keeps the last value
    silently: which one the writer meant is unknown)."""

    twice: frozenset[str] = frozenset()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    record = _JsonObject(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        record.twice = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return record


def _json_lines(
    fs: pa_fs.FileSystem, path: str, columns: list[str]
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """(record, None) per non-blank line that is a JSON object, else ({}, its reason):
    `not_json` (also for an object that gives one of `columns` twice), or `undecodable` for a
    line that is not UTF-8."""
    with fs.open_input_stream(path, compression="detect") as f:
        for raw in io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape"):
            if not raw.strip():
                continue
            try:
                raw.encode("utf-8")
            except UnicodeEncodeError:
                yield {}, UNDECODABLE_LINE
                continue
            try:
                record = json.loads(raw, object_pairs_hook=_json_object)
            except ValueError:
                record = None
            if isinstance(record, dict) and not record.twice.intersection(columns):
                yield record, None
            else:
                yield {}, NOT_JSON


def _jsonl_by_line(
    source: Source, corpus: CorpusSpec, whole_error: str
) -> Iterator[pa.RecordBatch]:
    """A JSONL file read line by line. A line that is not a JSON object, or whose id, kept or
    `where` value has another JSON type than that column's (the first value's), is a row of
    nulls with reason `not_json`; a text that is not a string, reason `not_text`; a line that
    is not UTF-8, `undecodable`. The rest read as pyarrow would (numbers: int64 unless a
    float occurs). Two passes: the column types, then the rows. A column whose first value is
    a list or an object is not read this way: `whole_error` is raised instead."""
    columns = list(corpus.read_columns())
    fs, path = filesystem(source.path)
    first: dict[str, type] = {}  # each column's first JSON type
    floats: set[str] = set()  # number columns holding a float somewhere
    for record, _ in _json_lines(fs, path, columns):
        for c in columns:
            if (value := record.get(c)) is not None:
                first.setdefault(c, type(value))
                if type(value) is float:
                    floats.add(c)
    types: dict[str, pa.DataType] = {}
    for c in columns:
        kind = first.get(c, str)
        if c == corpus.text_column:
            types[c] = pa.string()
        elif issubclass(kind, (list, dict)):
            raise ValueError(whole_error)
        elif kind in (int, float):
            types[c] = pa.float64() if c in floats else pa.int64()
        else:
            types[c] = pa.bool_() if kind is bool else pa.string()
    python = {pa.int64(): (int,), pa.float64(): (int, float), pa.bool_(): (bool,),
              pa.string(): (str,)}  # fmt: skip

    def fits(value: Any, kind: pa.DataType) -> bool:
        if isinstance(value, bool) and kind != pa.bool_():
            return False
        if isinstance(value, int) and kind == pa.int64() and not -(2**63) <= value < 2**63:
            return False  # too large for int64
        return value is None or isinstance(value, python[kind])

    def batch_of(rows: list[tuple[dict[str, Any], str | None]]) -> pa.RecordBatch:
        arrays = [pa.array([r.get(c) for r, _ in rows], types[c]) for c in columns]
        reasons = pa.array([why for _, why in rows], pa.string())
        return pa.RecordBatch.from_arrays([*arrays, reasons], names=[*columns, ROW_REASON])

    rows: list[tuple[dict[str, Any], str | None]] = []
    for record, why in _json_lines(fs, path, columns):
        if why is not None:
            rows.append(({}, why))
        elif not all(fits(record.get(c), types[c]) for c in columns if c != corpus.text_column):
            rows.append(({}, NOT_JSON))
        elif not fits(record.get(corpus.text_column), pa.string()):
            rows.append(({c: record.get(c) for c in columns if c != corpus.text_column},
                         NOT_TEXT))  # fmt: skip
        else:
            rows.append((record, None))
        if len(rows) == JSONL_LINES_PER_BATCH:
            yield batch_of(rows)
            rows = []
    if rows:
        yield batch_of(rows)


_RAGGED = re.compile(r"Expected \d+ columns, got \d+")


class RaggedCsvRow(ValueError):
    """A CSV file with a row of more or fewer fields than its header: staging reads it again,
    each such row an error row (`_csv_with_ragged_rows`)."""


NOT_CSV = "not_csv"  # a ReasonCode value: a CSV row with more or fewer fields than the header


def _csv_with_ragged_rows(
    source: Source, corpus: CorpusSpec, whole_error: str
) -> Iterator[pa.RecordBatch]:
    """A CSV file whose ragged rows (more or fewer fields than the header) are rows of nulls
    with reason `not_csv`, in their places; every other row as pyarrow reads it. Python's csv
    module finds the ragged rows' places, pyarrow reads the file skipping them; where the two
    disagree (the field counts skipped, the rows read), `whole_error` refuses the file."""
    columns = list(corpus.read_columns())
    fs, path = filesystem(source.path)
    try:
        places, widths, records = _ragged_csv_records(fs, path, corpus.csv or CsvOptions())
    except (csv.Error, OSError):
        raise ValueError(whole_error) from None
    skipped: list[int] = []

    def skip(row: Any) -> str:  # row.text is the row itself: never kept or shown
        skipped.append(row.actual_columns)
        return "skip"

    decode = (corpus.id_column, *corpus.keep_columns)
    read = _csv_reader(fs, path, source.path, corpus, columns, invalid_row_handler=skip)
    rows = 0
    try:
        for batch in _with_error_rows(
            (_decoded(b.select(columns), decode) for b in read), places, NOT_CSV
        ):
            rows += batch.num_rows
            yield batch
    except (OSError, UnicodeError, *_ARROW_ERRORS):
        raise ValueError(whole_error) from None
    if sorted(skipped) != sorted(widths) or rows != records:
        raise ValueError(whole_error)


def _ragged_csv_records(
    fs: pa_fs.FileSystem, path: str, opts: CsvOptions
) -> tuple[list[int], list[int], int]:
    """The places (0-based among the records after the header; blank lines are not records,
    as for pyarrow) and field counts of the records whose count differs from the header's,
    and the number of records."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a note is one field: no limit below the job's own
    places, widths, records, header = [], [], 0, None
    try:
        with fs.open_input_stream(path, compression="detect") as f:
            text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
            for fields in csv.reader(text, delimiter=opts.delimiter, quotechar=opts.quote_char):
                if not fields:
                    continue
                if header is None:
                    header = len(fields)
                    continue
                if len(fields) != header:
                    places.append(records)
                    widths.append(len(fields))
                records += 1
    finally:
        csv.field_size_limit(limit)
    return places, widths, records


def _with_error_rows(
    batches: Iterator[pa.RecordBatch], places: list[int], reason: str
) -> Iterator[pa.RecordBatch]:
    """The rows of `batches` with a `ROW_REASON` column, and a row of nulls with `reason` at
    each of `places` (ascending places in the rows yielded)."""
    schema: pa.Schema | None = None
    pos, k = 0, 0

    def errors(n: int) -> pa.RecordBatch:
        assert schema is not None
        nulls = [pa.nulls(n, field.type) for field in schema]
        return pa.RecordBatch.from_arrays(
            [*nulls, pa.array([reason] * n, pa.string())], names=[*schema.names, ROW_REASON]
        )

    for batch in batches:
        schema, i = batch.schema, 0
        while i < batch.num_rows or (k < len(places) and places[k] == pos):
            bad = 0
            while k + bad < len(places) and places[k + bad] == pos + bad:
                bad += 1
            if bad:
                yield errors(bad)
                k, pos = k + bad, pos + bad
                continue
            run = batch.num_rows - i
            if k < len(places):
                run = min(run, places[k] - pos)
            part = batch.slice(i, run)
            yield part.append_column(ROW_REASON, pa.nulls(run, pa.string()))
            i, pos = i + run, pos + run
    if k < len(places):
        yield errors(len(places) - k)


def _decoded(batch: pa.RecordBatch, columns: tuple[str, ...]) -> pa.RecordBatch:
    """The textual id/kept columns (read as raw bytes) as strings: a value that is not UTF-8
    becomes null and its column is named in `_undecodable` for that row, so one bad byte
    never turns a whole column into binary. Other columns pass through."""
    bad: list[list[str]] = [[] for _ in range(batch.num_rows)]
    arrays, names = [], []
    for name in batch.schema.names:
        arr = batch.column(name)
        if name in columns and pa.types.is_binary(arr.type):
            try:
                arr = arr.cast(pa.string())  # the common case: every value is UTF-8
            except pa.ArrowInvalid:
                values = []
                for i, v in enumerate(arr.to_pylist()):
                    try:
                        values.append(None if v is None else v.decode("utf-8"))
                    except UnicodeDecodeError:
                        values.append(None)
                        bad[i].append(name)
                arr = pa.array(values, pa.string())
        arrays.append(arr)
        names.append(name)
    marks = pa.array([",".join(b) if b else None for b in bad], pa.string())
    return pa.RecordBatch.from_arrays([*arrays, marks], names=[*names, UNDECODABLE])


def _redact(error: Exception) -> str:
    """pyarrow's parse errors quote the offending row or value: keep only the part before it."""
    message = (str(error).splitlines() or [""])[0]
    message = re.sub(r"(got \d+):.*", r"\1", message)
    return re.sub(r"(invalid value).*", r"\1", message)


def _csv_reader(
    fs: pa_fs.FileSystem,
    path: str,
    name: str,
    corpus: CorpusSpec,
    columns: list[str],
    invalid_row_handler: Callable[[Any], str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The file's batches; with `invalid_row_handler` (pyarrow's: ragged rows), at least one
    (empty when every row is ragged), so the file's schema is known."""
    opts = corpus.csv or CsvOptions()
    read = pa_csv.ReadOptions(block_size=INFER_BLOCK_BYTES)

    def parse(handler: Callable[[Any], str] | None) -> pa_csv.ParseOptions:
        return pa_csv.ParseOptions(
            delimiter=opts.delimiter, quote_char=opts.quote_char, newlines_in_values=True,
            invalid_row_handler=handler,
        )  # fmt: skip

    types = {c: _ARROW_TYPES[t] for c, t in opts.column_types.items()}
    types[corpus.text_column] = pa.binary()  # raw bytes: undecodable notes become error rows
    probe_skip = None if invalid_row_handler is None else (lambda row: "skip")  # counted below
    with fs.open_input_stream(path, compression="detect") as f:
        probe = pa_csv.open_csv(
            f, read, parse(probe_skip), pa_csv.ConvertOptions(column_types=types)
        )
        schema = probe.schema
    check_columns(schema.names, corpus, name)
    types |= {
        c: pa.string() for c in columns if c not in types and schema.field(c).type == pa.null()
    }
    for c in (corpus.id_column, *corpus.keep_columns):  # textual: raw bytes, decoded per value
        if c not in opts.column_types and schema.field(c).type in (
            pa.string(), pa.binary(), pa.null(),
        ):  # fmt: skip
            types[c] = pa.binary()
    # unquoted empty fields are null (as pandas reads MIMIC), a quoted "" is an empty string
    convert = pa_csv.ConvertOptions(
        column_types=types,
        include_columns=columns,
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    with fs.open_input_stream(path, compression="detect") as f:
        reader = pa_csv.open_csv(f, read, parse(invalid_row_handler), convert)
        empty = invalid_row_handler is not None
        for batch in reader:
            empty = False
            yield batch
        if empty:
            yield pa.RecordBatch.from_pylist([], schema=reader.schema)


def _jsonl_reader(
    fs: pa_fs.FileSystem, path: str, name: str, corpus: CorpusSpec, columns: list[str]
) -> Iterator[pa.RecordBatch]:
    read = pa_json.ReadOptions(block_size=INFER_BLOCK_BYTES)
    with fs.open_input_stream(path, compression="detect") as f:
        schema = pa_json.open_json(f, read_options=read).schema
    check_columns(schema.names, corpus, name)
    nulls = [pa.field(c, pa.string()) for c in columns if schema.field(c).type == pa.null()]
    parse = pa_json.ParseOptions(explicit_schema=pa.schema(nulls) if nulls else None)
    with fs.open_input_stream(path, compression="detect") as f:
        yield from pa_json.open_json(f, read_options=read, parse_options=parse)


def _text_batches(source: Source) -> Iterator[pa.RecordBatch]:
    """One row per file: id = path relative to the source dir, text = the file's bytes."""
    fs, root = filesystem(source.path)
    ids, texts = [], []
    for rel, _, _ in source.files:
        with fs.open_input_stream(f"{root.rstrip('/')}/{rel}", compression="detect") as f:
            texts.append(f.read())
        ids.append(rel)
    yield pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(texts, pa.binary())], names=["id", "text"]
    )


def _write_atomic(
    fs: pa_fs.FileSystem, final: str, batches: Iterator[pa.RecordBatch], shard_rows: int
) -> None:
    """Write batches as Parquet with row groups of `shard_rows` rows: temp name, then rename."""
    directory, name = final.rsplit("/", 1)
    fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            writer: pq.ParquetWriter | None = None
            try:
                pending: list[pa.RecordBatch] = []
                buffered = 0
                schema: pa.Schema | None = None
                for batch in batches:
                    if writer is None:
                        schema = batch.schema
                        writer = pq.ParquetWriter(out, schema, compression="zstd")
                    pending.append(batch)
                    buffered += batch.num_rows
                    while buffered >= shard_rows:
                        table = pa.Table.from_batches(pending, schema)
                        writer.write_table(table.slice(0, shard_rows), row_group_size=shard_rows)
                        rest = table.slice(shard_rows)
                        pending, buffered = rest.to_batches(), rest.num_rows
                if writer is None:  # no rows at all: an empty file with no row groups
                    empty = pa.schema([])
                    writer = pq.ParquetWriter(out, empty)
                elif buffered:
                    writer.write_table(
                        pa.Table.from_batches(pending, schema), row_group_size=shard_rows
                    )
            finally:  # also when the input fails midway: the writer closes before its stream
                if writer is not None:  # (else its finalizer writes to a closed file, noisily)
                    writer.close()
        fs.move(tmp, final)
    except BaseException:
        if fs.get_file_info(tmp).type == pa_fs.FileType.File:
            fs.delete_file(tmp)
        raise


def _safe_stem(source: Source) -> str:
    stem = os.path.basename(source.path.rstrip("/")) or "input"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:40]


def _edges(source: Source, span: int = 1 << 16) -> str:
    """sha256 of a file's first and last `span` bytes (a cheap content fingerprint that does
    not depend on where the file is mounted or when it was copied); '' for text dirs."""
    if source.files or source.size == 0:
        return ""
    fs, path = filesystem(source.path)
    with fs.open_input_file(path) as f:
        head = f.read(span)
        f.seek(max(source.size - span, 0))
        tail = f.read(span)
    return hashlib.sha256(head + tail).hexdigest()


def _hash(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# -- shards ----------------------------------------------------------------------------------


def _split(parquet: ParquetInput, shard_rows: int) -> list[Shard]:
    """Group consecutive row groups greedily into shards of at most `shard_rows` rows."""
    groups: list[list[int]] = []
    rows: list[int] = []
    for i, n in enumerate(parquet.row_group_rows):
        if not groups or (rows[-1] and rows[-1] + n > shard_rows):
            groups.append([])
            rows.append(0)
        groups[-1].append(i)
        rows[-1] += n
    return [
        _shard(parquet.path, parquet.identity, tuple(g), n, parquet.source)
        for g, n in zip(groups, rows)
        if n
    ]


def _shard(
    path: str,
    identity: str,
    row_groups: tuple[int, ...],
    num_rows: int,
    source: str,
    row_limit: int | None = None,
) -> Shard:
    shard_id = _hash([identity, list(row_groups), row_limit])[:16]
    return Shard(shard_id, path, row_groups, num_rows, source, row_limit)


def _apply_limit(shards: list[Shard], corpus: CorpusSpec) -> list[Shard]:
    """Keep shards in order until `corpus.limit` rows pass `where`; cut the crossing shard."""
    assert corpus.limit is not None
    remaining, kept = corpus.limit, []
    for shard in shards:
        passing = _passing_rows(shard, corpus)  # input-row positions that pass `where`
        if len(passing) < remaining:
            kept.append(shard)
            remaining -= len(passing)
            continue
        cut = int(passing[remaining - 1]) + 1
        if cut < shard.num_rows:  # the uncut shard's id already hashes the file identity
            shard = _shard(shard.path, shard.id, shard.row_groups, cut, shard.source, cut)
        kept.append(shard)
        break
    return kept


@dataclass(frozen=True)
class RepeatedIds:
    """Ids on more than one input row (rows passing `where`; null ids are error rows)."""

    ids: int  # distinct ids that repeat
    extra_rows: int  # rows beyond the first of each such id
    example: Any  # one of them (the most repeated)
    source: str  # an input holding it


def repeated_ids(shards: list[Shard], corpus: CorpusSpec) -> RepeatedIds | None:
    """The ids that occur on more than one row of the shards' inputs, or None. Reads only the
    id column (and `where`'s), so it costs a fraction of a pass over the text."""
    ids, sources = [], []
    columns = list(dict.fromkeys([corpus.id_column, *(corpus.where or {})]))
    for shard in shards:
        fs, path = filesystem(shard.path)
        with fs.open_input_file(path) as f:
            batches = pq.ParquetFile(f).iter_batches(row_groups=list(shard.row_groups),
                                                     columns=columns)  # fmt: skip
            left = shard.num_rows
            for batch in batches:
                if left <= 0:
                    break
                batch = batch.slice(0, left)
                left -= batch.num_rows
                if corpus.where:
                    batch = batch.filter(where_mask(batch, corpus.where, shard.path))
                ids.append(_plain(batch.column(corpus.id_column)))
                sources.append(shard.source)
    if not ids:
        return None
    ids = pa.chunked_array(ids).combine_chunks()
    counts = pc.value_counts(ids.filter(pc.invert(missing_ids(ids))))  # one type:
    # check_column_types made every input's id column the same
    n = counts.field("counts").to_numpy()
    repeat = np.flatnonzero(n > 1)
    if not len(repeat):
        return None
    top = int(repeat[np.argmax(n[repeat])])
    example = counts.field("values")[top]
    source = next(s for s, a in zip(sources, ids) if pc.any(pc.equal(a, example)).as_py())
    return RepeatedIds(len(repeat), int((n[repeat] - 1).sum()), example.as_py(), source)


def _passing_rows(shard: Shard, corpus: CorpusSpec) -> np.ndarray:
    """Positions (within the shard) of the rows that pass `where`."""
    if not corpus.where:
        return np.arange(shard.num_rows)
    fs, path = filesystem(shard.path)
    masks = []
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        check_columns(pf.schema_arrow.names, corpus, shard.path)
        for batch in pf.iter_batches(row_groups=list(shard.row_groups), columns=list(corpus.where)):
            masks.append(where_mask(batch, corpus.where, shard.path).to_numpy(zero_copy_only=False))
    return np.flatnonzero(np.concatenate(masks)) if masks else np.arange(0)
