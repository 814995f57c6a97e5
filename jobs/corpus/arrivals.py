"""Pipelined staging without Ray: what a staging task streams for each chunk it commits
(`arrivals`), and what the driver makes of them (`Intake`): the chunk's shards, its column
types checked against the chunks before it, its ids' hashes against every id before them.

The driver runs `arrivals` as one streaming task per source and hands each `Arrival` to its
`Intake` while shards of earlier chunks are being encoded. Nothing here logs or raises with
note text.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from ..fs import filesystem
from ..spec import CorpusSpec
from . import staging
from .ids import RepeatedIds, file_ids, repeated_ids
from .idscan import picked
from .shards import input_shards
from .units import ParquetInput, Shard, Source
from .values import check_column_types


@dataclass(frozen=True)
class Arrival:
    """One committed chunk of a staged source, as its staging task streams it."""

    source: int  # the source's place in the plan
    chunk: int  # the chunk's place in its source
    parquet: ParquetInput
    hashes: np.ndarray  # uint64: its ids' hashes (rows passing `where`, no null id), sorted
    seconds: float  # since the task started staging its source
    data_bytes: int  # its row groups' uncompressed bytes


def arrivals(
    item: tuple[int, Source],
    corpus: CorpusSpec,
    staging_dir: str,
    shard_rows: int,
    chunk_rows: int = staging.CHUNK_ROWS,
    hash_ids: bool = True,
) -> Iterator[Arrival]:
    """Stage source `item` (its place in the plan, the source) and stream an Arrival per
    chunk as it is committed (a chunk staged again, JSONL's, comes again with its place).
    `hash_ids`: hash each chunk's ids (read back from the file just written)."""
    place, source = item
    t0 = time.monotonic()
    chunks: dict[str, int] = {}  # identity -> place in the source
    for parquet in staging.stage_source(source, corpus, staging_dir, shard_rows, chunk_rows):
        chunk = chunks.setdefault(parquet.identity, len(chunks))
        shards = tuple(input_shards(parquet, shard_rows))
        hashes = file_ids(shards, corpus).hashes if hash_ids and shards else np.zeros(0, np.uint64)
        yield Arrival(place, chunk, parquet, hashes, time.monotonic() - t0, _data_bytes(parquet))


def _data_bytes(parquet: ParquetInput) -> int:
    """The uncompressed bytes of a Parquet file's row groups (its footer says)."""
    if not parquet.row_group_rows:
        return 0
    fs, path = filesystem(parquet.path)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


class SeenHashes:
    """Every hash added so far, as sorted runs that merge as they grow (a hash is merged
    O(log n) times): whether new hashes meet an earlier one costs O(k log n)."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def add(self, hashes: np.ndarray) -> bool:
        """Add sorted `hashes`; True when one of them repeats within them or meets one added
        before (equal ids, or distinct ids sharing a hash: the caller compares the ids)."""
        met = bool(np.any(hashes[1:] == hashes[:-1]))
        met = met or any(picked(hashes, run).any() for run in self.runs)
        self.runs.append(hashes)
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], last]))
        return met


class Intake:
    """The driver's side of pipelined staging: arrivals in, their shards out, in any order;
    `shards()` in plan order. Column types are checked as each chunk comes, and so are ids
    (unless `check_ids` is off): `repeated()` reads the ids behind hashes that met."""

    def __init__(
        self,
        corpus: CorpusSpec,
        shard_rows: int,
        committed: Collection[str] = frozenset(),
        check_ids: bool = True,
    ):
        self.corpus, self.shard_rows, self.committed = corpus, shard_rows, committed
        self.by_place: dict[tuple[int, int], list[Shard]] = {}
        self.inputs: dict[tuple[int, int], ParquetInput] = {}
        self.typed: ParquetInput | None = None  # the first chunk with rows: its types rule
        self.seen = SeenHashes() if check_ids else None
        self.met = False  # hashes met since `repeated` last looked
        self.staged: list[str] = []  # every chunk file, to remove when the job is done

    def take(self, arrival: Arrival) -> list[Shard]:
        """The shards of a chunk just committed ([] for one staged again alike). ValueError
        for column types that differ from an earlier chunk's (the same message as a plan's)."""
        place, parquet = (arrival.source, arrival.chunk), arrival.parquet
        shards = input_shards(parquet, self.shard_rows, self.committed)
        if place in self.inputs:
            if self.inputs[place] == parquet:
                return []
            raise ValueError(
                f"{parquet.source}: chunk {arrival.chunk} was staged again with other column "
                "types (JSONL read line by line): run the job again"
            )
        if parquet.column_types:
            self.typed = self.typed or parquet
            check_column_types([self.typed, parquet])
        if self.seen is not None and len(arrival.hashes):
            self.met = self.seen.add(arrival.hashes) or self.met
        self.inputs[place], self.by_place[place] = parquet, shards
        self.staged.append(parquet.path)
        return shards

    def shards(self) -> list[Shard]:
        """Every shard taken so far, in plan order (source, chunk, row group)."""
        return [s for place in sorted(self.by_place) for s in self.by_place[place]]

    def repeated(self) -> RepeatedIds | None:
        """Where hashes met since the last call: the ids that repeat over every chunk taken
        so far (read again and compared, so distinct ids sharing a hash are no repeat)."""
        if not self.met:
            return None
        self.met = False
        return repeated_ids(self.shards(), self.corpus)
