"""The units a corpus is planned in: plain data, cheap to pickle to Ray tasks and actors.

A `Source` is one unit of input, a `ParquetInput` a Parquet file ready to shard (an input
itself, or the staged copy of a Source), a `Shard` a deterministic slice of one. No I/O here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


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
    """A deterministic slice of one Parquet file: a run of its row groups, or a row range of
    one row group larger than `shard_rows`; plain fields, cheap to ship to actors."""

    id: str  # hex hash of (file identity, row_groups, row_limit[, row_start, row_stop])
    path: str  # Parquet file to read (local path or URI)
    row_groups: tuple[int, ...]
    num_rows: int  # input rows the shard covers (before `where`)
    source: str  # the original input path, for reports
    row_limit: int | None = None  # read only the first row_limit rows (set by corpus.limit)
    row_start: int | None = None  # a row range: rows [row_start, row_stop) of its one row
    row_stop: int | None = None  # group; None for both when it covers whole row groups


def digest(parts: Any) -> str:
    """sha256 (hex) of `parts` as sorted JSON: what staged keys and shard ids derive from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
