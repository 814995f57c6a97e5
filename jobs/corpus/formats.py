"""corpus.format -> the module that reads it. Listing, staging, shards and preflight ask the
module and never test the format's name; a new format is a new module and an entry here.

Every format module offers the same names:

    STAGED: bool          staged into Parquet (`batches`) before sharding, or read in place
    NOTE_PER_FILE: bool   each file is one note: listing groups `shard_rows` files to a Source,
                          and there are no columns to check
    columns(source, corpus) -> list[str]
                          the file's column names, read cheaply (preflight)
    batches(source, corpus) -> Iterator[pa.RecordBatch]
                          the columns the corpus reads, to stage; a few broken rows raise
                          textfile.StartOver with the batches to stage instead
    sample(source, corpus, columns, rows) -> pa.RecordBatch | None
                          the first rows' `columns`, for preflight's `where` warnings
                          (None where the format offers none)
    columns_hint(corpus, names) -> str
                          what to add to a missing column's problem ('' for nothing)
"""

from __future__ import annotations

from types import ModuleType

from . import csv, jsonl, parquet, text

FORMATS: dict[str, ModuleType] = {"parquet": parquet, "jsonl": jsonl, "csv": csv, "text": text}
