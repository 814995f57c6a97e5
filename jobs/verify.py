"""`clinicalbert verify OUT`: re-check a finished output without trusting the job that wrote it.

Every part: readable, the same schema and the same job metadata as the others, its row count
equal to the count its writer put in the footer; its errors part likewise. Across parts: every
note id exactly once (with its window rows once each), no id both written and in the errors
(where the input repeats ids, run.allow_duplicate_ids: the rows repeating an id number as many
as the report says the input holds), no null, NaN or inf in a vector, an MLM log-probability or
a classifier's logits or scores, no malformed entity (a token classifier's).
`_report.json` adds up and matches the parts; `_SUCCESS` is present. Findings are one line
each (never note text); none means the output is whole.

Parts are read batch by batch (parts.open_part), several at once (threads: pyarrow decodes
without the GIL), so memory holds a batch of rows per thread and 8 B per row key: ids are
compared as 64-bit hashes (corpus/idscan.py, as the repeated-id check does), and only the
rows whose hash repeats are read again, their ids compared as they are, for the checks
across parts.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs

from .corpus.idscan import hash_values, mix, picked, repeated_hashes
from .corpus.values import plain_values
from .output import OutputDir
from .parts import STATS_KEY, open_part, part_name
from .reasons import ReasonCode
from .report import Report

PER_PART_KEYS = ("shard", STATS_KEY)  # metadata that differs between parts by design
# checked columns: (name, list depth of finite values; 0: checked by `_malformed`)
CHECKED = (("embedding", 1), ("mlm_top_logprobs", 2), ("class_logits", 1), ("class_scores", 1),
           ("entities", 0), ("text_redacted", 0))  # fmt: skip
THREADS = 8  # parts read at once, at most (and at most one per CPU)
WRITTEN = ReasonCode.UNDECODABLE_VALUE.value  # the errors row of a row that is written


@dataclass
class Seen:
    """What the parts read so far hold, for the checks across parts. `ids` and `error_ids`
    hold only the rows whose hash repeats: every id written or lost twice is among them."""

    schema: pa.Schema | None = None
    meta: dict[str, str] | None = None
    ids: Counter[Any] = field(default_factory=Counter)  # row keys: id, or (id, window_index)
    error_ids: list[Any] = field(default_factory=list)  # one per error row with no output row
    totals: Counter[str] = field(default_factory=Counter)


@dataclass
class PartRows:
    """One part read through, with its errors part: its schema, metadata, row count, per
    checked column its rows with null, NaN or inf (count, first id), its errors part's row
    count, and the hashes compared across parts (sorted): of its row keys, of the ids of its
    rows with no window 0, of its errors part's ids with no output row."""

    schema: pa.Schema
    meta: dict[str, str]
    num_rows: int = 0
    bad: dict[str, tuple[int, Any]] = field(default_factory=dict)
    error_rows: int = 0
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))


def verify_output(path: str) -> list[str]:
    """Findings about the output dir at `path`: [] when it is whole."""
    out = OutputDir(path)
    kind = out.fs.get_file_info(out.root).type
    if kind == pa_fs.FileType.NotFound:
        return ["no such output dir"]
    if kind != pa_fs.FileType.Directory:
        return ["not a directory"]
    shards = sorted(out.committed())
    if not shards:
        return ["no part files"]
    findings: list[str] = []
    seen = Seen()
    with ThreadPoolExecutor(min(THREADS, os.cpu_count() or 1, len(shards))) as pool:
        parts = list(pool.map(partial(_scan, out), shards))
        for shard, part in zip(shards, parts):
            findings += _check_part(shard, part, seen)
        report_findings, report = _check_report(out, seen.totals)
        wanted = repeated_hashes([_hashes(p) for p in parts])
        del parts  # of the hashes, only those that repeat are needed now
        again = [(shards[i], h) for i, h in sorted(wanted.items())]
        for keys, error_ids in pool.map(partial(_repeated_rows, out), again):  # in shard order
            seen.ids.update(keys)
            seen.error_ids += error_ids
    findings += _check_ids(seen, report)
    findings += report_findings
    if foreign := out.foreign():
        findings.append(f"{len(foreign):,} file(s) no job of ours wrote (e.g. {foreign[0]!r}): "
                        "readers of the dir mix them with the output")  # fmt: skip
    if not _exists(out, "_SUCCESS"):
        findings.append("_SUCCESS is missing: the job did not finish every shard")
    return findings


def _scan(out: OutputDir, shard: str) -> PartRows | str:
    """A part and its errors part read through, or the error that made the part unreadable."""
    try:
        part = _read(out, shard)
    except (OSError, pa.ArrowException) as e:
        return type(e).__name__
    part.error_rows, lost = _read_errors(out, shard)
    part.hashes = np.sort(np.concatenate([part.hashes, lost]))
    return part


def _hashes(part: PartRows | str) -> np.ndarray:
    return part.hashes if isinstance(part, PartRows) else np.zeros(0, np.uint64)


def _check_part(shard: str, part: PartRows | str, seen: Seen) -> list[str]:
    """Findings about one part and its errors part; their counts are added to `seen`."""
    name = part_name(shard)
    if isinstance(part, str):
        return [f"{name}: unreadable ({part})"]
    findings: list[str] = []
    stats = json.loads(part.meta.get(STATS_KEY, "null") or "null")
    shared = {k: v for k, v in part.meta.items() if k not in PER_PART_KEYS}
    if seen.schema is None or seen.meta is None:
        seen.schema, seen.meta = part.schema, shared
    else:
        if not part.schema.equals(seen.schema):
            findings.append(f"{name}: schema differs from the other parts")
        if shared != seen.meta:
            meta = seen.meta
            keys = sorted(k for k in set(shared) | set(meta) if shared.get(k) != meta.get(k))
            findings.append(f"{name}: metadata differs from the other parts in {keys}")
    if part.meta.get("shard") != shard:
        findings.append(f"{name}: footer names shard {part.meta.get('shard')!r}")
    if not isinstance(stats, dict):
        findings.append(f"{name}: no shard counts in the footer")
        stats = {}
    want = stats.get("output_rows") or stats.get("rows_out")
    if want is not None and part.num_rows != want:
        findings.append(f"{name}: {part.num_rows} rows, its footer says {want}")
    for column, _ in CHECKED:
        if column in part.bad:
            n, first = part.bad[column]
            what = "null, NaN or inf" if dict(CHECKED)[column] else "a null or malformed value"
            findings.append(f"{name}: {n} rows with {what} in {column}, e.g. id {first!r}")
    for key in ("rows_in", "rows_out", "error_rows", "filtered_rows"):
        seen.totals[key] += int(stats.get(key, 0))
    return findings + _check_errors(shard, stats, part.error_rows)


def _read(out: OutputDir, shard: str) -> PartRows:
    """A part read batch by batch: the hashes of its row keys (and of the ids of its rows with
    no window 0) and its rows whose checked columns hold null, NaN or inf."""
    with open_part(out.fs, out.part_path(shard)) as f:
        part = PartRows(f.schema, f.metadata)
        keys, ids = [], []
        for batch in f.batches():
            batch_ids, batch_keys = _row_hashes(batch)
            keys.append(batch_keys)
            ids.append(batch_ids[batch_ids != batch_keys])  # rows of a window but the first
            for column, depth in CHECKED:
                if column not in batch.schema.names:
                    continue
                bad = _not_finite(batch[column], depth) if depth else _malformed(batch[column])
                if bad.any():
                    first = batch["id"][int(np.flatnonzero(bad)[0])].as_py()
                    n, first = part.bad.get(column, (0, first))
                    part.bad[column] = (n + int(bad.sum()), first)
            part.num_rows += batch.num_rows
    every = np.concatenate([np.zeros(0, np.uint64), *keys])
    orphans = np.setdiff1d(np.concatenate([np.zeros(0, np.uint64), *ids]), every)
    part.hashes = np.concatenate([every, orphans])  # an id with no window 0 once, as written
    return part


def _malformed(values: pa.Array) -> np.ndarray:
    """bool[rows]: null `text_redacted`, or `entities` null or holding an entity that is not a
    span (0 <= start < end) with a label and a score in [0, 1]."""
    bad = values.is_null().to_numpy(zero_copy_only=False)
    if not pa.types.is_list(values.type):
        return bad
    flat, rows = pc.list_flatten(values), pc.list_parent_indices(values).to_numpy()
    field_ = lambda name: pc.struct_field(flat, name)  # noqa: E731
    start = pc.fill_null(field_("start"), -1).to_numpy()
    end = pc.fill_null(field_("end"), -1).to_numpy()
    score = pc.fill_null(field_("score"), np.nan).to_numpy(zero_copy_only=False)
    wrong = (start < 0) | (end <= start) | ~((score >= 0) & (score <= 1))
    wrong |= field_("label").is_null().to_numpy(zero_copy_only=False)
    bad[rows[wrong]] = True
    return bad


def _row_hashes(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(the hashes of the rows' ids, of their keys): a key is the id, or (id, window_index)
    for window rows, whose key hashes as its id in window 0."""
    ids = hash_values(batch["id"])
    if "window_index" not in batch.schema.names:
        return ids, ids
    window = pc.fill_null(batch["window_index"], 0).to_numpy().astype(np.uint64)
    return ids, np.where(window == 0, ids, mix(ids ^ mix(window)))


def _repeated_rows(out: OutputDir, item: tuple[str, np.ndarray]) -> tuple[list[Any], list[Any]]:
    """A part's rows whose id or key hash is among `wanted`, read again: (their keys, the ids
    of its errors part's rows with no output row among them)."""
    shard, wanted = item
    keys: list[Any] = []
    with open_part(out.fs, out.part_path(shard)) as f:
        columns = [c for c in ("id", "window_index") if c in f.schema.names]
        for batch in f.parquet.iter_batches(columns=columns):
            ids, row_keys = _row_hashes(batch)
            batch = batch.filter(picked(ids, wanted) | picked(row_keys, wanted))
            some = batch["id"].to_pylist()
            keys += list(zip(some, batch["window_index"].to_pylist())) if len(columns) > 1 else some
    error_ids: list[Any] = []
    for lost, _ in _lost_rows(out, shard):
        error_ids += lost.filter(picked(hash_values(lost), wanted)).to_pylist()
    return keys, error_ids


def _not_finite(values: pa.Array, depth: int) -> np.ndarray:
    """bool[rows]: the rows of `values` (lists `depth` deep) that are null or hold a null,
    NaN or inf value."""
    bad = (
        np.zeros(len(values), bool)
        if values.null_count == 0
        else ~values.is_valid().to_numpy(False)
    )
    owner = np.arange(len(values))
    for _ in range(depth):  # each value's output row, through the list levels
        lists = values
        counts = pc.list_value_length(lists).fill_null(0).to_numpy()
        owner = np.repeat(owner, counts)
        values = pc.list_flatten(lists)
    finite = pc.is_finite(values).fill_null(False).to_numpy(False)
    bad[owner[~finite]] = True
    return bad


def _check_errors(shard: str, stats: dict[str, Any], n_errors: int) -> list[str]:
    """Findings about a part's errors part (`n_errors` rows)."""
    want_errors = stats.get("error_rows", 0) + sum((stats.get("nulled") or {}).values())
    if n_errors != want_errors:
        return [
            f"_errors/{part_name(shard)}: {n_errors} rows, the part's footer says {want_errors}"
        ]
    return []


def _read_errors(out: OutputDir, shard: str) -> tuple[int, np.ndarray]:
    """A part's errors part read batch by batch: its row count (0 when it has none) and the
    hashes of the ids of its rows with no output row."""
    rows, lost = 0, [np.zeros(0, np.uint64)]
    for ids, n in _lost_rows(out, shard):
        rows += n
        lost.append(hash_values(ids))
    return rows, np.concatenate(lost)


def _lost_rows(out: OutputDir, shard: str) -> Iterator[tuple[pa.Array, int]]:
    """A part's errors part batch by batch: the ids of its rows with no output row (a nulled
    kept value is written; null ids left out), and the batch's row count; nothing when absent."""
    try:
        with open_part(out.fs, out.errors_path(shard)) as f:
            for batch in f.parquet.iter_batches(columns=["id", "reason"]):
                written = pc.equal(plain_values(batch["reason"]), WRITTEN).fill_null(False)
                lost = pc.and_(pc.invert(written), pc.is_valid(batch["id"]))
                yield batch["id"].filter(lost), batch.num_rows
    except FileNotFoundError:  # no errors part: no error row
        return


def _check_ids(seen: Seen, report: Report | None) -> list[str]:
    """Findings about the ids across parts: written once, never both written and an error;
    where the input repeats ids, as many repeats as the report says."""
    ids, error_ids = seen.ids, seen.error_ids
    repeats = (report.repeated_ids or {}).get("extra_rows", 0) if report else 0
    findings = []
    if repeats:  # the input repeats ids (run.allow_duplicate_ids): count the repeats instead
        notes = Counter[Any]()
        for k, n in ids.items():  # a note's rows: its one row, or its window 0
            if not isinstance(k, tuple) or k[1] == 0:
                notes[k[0] if isinstance(k, tuple) else k] += n
        notes.update(i for i in error_ids if i is not None)
        extra = sum(n - 1 for n in notes.values() if n > 1)
        if extra != repeats:
            findings.append(
                f"{extra} rows repeat an id, the report says the input repeats {repeats}"
            )
    else:
        dupes = [k for k, n in ids.items() if n > 1]
        if dupes:
            findings.append(f"{len(dupes)} ids written more than once, e.g. {dupes[0]!r}")
        written = {k[0] if isinstance(k, tuple) else k for k in ids}
        both = sorted((written & set(error_ids)) - {None}, key=str)
        if both:
            findings.append(f"{len(both)} ids both written and in the errors, e.g. {both[0]!r}")
    return findings


def _check_report(out: OutputDir, totals: Counter[str]) -> tuple[list[str], Report | None]:
    """Findings about `_report.json`, and the report when it could be read."""
    try:
        raw = out.read_json("_report.json")
    except ValueError as e:
        return [str(e)], None
    if raw is None:
        return ["_report.json is missing"], None
    try:
        report = Report.from_json(raw)
        report.check()
    except (TypeError, ValueError) as e:
        return [f"_report.json: {e}"], None
    return [
        f"_report.json: {key} {getattr(report, key)}, the parts' footers sum to {totals[key]}"
        for key in ("rows_in", "rows_out", "error_rows", "filtered_rows")
        if getattr(report, key) != totals[key]
    ], report


def _exists(out: OutputDir, name: str) -> bool:
    return out.fs.get_file_info(out.join(name)).type == pa_fs.FileType.File
