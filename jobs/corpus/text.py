"""Text inputs: directories of one note per file (plain or compressed), staged into Parquet.

Listing groups `shard_rows` files to a Source (NOTE_PER_FILE); a staged row's id is the file's
path relative to the source dir, its text the file's bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from ..fs import as_uri, filesystem
from ..spec import CorpusSpec
from .textfile import unreadable
from .units import Source

STAGED = True  # staged into Parquet before sharding
NOTE_PER_FILE = True  # each file is one note: no columns to check or sample


def columns(source: Source, corpus: CorpusSpec) -> list[str]:
    """The columns staging writes (the files themselves have none): id and text."""
    return ["id", "text"]


def batches(source: Source, corpus: CorpusSpec) -> Iterator[pa.RecordBatch]:
    """One row per file: id = path relative to the source dir, text = the file's bytes."""
    fs, root = filesystem(source.path)
    ids, texts = [], []
    for rel, _, _ in source.files:
        path = f"{root.rstrip('/')}/{rel}"
        try:
            with fs.open_input_stream(path, compression="detect") as f:
                texts.append(f.read())
        except OSError as e:  # a truncated or corrupt .gz: pyarrow's message names no file
            raise unreadable(as_uri(source.path, path), "text", e) from None
        ids.append(rel)
    yield pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(texts, pa.binary())], names=["id", "text"]
    )


def sample(
    source: Source, corpus: CorpusSpec, columns: list[str], rows: int
) -> pa.RecordBatch | None:
    """None: a text corpus has no `where` (the spec allows none)."""
    return None


def columns_hint(corpus: CorpusSpec, names: list[str]) -> str:
    """'': a text corpus names no columns."""
    return ""
