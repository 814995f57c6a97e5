"""Shard planning and reading: a `Shard` is a deterministic slice of one Parquet file, a run of
its row groups or a row range of one row group larger than `shard_rows`, optionally cut at
`row_limit` rows (only for `corpus.limit`).

Pure functions, no Ray: the driver passes its own `map_fn` to `plan_shards` to stage sources in
parallel tasks, and actors call `read_shard`. Nothing here logs or raises with note text.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..fs import filesystem
from ..spec import CorpusSpec
from . import staging
from .formats import FORMATS
from .listing import list_sources
from .units import ParquetInput, Shard, Source, digest
from .values import (
    ROW_REASON,
    UNDECODABLE,
    as_plain_text,
    check_column_types,
    check_columns,
    checked_utf8,
    cut_by_bytes,
    plain_values,
    where_mask,
)

RANGE_BUFFER = 8 << 20  # bytes a row range's reader buffers per column while it streams pages


class ShardReader(Iterator[pa.RecordBatch]):
    """Iterates a shard's record batches; `rows_in` and `rows_filtered` count as it goes.

    Each batch has columns `id`, `text`, the keep columns (input names and types), for staged
    CSV `_undecodable` (the id/kept columns whose value in that row was not UTF-8), and
    `row_index` (int64, the row's position within the shard, before `where`: for a row range,
    counted from the range's first row). Rows failing `where` are dropped and counted in
    `rows_filtered`; when exhausted, rows_in = rows yielded + rows_filtered. Text is passed
    through as stored: it may be null, empty, binary (staged csv/text inputs always are) or
    not text at all.
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
        with open_shard(shard) as pf:
            check_columns(pf.schema_arrow.names, corpus, shard.path)
            marks = [c for c in (UNDECODABLE, ROW_REASON) if c in pf.schema_arrow.names]
            for batch in shard_batches(pf, shard, [*columns, *marks], self.batch_rows):
                n, start = batch.num_rows, self.rows_in
                self.rows_in += n
                out = pa.RecordBatch.from_arrays(
                    [
                        plain_values(batch.column(corpus.id_column)),
                        as_plain_text(batch.column(corpus.text_column)),
                        *(plain_values(batch.column(c)) for c in keep),
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
                    out = checked_utf8(out, {"id": corpus.id_column})
                    yield from cut_by_bytes(out, "text", self.batch_bytes)


def read_shard(
    shard: Shard, corpus: CorpusSpec, batch_rows: int, batch_bytes: int | None = None
) -> ShardReader:
    """Stream a shard as record batches of at most `batch_rows` rows and (when given)
    `batch_bytes` bytes of note text (see ShardReader)."""
    return ShardReader(shard, corpus, batch_rows, batch_bytes)


@contextmanager
def open_shard(shard: Shard) -> Iterator[pq.ParquetFile]:
    """The Parquet file a shard reads. A row range's reader streams its row group's pages
    (no pre-buffering, a buffered stream) so that it stops at the range's end and never holds
    the whole group: the N ranges of a group read (N + 1) / 2 times its bytes in all, not N."""
    fs, path = filesystem(shard.path)
    with fs.open_input_file(path) as f:
        if shard.row_start is None:
            yield pq.ParquetFile(f)
        else:
            yield pq.ParquetFile(f, pre_buffer=False, buffer_size=RANGE_BUFFER)


def shard_batches(
    pf: pq.ParquetFile, shard: Shard, columns: list[str], batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """`columns` of the shard's rows as record batches of at most `batch_rows` rows, in order:
    its row groups' rows from `row_start` (a row range), `num_rows` of them (the range's end,
    or `row_limit`). The rows before a range are decoded and dropped: pyarrow reads no row
    range within a row group (no page index selection)."""
    skip, left = shard.row_start or 0, shard.num_rows
    batches = pf.iter_batches(batch_size=batch_rows, row_groups=list(shard.row_groups),
                              columns=columns)  # fmt: skip
    for batch in batches:
        if left <= 0:
            break
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch = batch.slice(skip, left)
        skip, left = 0, left - batch.num_rows
        yield batch


def plan_shards(
    corpus: CorpusSpec,
    staging_dir: str,
    shard_rows: int,
    map_fn: Callable[
        [Callable[[Source], ParquetInput], Iterable[Source]], Iterable[ParquetInput]
    ] = map,
    committed: Collection[str] = frozenset(),
    staged: list[str] | None = None,
) -> list[Shard]:
    """List the corpus, stage what needs it, and cut it into shards, in a deterministic order.

    map_fn(fn, sources) must return fn's results in order (the builtin `map`, or the driver's
    parallel map over Ray tasks; `fn` pickles). Inputs: spec path order, then sorted within a
    dir or glob; a file matched twice is used once. Parquet row groups are grouped greedily up
    to `shard_rows` rows; a larger row group is cut into row ranges of about `shard_rows` rows,
    unless `committed` (the shard ids an earlier run's output holds) has it whole. `corpus.limit`:
    shards are kept in order until N rows pass `where`; the shard crossing the limit gets a
    `row_limit` (input rows to read) and later shards are dropped. `staged` gets the path of
    every staged chunk file of the corpus (the limit's left-out inputs' too), to remove them.
    """
    sources = list_sources(corpus, shard_rows)
    fn = partial(staged_inputs, corpus=corpus, staging_dir=staging_dir, shard_rows=shard_rows,
                 chunk_rows=staging.CHUNK_ROWS)  # fmt: skip
    inputs = [parquet for chunks in map_fn(fn, sources) for parquet in chunks]
    if staged is not None and FORMATS[corpus.format].STAGED:
        staged += [parquet.path for parquet in inputs]
    check_column_types(inputs)
    shards = [s for parquet in inputs for s in _split(parquet, shard_rows, committed)]
    return shards if corpus.limit is None else limit_shards(shards, corpus)


def staged_inputs(source: Source, **staging_args: Any) -> list[ParquetInput]:
    """A source's ParquetInputs once staged (`staging.stage_source`'s arguments), in order;
    a chunk staged again (JSONL read line by line, other column types) as staged last."""
    chunks = {p.identity: p for p in staging.stage_source(source, **staging_args)}
    return list(chunks.values())


def input_shards(
    parquet: ParquetInput, shard_rows: int, committed: Collection[str] = frozenset()
) -> list[Shard]:
    """The shards of one Parquet input (see `plan_shards`)."""
    return _split(parquet, shard_rows, committed)


def _split(parquet: ParquetInput, shard_rows: int, committed: Collection[str]) -> list[Shard]:
    """Group consecutive row groups greedily into shards of at most `shard_rows` rows; a
    larger row group (with the empty groups before it) is cut into row ranges, or kept whole
    where `committed` holds it whole (an output of a plan that did not cut row groups: its
    part has those rows once; ranges of it would write them twice)."""
    shards = []
    for g, n in _greedy(parquet.row_group_rows, shard_rows):
        whole = _shard(parquet.path, parquet.identity, g, n, parquet.source)
        if n <= shard_rows:
            shards.append(whole)
            continue
        big = max(g, key=lambda i: parquet.row_group_rows[i])  # the others hold no row
        ranges = _ranges(parquet, big, n, shard_rows)
        if whole.id not in committed:
            shards += ranges
        elif also := [r.id for r in ranges if r.id in committed]:
            raise ValueError(
                f"{parquet.source}: row group {big}: the output holds its rows twice, in part "
                f"{whole.id} (the whole row group) and in part {also[0]} (a row range of it, "
                f"{len(also)} such part{'s' * (len(also) != 1)}): delete the parts of the row "
                f"ranges (part-<shard>.parquet and _errors/part-<shard>.parquet) and run again"
            )  # fmt: skip
        else:
            shards.append(whole)
    return shards


def _greedy(row_group_rows: tuple[int, ...], shard_rows: int) -> list[tuple[tuple[int, ...], int]]:
    """(row groups, rows) of consecutive row groups grouped greedily up to `shard_rows` rows;
    a larger row group is alone (but for empty groups before it); runs without rows left out."""
    groups: list[list[int]] = []
    rows: list[int] = []
    for i, n in enumerate(row_group_rows):
        if not groups or (rows[-1] and rows[-1] + n > shard_rows):
            groups.append([])
            rows.append(0)
        groups[-1].append(i)
        rows[-1] += n
    return [(tuple(g), n) for g, n in zip(groups, rows) if n]


def _ranges(parquet: ParquetInput, group: int, rows: int, shard_rows: int) -> list[Shard]:
    """Row group `group` (`rows` rows) cut into the fewest row ranges of at most `shard_rows`
    rows, balanced: 25,000 rows at 10,000 -> 8,334 + 8,333 + 8,333."""
    k = -(-rows // shard_rows)
    sizes = [rows // k + (i < rows % k) for i in range(k)]
    stops = np.cumsum(sizes).tolist()
    return [
        _shard(parquet.path, parquet.identity, (group,), n, parquet.source, None, stop - n, stop)
        for n, stop in zip(sizes, stops)
    ]


def _shard(
    path: str,
    identity: str,
    row_groups: tuple[int, ...],
    num_rows: int,
    source: str,
    row_limit: int | None = None,
    row_start: int | None = None,
    row_stop: int | None = None,
) -> Shard:
    """A shard and its id; a shard of whole row groups keeps the id it always had."""
    key = [identity, list(row_groups), row_limit]
    if row_start is not None:
        key.append([row_start, row_stop])
    shard_id = digest(key)[:16]
    return Shard(shard_id, path, row_groups, num_rows, source, row_limit, row_start, row_stop)


def idle_actors_warning(shards: list[Shard], actors: int) -> str | None:
    """None when the plan has a shard for every one of `actors`; else what to change. Every
    shard of a plan holds at most `shard_rows` rows (row groups larger are cut into row
    ranges), so shard_rows = rows // actors gives at least `actors` shards, whatever the
    inputs' row groups."""
    if len(shards) >= actors:
        return None
    rows = sum(s.num_rows for s in shards)
    n = len(shards)
    line = (f"the plan has {n:,} shard{'s' * (n != 1)} for {actors:,} actors: {actors - n:,} of "
            f"them would sit idle")  # fmt: skip
    if rows < actors:
        return line + f"; the corpus has {rows:,} rows: at most {rows:,} actors get one"
    return line + f"; run.shard_rows {rows // actors:,} gives each actor a shard"


def limit_shards(shards: list[Shard], corpus: CorpusSpec) -> list[Shard]:
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
            shard = _shard(shard.path, shard.id, shard.row_groups, cut, shard.source, cut,
                           shard.row_start, shard.row_stop)  # fmt: skip
        kept.append(shard)
        break
    return kept


def _passing_rows(shard: Shard, corpus: CorpusSpec) -> np.ndarray:
    """Positions (within the shard) of the rows that pass `where`."""
    if not corpus.where:
        return np.arange(shard.num_rows)
    masks = []
    with open_shard(shard) as pf:
        check_columns(pf.schema_arrow.names, corpus, shard.path)
        for batch in shard_batches(pf, shard, list(corpus.where)):
            masks.append(where_mask(batch, corpus.where, shard.path).to_numpy(zero_copy_only=False))
    return np.flatnonzero(np.concatenate(masks)) if masks else np.arange(0)
