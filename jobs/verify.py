"""`clinicalbert verify OUT`: re-check a finished output without trusting the job that wrote it.

Every part: readable, the same schema and the same job metadata as the others, its row count
equal to the count its writer put in the footer; its errors part likewise. Across parts: every
note id exactly once (with its window rows once each), no id both written and in the errors
(where the input repeats ids, run.allow_duplicate_ids: the rows repeating an id number as many
as the report says the input holds), no null, NaN or inf in a vector or an MLM log-probability.
`_report.json` adds up and matches the parts; `_SUCCESS` is present. Findings are one line
each (never note text); none means the output is whole.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from .output import STATS_KEY, OutputDir, ReasonCode, Report

PER_PART_KEYS = ("shard", STATS_KEY)  # metadata that differs between parts by design


def verify_output(path: str) -> list[str]:
    """Findings about the output dir at `path`: [] when it is whole."""
    out = OutputDir(path)
    findings: list[str] = []
    kind = out.fs.get_file_info(out.root).type
    if kind == pa_fs.FileType.NotFound:
        return ["no such output dir"]
    if kind != pa_fs.FileType.Directory:
        return ["not a directory"]
    shards = sorted(out.committed())
    if not shards:
        return ["no part files"]
    schema: pa.Schema | None = None
    meta: dict[str, str] | None = None
    ids: Counter[Any] = Counter()
    error_ids: list[Any] = []  # one per error row with no output row
    totals = Counter[str]()
    for shard in shards:
        name = f"part-{shard}.parquet"
        try:
            with out.fs.open_input_file(out.part_path(shard)) as f:
                parquet = pq.ParquetFile(f)
                table, footer = parquet.read(), parquet.metadata.metadata or {}
        except (OSError, pa.ArrowException) as e:
            findings.append(f"{name}: unreadable ({type(e).__name__})")
            continue
        part_meta = {
            k.decode(): v.decode() for k, v in footer.items() if not k.startswith(b"ARROW:")
        }
        stats = json.loads(part_meta.get(STATS_KEY, "null") or "null")
        shared = {k: v for k, v in part_meta.items() if k not in PER_PART_KEYS}
        bare = table.schema.remove_metadata()
        if schema is None:
            schema, meta = bare, shared
        else:
            if not bare.equals(schema):
                findings.append(f"{name}: schema differs from the other parts")
            if shared != meta:
                keys = sorted(k for k in set(shared) | set(meta) if shared.get(k) != meta.get(k))
                findings.append(f"{name}: metadata differs from the other parts in {keys}")
        if part_meta.get("shard") != shard:
            findings.append(f"{name}: footer names shard {part_meta.get('shard')!r}")
        if not isinstance(stats, dict):
            findings.append(f"{name}: no shard counts in the footer")
            stats = {}
        want = stats.get("output_rows") or stats.get("rows_out")
        if want is not None and table.num_rows != want:
            findings.append(f"{name}: {table.num_rows} rows, its footer says {want}")
        findings += _non_finite(name, table)
        keys = table["id"].to_pylist()
        if "window_index" in table.column_names:
            keys = list(zip(keys, table["window_index"].to_pylist()))
        ids.update(keys)
        for key in ("rows_in", "rows_out", "error_rows", "filtered_rows"):
            totals[key] += int(stats.get(key, 0))
        errors = _read(out, out.errors_path(shard))
        want_errors = stats.get("error_rows", 0) + sum((stats.get("nulled") or {}).values())
        n_errors = 0 if errors is None else errors.num_rows
        if n_errors != want_errors:
            findings.append(
                f"_errors/{name}: {n_errors} rows, the part's footer says {want_errors}"
            )
        if errors is not None:  # rows with no output row (a nulled kept value is written)
            lost = [r != ReasonCode.UNDECODABLE_VALUE.value for r in errors["reason"].to_pylist()]
            error_ids += [i for i, x in zip(errors["id"].to_pylist(), lost) if x]
    report_findings, report = _check_report(out, totals)
    repeats = (report.repeated_ids or {}).get("extra_rows", 0) if report else 0
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
    findings += report_findings
    if not _exists(out, "_SUCCESS"):
        findings.append("_SUCCESS is missing: the job did not finish every shard")
    return findings


def _non_finite(name: str, table: pa.Table) -> list[str]:
    """A finding per output column with null, NaN or inf values (vectors, MLM log-probs)."""
    findings = []
    for column, depth in (("embedding", 1), ("mlm_top_logprobs", 2)):
        if column not in table.column_names:
            continue
        values = table[column].combine_chunks()
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
        if bad.any():
            first = table["id"][int(np.flatnonzero(bad)[0])].as_py()
            findings.append(
                f"{name}: {int(bad.sum())} rows with null, NaN or inf in {column}, "
                f"e.g. id {first!r}"
            )
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


def _read(out: OutputDir, path: str) -> pa.Table | None:
    try:
        with out.fs.open_input_file(path) as f:
            return pq.read_table(f)
    except FileNotFoundError:
        return None


def _exists(out: OutputDir, name: str) -> bool:
    return out.fs.get_file_info(f"{out.root}/{name}").type == pa_fs.FileType.File
