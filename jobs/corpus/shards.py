"""Shard planning and reading: a `Shard` is a deterministic slice of one Parquet file, a run of
its row groups, optionally cut at `row_limit` rows (only for `corpus.limit`).

Pure functions, no Ray: the driver passes its own `map_fn` to `plan_shards` to stage sources in
parallel tasks, and actors call `read_shard`. Nothing here logs or raises with note text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..fs import filesystem
from ..spec import CorpusSpec
from . import staging
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
    fn = partial(
        staging.stage_source, corpus=corpus, staging_dir=staging_dir, shard_rows=shard_rows
    )
    inputs = list(map_fn(fn, sources))
    check_column_types(inputs)
    shards = [s for parquet in inputs for s in _split(parquet, shard_rows)]
    return shards if corpus.limit is None else limit_shards(shards, corpus)


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
    shard_id = digest([identity, list(row_groups), row_limit])[:16]
    return Shard(shard_id, path, row_groups, num_rows, source, row_limit)


def idle_actors_warning(shards: list[Shard], actors: int) -> str | None:
    """None when the plan has a shard for every one of `actors`; else what to change. A shard
    is never smaller than a Parquet row group, so where the row groups are larger than the
    shard_rows that would fill the actors, the files' row groups are what to change."""
    if len(shards) >= actors:
        return None
    rows = sum(s.num_rows for s in shards)
    fill = max(1, rows // actors)
    n = len(shards)
    line = (f"the plan has {n:,} shard{'s' * (n != 1)} for {actors:,} actors: {actors - n:,} of "
            f"them would sit idle; run.shard_rows {fill:,} gives each actor a shard")  # fmt: skip
    largest = max((s.num_rows for s in shards if len(s.row_groups) == 1), default=0)
    if largest > fill:
        line += (f", but a shard is at least one Parquet row group and the inputs have row "
                 f"groups of up to {largest:,} rows: write them with smaller row groups "
                 f"(pyarrow's row_group_size)")  # fmt: skip
    return line


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
            shard = _shard(shard.path, shard.id, shard.row_groups, cut, shard.source, cut)
        kept.append(shard)
        break
    return kept


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
