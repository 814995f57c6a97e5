"""Repeated ids: ids on more than one input row, found by reading only the id column.

Each input file's ids are hashed where its task runs (`map_fn`: the driver's Ray tasks, in
parallel): the caller holds 8 B per id, the hashes that repeat are found a bucket at a time
(idscan.py), and only the ids behind them are read again and compared, so two ids sharing a
hash are never a repeat. A verdict is a function of the shards' ids (file identities, row
groups) and of `id_column` and `where`: `verdict_key`, and `verdict_json`/`cached_verdict` to
keep it, let a resume over an unchanged corpus skip the scan.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..spec import CorpusSpec
from .idscan import hash_values, picked, repeated_hashes
from .shards import open_shard, shard_batches
from .units import Shard, digest
from .values import ARROW_ERRORS, missing_ids, plain_values, redact, where_mask

VERDICT_VERSION = 1  # bump when what counts as a repeated id changes: kept verdicts go stale
COUNTS = pa.struct([("values", pa.null()), ("counts", pa.int64())])  # pc.value_counts of nothing
MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class RepeatedIds:
    """Ids on more than one input row (rows passing `where`; null ids are error rows)."""

    ids: int  # distinct ids that repeat
    extra_rows: int  # rows beyond the first of each such id
    example: Any  # one of them (the most repeated)
    source: str  # an input holding it


@dataclass(frozen=True)
class FileIds:
    """What one input file's task sends back: its ids' hashes, sorted (8 B an id), the shards
    it read, and a line for each shard whose id or `where` pages it could not read."""

    hashes: np.ndarray
    read: tuple[Shard, ...]
    unreadable: tuple[str, ...]


@dataclass(frozen=True)
class FileCounts:
    """What one input file's second task sends back: its ids whose hash repeats, each with
    its row count (columns id, n; in order of first appearance), and the lines of the shards
    it could not read this time."""

    counts: pa.Table
    unreadable: tuple[str, ...]


def repeated_ids(
    shards: list[Shard],
    corpus: CorpusSpec,
    unreadable: list[str] | None = None,
    map_fn: MapFn = map,
) -> RepeatedIds | None:
    """The ids that occur on more than one row of the shards' inputs, or None. Reads only the
    id column (and `where`'s), so it costs a fraction of a pass over the text; `map_fn` runs
    one task per input file (the builtin `map`, or the driver's Ray tasks; results in order).

    A shard whose id or `where` pages cannot be read (a corrupt page behind a good footer)
    is left out of the check and named in `unreadable`: that shard fails when it runs, by
    name, as a corrupt text page fails it; the rest of the job goes on."""
    lines = unreadable if unreadable is not None else []
    files = _by_file(shards)
    scans: list[FileIds] = list(map_fn(partial(file_ids, corpus=corpus), files))
    lines += [line for scan in scans for line in scan.unreadable]
    wanted = repeated_hashes([scan.hashes for scan in scans])
    if not wanted:
        return None
    again = [(scans[i].read, hashes) for i, hashes in sorted(wanted.items())]
    del scans  # of the hashes, only those that repeat are needed now
    counts: list[FileCounts] = list(map_fn(partial(file_counts, corpus=corpus), again))
    lines += [line for c in counts for line in c.unreadable]
    return _repeats([c.counts for c in counts], [read[0].source for read, _ in again])


def _repeats(counts: list[pa.Table], sources: list[str]) -> RepeatedIds | None:
    """The ids counted more than once over the files' `counts` (the ids whose hash repeats,
    with their row counts, in file order; `sources`: each file's input), or None."""
    every = pa.concat_tables(counts, promote_options="default").combine_chunks()
    if not every.num_rows:  # the files changed since their ids were hashed
        return None
    totals = every.group_by("id", use_threads=False).aggregate([("n", "sum")])
    n = totals["n_sum"].to_numpy()  # ids in order of first appearance, as in the input
    repeat = np.flatnonzero(n > 1)
    if not len(repeat):
        return None  # hashes shared by distinct ids only
    top = int(repeat[np.argmax(n[repeat])])
    example = totals["id"][top]
    file = np.repeat(np.arange(len(counts)), [c.num_rows for c in counts])
    first = np.flatnonzero(pc.equal(every["id"], example).to_numpy(zero_copy_only=False))[0]
    return RepeatedIds(len(repeat), int((n[repeat] - 1).sum()), example.as_py(),
                       sources[file[first]])  # fmt: skip


def _by_file(shards: list[Shard]) -> list[tuple[Shard, ...]]:
    """The shards grouped by the file they read, in plan order (a file's shards are
    consecutive): one task per file."""
    files: dict[str, list[Shard]] = {}
    for shard in shards:
        files.setdefault(shard.path, []).append(shard)
    return [tuple(group) for group in files.values()]


def file_ids(shards: tuple[Shard, ...], corpus: CorpusSpec) -> FileIds:
    """One file's task: the hashes of its shards' ids (rows passing `where`, null ids left
    out), sorted."""
    unreadable: list[str] = []
    read, hashes = _each_shard(_runs(shards), corpus, hash_values, unreadable)
    every = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    every.sort()
    return FileIds(every, read, tuple(unreadable))


def file_counts(item: tuple[tuple[Shard, ...], np.ndarray], corpus: CorpusSpec) -> FileCounts:
    """One file's second task: its ids whose hash is among `wanted`, with their row counts."""
    shards, wanted = item
    unreadable: list[str] = []
    _, ids = _each_shard(shards, corpus, lambda a: a.filter(picked(hash_values(a), wanted)),
                         unreadable)  # fmt: skip
    counts = pc.value_counts(pa.chunked_array(ids)) if ids else pa.array([], COUNTS)
    table = pa.table({"id": counts.field("values"), "n": counts.field("counts")})
    return FileCounts(table, tuple(unreadable))


def _each_shard(
    shards: Iterable[Shard],
    corpus: CorpusSpec,
    fn: Callable[[pa.Array], Any],
    unreadable: list[str],
) -> tuple[tuple[Shard, ...], list[Any]]:
    """(the shards read, `fn` of each batch of their ids); a shard that cannot be read is
    left out whole and named in `unreadable`."""
    read, out = [], []
    for shard in shards:
        try:
            out += [fn(ids) for ids in _shard_ids(shard, corpus)]
        except (OSError, *ARROW_ERRORS) as e:
            groups = ",".join(map(str, shard.row_groups))
            unreadable.append(f"{shard.source}: row groups {groups}: cannot read the id or where "
                              f"columns ({redact(e)}): that shard will fail")  # fmt: skip
            continue
        read.append(shard)
    return tuple(read), out


def _shard_ids(shard: Shard, corpus: CorpusSpec) -> Iterator[pa.Array]:
    """A shard's ids, per record batch, of the rows passing `where`, null ids left out."""
    columns = list(dict.fromkeys([corpus.id_column, *(corpus.where or {})]))
    with open_shard(shard) as pf:
        for batch in shard_batches(pf, shard, columns):
            if corpus.where:
                batch = batch.filter(where_mask(batch, corpus.where, shard.path))
            ids = plain_values(batch.column(corpus.id_column))
            yield ids.filter(pc.invert(missing_ids(ids)))


def _runs(shards: tuple[Shard, ...]) -> list[Shard]:
    """A file's shards with consecutive row ranges of one row group as one range: its ids
    are decoded once, not once per range (a range decodes the group's rows before it)."""
    runs: list[Shard] = []
    for shard in shards:
        last = runs[-1] if runs else None
        if (last is not None and shard.row_start is not None and last.row_start is not None
                and last.row_groups == shard.row_groups
                and last.row_start + last.num_rows == shard.row_start):  # fmt: skip
            shard = replace(last, num_rows=last.num_rows + shard.num_rows, row_stop=shard.row_stop)
            runs[-1] = shard
        else:
            runs.append(shard)
    return runs


def verdict_key(shards: list[Shard], corpus: CorpusSpec) -> str:
    """What a repeated-id verdict depends on: the shards' ids (file identities, row groups,
    ranges, limits; in plan order) and the id and `where` settings."""
    ids = [s.id for s in shards]
    return digest([VERDICT_VERSION, ids, corpus.format, corpus.id_column, corpus.where])


def verdict_json(key: str, repeated: RepeatedIds | None, shards: list[Shard]) -> dict | None:
    """A verdict to keep, or None for one that cannot be kept (its example id is no JSON
    value). The file holding the example is kept as its first shard's id: a corpus mounted
    elsewhere keeps its shard ids and is named where it is now."""
    if repeated is None:
        return {"key": key, "repeated": None}
    example = repeated.example
    try:
        if type(json.loads(json.dumps(example))) is not type(example):
            return None
    except TypeError:  # bytes, a decimal, a timestamp
        return None
    shard = next(s.id for s in shards if s.source == repeated.source)
    counts = {"ids": repeated.ids, "extra_rows": repeated.extra_rows}
    return {"key": key, "repeated": {**counts, "example": example, "shard": shard}}


def cached_verdict(kept: Any, key: str, shards: list[Shard]) -> tuple[bool, RepeatedIds | None]:
    """(found, verdict): the verdict `kept` holds when it was reached for `key`."""
    if not isinstance(kept, dict) or kept.get("key") != key or "repeated" not in kept:
        return False, None
    found = kept["repeated"]
    if found is None:
        return True, None
    if not isinstance(found, dict) or not {"ids", "extra_rows", "example"} <= found.keys():
        return False, None
    source = next((s.source for s in shards if s.id == found.get("shard")), None)
    if source is None:
        return False, None
    return True, RepeatedIds(found["ids"], found["extra_rows"], found["example"], source)
