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
from .values import ARROW_ERRORS, missing_ids, plain_values, redact, where_mask


@dataclass(frozen=True)
class RepeatedIds:
    """Ids on more than one input row (rows passing `where`; null ids are error rows)."""

    ids: int  # distinct ids that repeat
    extra_rows: int  # rows beyond the first of each such id
    example: Any  # one of them (the most repeated)
    source: str  # an input holding it


def repeated_ids(
    shards: list[Shard], corpus: CorpusSpec, unreadable: list[str] | None = None
) -> RepeatedIds | None:
    """The ids that occur on more than one row of the shards' inputs, or None. Reads only the
    id column (and `where`'s), so it costs a fraction of a pass over the text.

    A shard whose id or `where` pages cannot be read (a corrupt page behind a good footer)
    is left out of the check and named in `unreadable`: that shard fails when it runs, by
    name, as a corrupt text page fails it; the rest of the job goes on."""
    ids, sources = [], []
    for shard in shards:
        try:
            shard_ids = _shard_ids(shard, corpus)
        except (OSError, *ARROW_ERRORS) as e:
            groups = ",".join(map(str, shard.row_groups))
            line = (f"{shard.source}: row groups {groups}: cannot read the id or where "
                    f"columns ({redact(e)}): that shard will fail")  # fmt: skip
            (unreadable if unreadable is not None else []).append(line)
            continue
        ids += shard_ids
        sources += [shard.source] * len(shard_ids)
    if not ids:
        return None
    every = pa.chunked_array(ids).combine_chunks()
    counts = pc.value_counts(every.filter(pc.invert(missing_ids(every))))  # one type:
    # check_column_types made every input's id column the same
    n = counts.field("counts").to_numpy()
    repeat = np.flatnonzero(n > 1)
    if not len(repeat):
        return None
    top = int(repeat[np.argmax(n[repeat])])
    example = counts.field("values")[top]
    source = next(s for s, a in zip(sources, ids) if pc.any(pc.equal(a, example)).as_py())
    return RepeatedIds(len(repeat), int((n[repeat] - 1).sum()), example.as_py(), source)


def _shard_ids(shard: Shard, corpus: CorpusSpec) -> list[pa.Array]:
    """A shard's ids, per record batch, of the rows passing `where`."""
    ids = []
    columns = list(dict.fromkeys([corpus.id_column, *(corpus.where or {})]))
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
    return ids
