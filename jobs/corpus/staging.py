"""Staging: a source of a format read in place (Parquet) described as it is; any other staged
into Parquet chunk files under the staging dir, with row groups of `shard_rows` rows.

A staged source is a run of chunk files (`<stem>-<key>-00000.parquet`, ...) of `chunk_rows`
rows each, every one written through `fs.write_atomic` (a temporary `fs.TMP_PREFIX` name, then
a rename), then a completion marker (`<stem>-<key>.done.json`) listing them. A chunk that
exists is complete: it is read while later ones are still being written (pipelined staging)
and kept when its source is staged again (the same key gives the same chunks); a source whose
marker exists is reused as is. `clean_staging` removes what a killed run left. Nothing here
logs or raises with note text.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from functools import partial
from itertools import chain, islice

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from ..fs import TMP_PREFIX, delete, filesystem, join, names, write_atomic
from ..objectstore import abort_uploads
from ..spec import CorpusSpec, CsvOptions
from .formats import FORMATS
from .textfile import StartOver
from .units import ParquetInput, Source, digest
from .values import ARROW_ERRORS, check_columns, is_text, plain_type, redact

STAGING_VERSION = 3  # bump when the staged layout changes: old staged files are then ignored
STAGING_MARKER = "_staging"  # empty file in a staging dir
CHUNK_ROWS = 20_000  # rows per staged chunk file: max(1, CHUNK_ROWS // shard_rows) row groups
DONE_SUFFIX = ".done.json"  # a staged source's completion marker
READ_AHEAD = 4  # record batches read (decompressed, parsed) ahead of the chunk writer
_CHUNK_NAME = re.compile(r"-\d{5}\.parquet(?=$|\?)")  # a URI's query may follow


def stage_source(
    source: Source,
    corpus: CorpusSpec,
    staging_dir: str,
    shard_rows: int,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[ParquetInput]:
    """A Parquet input as it is; a jsonl/csv/text source staged into Parquet chunk files, one
    ParquetInput per chunk, each as soon as it is committed.

    The chunks' names derive from the source (its name relative to the spec path, size, a
    digest of its first and last 64 KiB, the text files' names, sizes and mtimes), the
    columns read, the csv options, `shard_rows` and the chunk size, never from where the
    corpus is mounted; so do their identities (the key and the chunk's index, what shard ids
    derive from). A source staged again gives the same chunks: those already committed are
    not written again. A source refused midway (a corrupt .gz) keeps none of its chunks.
    """
    fmt = FORMATS[corpus.format]
    if not fmt.STAGED:
        yield _in_place(source, corpus)
        return
    chunks, groups = _chunks(source, corpus, staging_dir, shard_rows, chunk_rows)
    if (reused := chunks.completed()) is not None:
        yield from reused
        return
    staged: list[ParquetInput] = []
    t0 = time.monotonic()
    chunks.fs.create_dir(chunks.root, recursive=True)
    try:
        try:
            yield from chunks.write(fmt.batches(source, corpus), shard_rows, groups, staged)
        except StartOver as e:  # a few broken rows: those become error rows (the rows
            # before them, in the chunks already committed, are read the same)
            yield from chunks.write(e.batches, shard_rows, groups, staged)
    except ValueError:  # the source is refused whole
        for parquet in staged:
            delete(chunks.fs, filesystem(parquet.path)[1])
        raise
    chunks.complete(staged, time.monotonic() - t0)


def staged_whole(
    source: Source,
    corpus: CorpusSpec,
    staging_dir: str,
    shard_rows: int,
    chunk_rows: int = CHUNK_ROWS,
) -> bool:
    """Whether `source` needs no staging: it is read in place, or it was staged whole before
    (its completion marker and every chunk it lists are there)."""
    if not FORMATS[corpus.format].STAGED:
        return True
    chunks, _ = _chunks(source, corpus, staging_dir, shard_rows, chunk_rows)
    return chunks.completed() is not None


def _chunks(
    source: Source, corpus: CorpusSpec, staging_dir: str, shard_rows: int, chunk_rows: int
) -> tuple[Chunks, int]:
    """A staged source's chunks (named by its key) and the row groups per chunk."""
    groups = max(1, chunk_rows // shard_rows)
    key = digest(
        [
            STAGING_VERSION, corpus.format, source.name, source.size, _edges(source),
            source.files, corpus.read_columns(), (corpus.csv or CsvOptions()).model_dump(),
            shard_rows, groups,
        ]
    )  # fmt: skip
    return Chunks(staging_dir, f"{_safe_stem(source)}-{key[:16]}", key, source, corpus), groups


class Chunks:
    """The chunk files of one staged source (`prefix` in the staging dir): committed in order
    by `write`, listed by the completion marker (`complete`), reused (`completed`)."""

    def __init__(self, staging_dir: str, prefix: str, key: str, source: Source, corpus: CorpusSpec):
        self.staging_dir, self.prefix, self.key = staging_dir, prefix, key
        self.source, self.corpus = source, corpus
        self.fs, root = filesystem(staging_dir)
        self.root = root.rstrip("/")
        self.marker = f"{self.root}/{prefix}{DONE_SUFFIX}"
        self.data_bytes = 0  # Arrow bytes of the rows read (the staging rate's measure)

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}.parquet"

    def _there(self, files: list[str]) -> bool:
        """Whether every one of these files is in the staging dir."""
        infos = self.fs.get_file_info([f"{self.root}/{name}" for name in files])
        return all(i.type == pa_fs.FileType.File for i in infos)

    def write(
        self,
        batches: Iterator[pa.RecordBatch],
        shard_rows: int,
        groups: int,
        staged: list[ParquetInput],
    ) -> Iterator[ParquetInput]:
        """Commit the chunks (`groups` row groups of `shard_rows` rows each) of `batches`,
        each put in `staged` at its index and yielded. Chunks `staged` holds already (a first
        pass's) are read over, not written again: the rows before a broken row read the same
        (a chunk whose column types differ, JSONL's, is written again and yielded again). A
        source without rows is one chunk without row groups."""
        cut = RowGroups(_read_ahead(batches), shard_rows)
        for index, first in enumerate(cut):
            tables = chain([first], islice(cut, groups - 1))
            types = _types(first.schema, self.corpus, self.source.path)  # before writing
            again = index < len(staged)
            if again and types == staged[index].column_types:
                for _ in tables:
                    pass
            else:
                staged[index : index + 1] = [self._commit(index, tables, types, rewrite=again)]
                yield staged[index]
        if not staged:
            staged.append(self._commit(0, iter(()), (), schema=cut.schema))
            yield staged[-1]

    def _commit(
        self,
        index: int,
        tables: Iterator[pa.Table],
        types: tuple[tuple[str, str], ...],
        rewrite: bool = False,
        schema: pa.Schema | None = None,
    ) -> ParquetInput:
        """Chunk `index` of row groups `tables` (of column `types`): written, or kept where an
        earlier staging of this key committed it (the same rows), unless `rewrite`."""
        name, rows = self.name(index), []

        def counted() -> Iterator[pa.Table]:
            for table in tables:
                rows.append(table.num_rows)
                self.data_bytes += table.nbytes
                yield table

        if not rewrite and self._there([name]):  # committed by an earlier staging
            for _ in counted():
                pass
        else:
            write = partial(_write_chunk, tables=counted(), schema=schema,
                            text=self.corpus.text_column)  # fmt: skip
            write_atomic(self.fs, f"{self.root}/{name}", write)
            _mark_staging(self.staging_dir)  # once a staged file is there (temp files are hidden)
        path = join(self.staging_dir, name)
        return ParquetInput(path, digest([self.key, index]), tuple(rows), self.source.path, types)

    def complete(self, staged: list[ParquetInput], seconds: float) -> None:
        """Write the completion marker: the chunks' row groups and types, and what staging
        took (seconds, the input's bytes as stored, the Arrow bytes read: the dry run's rate)."""
        done = {"chunks": [list(p.row_group_rows) for p in staged], "seconds": seconds,
                "types": [list(t) for p in staged[:1] for t in p.column_types],
                "input_bytes": self.source.size, "data_bytes": self.data_bytes}  # fmt: skip
        write_atomic(self.fs, self.marker, lambda sink: sink.write(json.dumps(done).encode()))

    def completed(self) -> list[ParquetInput] | None:
        """The chunks of this source as staged whole before (its marker lists them and every
        one is there), or None."""
        try:
            with self.fs.open_input_stream(self.marker) as f:
                done = json.loads(f.read())
            listed = [tuple(rows) for rows in done["chunks"]]
            types = tuple(tuple(t) for t in done["types"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, or unreadable
            return None
        if not self._there([self.name(i) for i in range(len(listed))]):
            return None
        paths = [join(self.staging_dir, self.name(i)) for i in range(len(listed))]
        return [
            ParquetInput(
                path, digest([self.key, i]), rows, self.source.path, types * bool(sum(rows))
            )
            for i, (path, rows) in enumerate(zip(paths, listed))
        ]


class RowGroups(Iterator[pa.Table]):
    """`batches` cut into tables of exactly `rows` rows (the last one fewer, none empty);
    `schema`: the first batch's, once one is read (None for no batch at all)."""

    def __init__(self, batches: Iterator[pa.RecordBatch], rows: int):
        self.batches, self.rows = batches, rows
        self.schema: pa.Schema | None = None
        self.pending: list[pa.RecordBatch] = []
        self.buffered = 0

    def __next__(self) -> pa.Table:
        while self.buffered < self.rows and (batch := next(self.batches, None)) is not None:
            if self.schema is None:
                self.schema = batch.schema
            if batch.num_rows:
                self.pending.append(batch)
                self.buffered += batch.num_rows
        if not self.buffered:
            raise StopIteration
        table = pa.Table.from_batches(self.pending, self.schema)
        rest = table.slice(self.rows)
        self.pending, self.buffered = rest.to_batches(), rest.num_rows
        return table.slice(0, self.rows)


def _read_ahead(
    batches: Iterator[pa.RecordBatch], depth: int = READ_AHEAD
) -> Iterator[pa.RecordBatch]:
    """`batches`, read in a thread of their own up to `depth` ahead: the input is decompressed
    and parsed while the chunk writer compresses (both release the GIL). The reader's error
    is raised here, in order; closing this stops the reader."""
    ahead: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            with suppress(queue.Full):
                ahead.put(item, timeout=0.1)
                return True
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(end)
        except BaseException as e:  # handed over to the consumer, raised there
            put(e)
        finally:
            getattr(batches, "close", lambda: None)()  # the input stream closes here

    reader = threading.Thread(target=read, name="staging-read", daemon=True)
    reader.start()
    try:
        while (item := ahead.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        reader.join()


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


def _write_chunk(
    sink: pa.NativeFile, tables: Iterator[pa.Table], schema: pa.Schema | None, text: str
) -> None:
    """Each of `tables` as one row group into `sink` (`fs.write_atomic` gives it); with none,
    a file without row groups (of `schema`, or of no column). No dictionary and no statistics
    for the notes' column: every note differs, so both only cost time."""
    writer: pq.ParquetWriter | None = None
    try:
        for table in tables:
            if writer is None:
                rest = [c for c in table.schema.names if c != text]
                writer = pq.ParquetWriter(sink, table.schema, compression="zstd",
                                          use_dictionary=rest, write_statistics=rest)  # fmt: skip
            writer.write_table(table, row_group_size=table.num_rows)
        if writer is None:  # no rows at all
            writer = pq.ParquetWriter(sink, schema if schema is not None else pa.schema([]))
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


def staging_times(staged: Iterable[str]) -> list[dict[str, float]]:
    """What staging took for each source of these staged chunk files whose completion marker
    says (seconds, input_bytes, data_bytes), in order."""
    markers = dict.fromkeys(
        _CHUNK_NAME.sub(DONE_SUFFIX, p) for p in staged if _CHUNK_NAME.search(p)
    )
    times = []
    for marker in markers:
        fs, path = filesystem(marker)
        with suppress(FileNotFoundError, ValueError, KeyError), fs.open_input_stream(path) as f:
            done = json.loads(f.read())
            times.append({k: float(done[k]) for k in ("seconds", "input_bytes", "data_bytes")})
    return times


def remove_staged(staging_dir: str, staged: Iterable[str]) -> None:
    """Delete staged chunk files (note text outside the output dir) and their sources'
    completion markers (first: a marker never lists a missing chunk), then the staging dir
    itself if nothing else is left in it."""
    fs, root = filesystem(staging_dir)
    prefix = root.rstrip("/") + "/"
    paths = sorted(p for p in {filesystem(s)[1] for s in staged} if p.startswith(prefix))
    markers = sorted({_CHUNK_NAME.sub(DONE_SUFFIX, p) for p in paths if _CHUNK_NAME.search(p)})
    for path in [*markers, *paths]:
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
