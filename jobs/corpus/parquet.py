"""Parquet inputs: read in place, never staged (a shard is a run of a file's row groups)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..fs import filesystem
from ..spec import CorpusSpec
from .units import Source

STAGED = False  # shards read the file itself; staging only reads its footer
NOTE_PER_FILE = False  # a file holds many notes, one per row


def columns(source: Source, corpus: CorpusSpec) -> list[str]:
    """The columns of one Parquet file, from its footer (no note is read)."""
    fs, path = filesystem(source.path)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).schema_arrow.names


def batches(source: Source, corpus: CorpusSpec) -> Iterator[pa.RecordBatch]:
    """The file's record batches of the columns the corpus reads. (The job never stages a
    Parquet file, STAGED is False: its shards read the file's row groups themselves.)"""
    if source.size == 0:  # an empty file is zero rows
        return
    fs, path = filesystem(source.path)
    with fs.open_input_file(path) as f:
        yield from pq.ParquetFile(f).iter_batches(columns=list(corpus.read_columns()))


def sample(
    source: Source, corpus: CorpusSpec, columns: list[str], rows: int
) -> pa.RecordBatch | None:
    """`columns` of the file's first `rows` rows (for preflight's look at `where` values);
    None for a file without rows."""
    fs, path = filesystem(source.path)
    with fs.open_input_file(path) as f:
        return next(pq.ParquetFile(f).iter_batches(rows, columns=columns), None)


def columns_hint(corpus: CorpusSpec, names: list[str]) -> str:
    """'': a Parquet footer's names suggest nothing about a column it lacks."""
    return ""
