"""`clinicalbert verify OUT`: re-check a finished output without trusting the job that wrote it.

Every part: readable, the same schema and the same job metadata as the others, its row count
equal to the count its writer put in the footer; its errors part likewise. Across parts: every
note id exactly once (with its window rows once each), no id both written and in the errors
(where the input repeats ids, run.allow_duplicate_ids: the rows repeating an id number as many
as the report says the input holds), no null, NaN or inf in a vector or an MLM log-probability.
`_report.json` adds up and matches the parts; `_SUCCESS` is present. Findings are one line
each (never note text); none means the output is whole. Parts are read batch by batch
(parts.open_part): memory holds one batch of rows, and the ids.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs

from .output import OutputDir
from .parts import STATS_KEY, open_part, part_name, read_part
from .reasons import ReasonCode
from .report import Report

PER_PART_KEYS = ("shard", STATS_KEY)  # metadata that differs between parts by design
# finite columns: (name, list depth)
CHECKED = (("embedding", 1), ("mlm_top_logprobs", 2), ("class_logits", 1), ("class_scores", 1))


@dataclass
class Seen:
    """What the parts read so far hold, for the checks across parts."""

    schema: pa.Schema | None = None
    meta: dict[str, str] | None = None
    ids: Counter[Any] = field(default_factory=Counter)
    error_ids: list[Any] = field(default_factory=list)  # one per error row with no output row
    totals: Counter[str] = field(default_factory=Counter)


@dataclass
class PartRows:
    """One part read through: its schema, metadata, row count, row keys and, per checked
    column, its rows with null, NaN or inf (count, first id)."""

    schema: pa.Schema
    meta: dict[str, str]
    num_rows: int = 0
    keys: list[Any] = field(default_factory=list)
    bad: dict[str, tuple[int, Any]] = field(default_factory=dict)


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
    for shard in shards:
        findings += _check_part(out, shard, seen)
    report_findings, report = _check_report(out, seen.totals)
    findings += _check_ids(seen, report)
    findings += report_findings
    if foreign := out.foreign():
        findings.append(f"{len(foreign):,} file(s) no job of ours wrote (e.g. {foreign[0]!r}): "
                        "readers of the dir mix them with the output")  # fmt: skip
    if not _exists(out, "_SUCCESS"):
        findings.append("_SUCCESS is missing: the job did not finish every shard")
    return findings


def _check_part(out: OutputDir, shard: str, seen: Seen) -> list[str]:
    """Findings about one part and its errors part; what they hold is added to `seen`."""
    name = part_name(shard)
    try:
        part = _read(out, shard)
    except (OSError, pa.ArrowException) as e:
        return [f"{name}: unreadable ({type(e).__name__})"]
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
            findings.append(
                f"{name}: {n} rows with null, NaN or inf in {column}, e.g. id {first!r}"
            )
    seen.ids.update(part.keys)
    for key in ("rows_in", "rows_out", "error_rows", "filtered_rows"):
        seen.totals[key] += int(stats.get(key, 0))
    return findings + _check_errors(out, shard, stats, seen)


def _read(out: OutputDir, shard: str) -> PartRows:
    """A part read batch by batch: its row keys (id, or (id, window_index) for window rows)
    and its rows whose checked columns hold null, NaN or inf."""
    with open_part(out.fs, out.part_path(shard)) as f:
        part = PartRows(f.schema, f.metadata)
        for batch in f.batches():
            keys = batch["id"].to_pylist()
            if "window_index" in batch.schema.names:
                keys = list(zip(keys, batch["window_index"].to_pylist()))
            part.keys += keys
            for column, depth in CHECKED:
                if column not in batch.schema.names:
                    continue
                bad = _not_finite(batch[column], depth)
                if bad.any():
                    first = batch["id"][int(np.flatnonzero(bad)[0])].as_py()
                    n, first = part.bad.get(column, (0, first))
                    part.bad[column] = (n + int(bad.sum()), first)
            part.num_rows += batch.num_rows
    return part


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


def _check_errors(out: OutputDir, shard: str, stats: dict[str, Any], seen: Seen) -> list[str]:
    """Findings about a part's errors part; its ids with no output row go to `seen`."""
    errors = read_part(out.fs, out.errors_path(shard))
    want_errors = stats.get("error_rows", 0) + sum((stats.get("nulled") or {}).values())
    n_errors = 0 if errors is None else errors.num_rows
    findings = []
    if n_errors != want_errors:
        findings.append(
            f"_errors/{part_name(shard)}: {n_errors} rows, the part's footer says {want_errors}"
        )
    if errors is not None:  # rows with no output row (a nulled kept value is written)
        lost = [r != ReasonCode.UNDECODABLE_VALUE.value for r in errors["reason"].to_pylist()]
        seen.error_ids += [i for i, x in zip(errors["id"].to_pylist(), lost) if x]
    return findings


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
