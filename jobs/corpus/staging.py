"""Staging: a source of a format read in place (Parquet) described as it is; any other staged
once into a Parquet file under the staging dir, with row groups of `shard_rows` rows.

A staged file is written through `fs.write_atomic` (a temporary `fs.TMP_PREFIX` name, then a
rename), so a staged file that exists is complete and is reused as is; `clean_staging`
removes what a killed run left. Nothing here logs or raises with note text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import suppress
from functools import partial

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from ..fs import TMP_PREFIX, delete, filesystem, join, names, write_atomic
from ..objectstore import abort_uploads
from ..spec import CorpusSpec, CsvOptions
from .formats import FORMATS
from .textfile import StartOver
from .units import ParquetInput, Shard, Source, digest
from .values import ARROW_ERRORS, check_columns, is_text, plain_type, redact

STAGING_VERSION = 2  # bump when the staged layout changes: old staged files are then ignored
STAGING_MARKER = "_staging"  # empty file in a staging dir


def stage_source(
    source: Source, corpus: CorpusSpec, staging_dir: str, shard_rows: int
) -> ParquetInput:
    """Describe a Parquet input, or stage a jsonl/csv/text source into Parquet and describe that.

    The staged file's name derives from the source (its name relative to the spec path, size,
    a digest of its first and last 64 KiB, the text files' names, sizes and mtimes), the
    columns read, the csv options and `shard_rows`, never from where the corpus is mounted; it is written under a temporary name and renamed,
    so a staged file that exists is complete and is reused as is.
    """
    fmt = FORMATS[corpus.format]
    if not fmt.STAGED:
        return _in_place(source, corpus)
    key = digest(
        [
            STAGING_VERSION, corpus.format, source.name, source.size, _edges(source),
            source.files, corpus.read_columns(), (corpus.csv or CsvOptions()).model_dump(),
            shard_rows,
        ]
    )  # fmt: skip
    name = f"{_safe_stem(source)}-{key[:16]}.parquet"
    final = join(staging_dir, name)
    fs, final_path = filesystem(final)
    if fs.get_file_info(final_path).type != pa_fs.FileType.File:
        batches = fmt.batches(source, corpus)
        try:
            write_atomic(fs, final_path, partial(_write_parquet, batches=batches, rows=shard_rows))
        except StartOver as e:  # a few broken rows: those become error rows
            write_atomic(fs, final_path, partial(_write_parquet, batches=e.batches,
                                                 rows=shard_rows))  # fmt: skip
        _mark_staging(staging_dir)  # once a staged file is there (temp files are hidden)
    with fs.open_input_file(final_path) as f:
        meta = pq.ParquetFile(f).metadata
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    types = _types(meta.schema.to_arrow_schema(), corpus, source.path) if rows else ()
    return ParquetInput(final, key, rows, source.path, types)


def _in_place(source: Source, corpus: CorpusSpec) -> ParquetInput:
    """A Parquet input as it is: its footer's row groups and an identity that the same file
    keeps wherever it is mounted."""
    if source.size == 0:  # an empty file is zero rows
        identity = digest(["parquet", source.name, 0])
        return ParquetInput(source.path, identity, (), source.path)
    fs, path = filesystem(source.path)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            footer = _footer(meta, f)
    except (OSError, *ARROW_ERRORS) as e:
        raise ValueError(f"{source.path}: not a readable Parquet file: {redact(e)}") from None
    schema = meta.schema.to_arrow_schema()
    check_columns(schema.names, corpus, source.path)
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    # name, size and footer (row groups, their statistics, writer): the same file gets the
    # same shard ids wherever it is mounted, a rewritten one new ids
    identity = digest(["parquet", source.name, source.size, footer])
    types = _types(schema, corpus, source.path)
    return ParquetInput(source.path, identity, rows, source.path, types)


def _footer(meta: pq.FileMetaData, f: pa.NativeFile) -> str:
    """What identifies a Parquet file's content: its footer as JSON or, where statistics hold
    bytes that are not UTF-8 (a writer that did not check its strings), its raw bytes."""
    try:
        return json.dumps(meta.to_dict(), sort_keys=True, default=str)
    except UnicodeDecodeError:
        f.seek(f.size() - 8 - meta.serialized_size)
        return hashlib.sha256(f.read(meta.serialized_size)).hexdigest()


def _types(schema: pa.Schema, corpus: CorpusSpec, source: str) -> tuple[tuple[str, str], ...]:
    """(column, type) of the id and kept columns; ValueError for an id column of a nested type
    (a struct, list or map is no id to find a row by)."""
    columns = (corpus.id_column, *corpus.keep_columns)  # text: the spec's "id", nothing kept
    kind = plain_type(schema.field(columns[0]).type)
    if pa.types.is_nested(kind):
        raise ValueError(
            f"{source}: its id column {columns[0]!r} (corpus.id_column) is {kind}: an id must be "
            "one value (an integer, a string, ...), not a struct, list or map"
        )
    text = corpus.text_column  # text: the spec's "text"
    kind = plain_type(schema.field(text).type)
    if not (is_text(kind) or pa.types.is_null(kind)):  # null: a column of only null notes
        raise ValueError(
            f"{source}: its text column {text!r} (corpus.text_column) is {kind}, not text: "
            "notes must be strings (or UTF-8 bytes). Is corpus.text_column the notes' column?"
        )
    return tuple((c, str(plain_type(schema.field(c).type))) for c in columns)


def _write_parquet(sink: pa.NativeFile, batches: Iterator[pa.RecordBatch], rows: int) -> None:
    """Write batches into `sink` as Parquet with row groups of `rows` rows (a file with no
    row group when there are no rows); `fs.write_atomic` gives it the sink."""
    writer: pq.ParquetWriter | None = None
    try:
        pending: list[pa.RecordBatch] = []
        buffered = 0
        schema: pa.Schema | None = None
        for batch in batches:
            if writer is None:
                schema = batch.schema
                writer = pq.ParquetWriter(sink, schema, compression="zstd")
            pending.append(batch)
            buffered += batch.num_rows
            while buffered >= rows:
                table = pa.Table.from_batches(pending, schema)
                writer.write_table(table.slice(0, rows), row_group_size=rows)
                rest = table.slice(rows)
                pending, buffered = rest.to_batches(), rest.num_rows
        if writer is None:  # no rows at all: an empty file with no row groups
            empty = pa.schema([])
            writer = pq.ParquetWriter(sink, empty)
        elif buffered:
            writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=rows)
    finally:  # also when the input fails midway: the writer closes before its stream
        if writer is not None:  # (else its finalizer writes to a closed file, noisily)
            writer.close()


def _mark_staging(staging_dir: str) -> None:
    """Mark a staging dir as one (see listing's `_own_dirs`): staged copies are never corpus
    files."""
    fs, root = filesystem(staging_dir)
    marker = f"{root.rstrip('/')}/{STAGING_MARKER}"
    if fs.get_file_info(marker).type != pa_fs.FileType.File:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(marker):
            pass


def clean_staging(staging_dir: str) -> None:
    """Remove the temporary files a killed staging run left (names starting with
    `fs.TMP_PREFIX`); complete staged files are kept and reused. Only while no other run
    stages into this dir."""
    fs, root = filesystem(staging_dir)
    for name in names(fs, root):
        if name.startswith(TMP_PREFIX):
            delete(fs, join(root, name))
    abort_uploads(staging_dir)  # an object store's incomplete uploads of killed stagings


def remove_staged(staging_dir: str, shards: list[Shard]) -> None:
    """Delete the staged files these shards read (note text outside the output dir), then
    the staging dir itself if nothing else is left in it."""
    fs, root = filesystem(staging_dir)
    prefix = root.rstrip("/") + "/"
    for path in sorted({filesystem(s.path)[1] for s in shards}):
        if path.startswith(prefix):
            delete(fs, path)
    with suppress(FileNotFoundError, OSError):
        left = fs.get_file_info(pa_fs.FileSelector(root, allow_not_found=True))
        if [i.base_name for i in left] == [STAGING_MARKER]:
            fs.delete_file(left[0].path)
            left = []
        if not left:
            fs.delete_dir(root)


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
