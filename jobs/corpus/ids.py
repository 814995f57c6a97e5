"""Repeated ids: ids on more than one input row, found by reading only the id column."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..fs import filesystem
from ..spec import CorpusSpec
from .units import Shard
from .values import missing_ids, plain_values, where_mask


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
                ids.append(plain_values(batch.column(corpus.id_column)))
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
