"""JSONL inputs (plain or compressed): one JSON object per line, staged into Parquet.

pyarrow reads the file whole; a file it cannot read (a line that is not JSON, a column whose
JSON type changes) is read again line by line, each such line an error row.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.json as pa_json

from ..fs import filesystem
from ..reasons import ReasonCode
from ..spec import CorpusSpec
from . import textfile
from .textfile import StartOver, unreadable
from .units import Source
from .values import ARROW_ERRORS, ROW_REASON, check_columns, redact

STAGED = True  # staged into Parquet before sharding
NOTE_PER_FILE = False  # a file holds many notes, one per line
JSONL_HEAD_LINES = 1000  # lines preflight reads at most to find a JSONL file's columns
JSONL_LINES_PER_BATCH = 4096


def columns(source: Source, corpus: CorpusSpec) -> list[str]:
    """The columns of one JSONL file, read cheaply (no note is parsed): the keys of its first
    line that is a JSON object (broken lines before it are error rows when the job runs, not
    a reason to refuse the file)."""
    fs, path = filesystem(source.path)
    with fs.open_input_stream(path, compression="detect") as f:
        lines = (line for line in textfile.lines(f, source.path) if line.strip())
        seen = 0
        for line in islice(lines, JSONL_HEAD_LINES):
            seen += 1
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError:  # not UTF-8, not JSON: an error row of its own
                continue
            if isinstance(record, dict):
                return list(record)
    if seen:
        raise ValueError(
            f"{source.path}: none of its first {seen:,} lines is a JSON object (JSONL holds "
            "one object per line: a JSON array or pretty-printed JSON is not JSONL)"
        )
    return []


def batches(source: Source, corpus: CorpusSpec) -> Iterator[pa.RecordBatch]:
    """Stream a jsonl file as record batches of the columns the corpus reads. A file pyarrow
    cannot read whole raises `StartOver` with its lines read one by one (`_by_line`)."""
    if source.size == 0:  # an empty file is zero rows
        return
    columns = list(corpus.read_columns())
    fs, path = filesystem(source.path)
    try:
        if not _starts_with_object(fs, path, source.path):  # pyarrow would refuse it anyway
            raise pa.ArrowInvalid("the first value is not a JSON object")
        for batch in _reader(fs, path, source.path, corpus, columns):
            yield batch.select(columns)
    except (OSError, UnicodeError, *ARROW_ERRORS) as e:  # OSError: a truncated or corrupt .gz
        if isinstance(e, pa.ArrowInvalid):  # staging reads it line by line then
            # pyarrow counts rows per block, so name the line itself
            line = _first_bad_line(fs, path, columns) or redact(e)
            whole = f"{source.path}: cannot read as jsonl: {line}"
            raise StartOver(whole, _by_line(source, corpus, whole)) from None
        raise unreadable(source.path, "jsonl", e) from None


def sample(
    source: Source, corpus: CorpusSpec, columns: list[str], rows: int
) -> pa.RecordBatch | None:
    """None: preflight samples no JSONL file for `where` (the job reports what matches)."""
    return None


def columns_hint(corpus: CorpusSpec, names: list[str]) -> str:
    """'': a JSONL file's keys suggest nothing about a column it lacks."""
    return ""


def _starts_with_object(fs: pa_fs.FileSystem, path: str, name: str) -> bool:
    """Whether the file's first non-blank line starts a JSON object, as pyarrow needs (and
    pyarrow 26 crashes, SIGSEGV, on a file whose first value is null)."""
    with fs.open_input_stream(path, compression="detect") as f:
        first = next((line for line in textfile.lines(f, name) if line.strip()), b"{")
    return first.lstrip().startswith(b"{")


def _reader(
    fs: pa_fs.FileSystem, path: str, name: str, corpus: CorpusSpec, columns: list[str]
) -> Iterator[pa.RecordBatch]:
    read = pa_json.ReadOptions(block_size=textfile.INFER_BLOCK_BYTES)
    with fs.open_input_stream(path, compression="detect") as f:
        schema = pa_json.open_json(f, read_options=read).schema
    check_columns(schema.names, corpus, name)
    nulls = [pa.field(c, pa.string()) for c in columns if schema.field(c).type == pa.null()]
    parse = pa_json.ParseOptions(explicit_schema=pa.schema(nulls) if nulls else None)
    with fs.open_input_stream(path, compression="detect") as f:
        yield from pa_json.open_json(f, read_options=read, parse_options=parse)


_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object"}  # fmt: skip


def _first_bad_line(fs: pa_fs.FileSystem, path: str, columns: list[str]) -> str | None:
    """The first line of a JSONL file that is not a JSON object, or whose value of a read
    column has another JSON type than on the first line holding one, as one line that names
    the line and column (never a value); None when every line is consistent."""
    kinds: dict[str, tuple[str, int]] = {}
    with fs.open_input_stream(path, compression="detect") as f:
        for number, raw in enumerate(
            io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace"), 1
        ):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                return f"line {number:,} is not valid JSON"
            if not isinstance(record, dict):
                return f"line {number:,} is not a JSON object"
            for column in columns:
                value = record.get(column)
                if value is None:
                    continue
                kind = _JSON_KINDS.get(type(value), type(value).__name__)
                first = kinds.setdefault(column, (kind, number))
                if first[0] != kind:
                    return (f"line {number:,}: {column!r} is {kind}, where line {first[1]:,} "
                            f"has {first[0]}")  # fmt: skip
    return None


class _JsonObject(dict):
    """A JSON object, with the keys it gives more than once (json.loads keeps the last value
    silently: which one the writer meant is unknown)."""

    twice: frozenset[str] = frozenset()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    record = _JsonObject(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        record.twice = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return record


def _json_lines(
    fs: pa_fs.FileSystem, path: str, columns: list[str]
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """(record, None) per non-blank line that is a JSON object, else ({}, its reason):
    `not_json` (also for an object that gives one of `columns` twice), or `undecodable` for a
    line that is not UTF-8 or a value of `columns` that escapes half a surrogate pair."""
    with fs.open_input_stream(path, compression="detect") as f:
        for raw in io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape"):
            if not raw.strip():
                continue
            try:
                raw.encode("utf-8")
            except UnicodeEncodeError:
                yield {}, ReasonCode.UNDECODABLE
                continue
            try:
                record = json.loads(raw, object_pairs_hook=_json_object)
            except ValueError:
                record = None
            if not isinstance(record, dict) or record.twice.intersection(columns):
                yield {}, ReasonCode.NOT_JSON
            elif not _utf8(record, columns):  # a lone surrogate escape, "\ud800"
                yield {}, ReasonCode.UNDECODABLE
            else:
                yield record, None


def _utf8(record: dict[str, Any], columns: list[str]) -> bool:
    """Every string value of `columns` is UTF-8 (JSON's \\u escapes can spell half a
    surrogate pair, which no UTF-8 text holds)."""
    try:
        for value in (record.get(c) for c in columns):
            if isinstance(value, str):
                value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _by_line(source: Source, corpus: CorpusSpec, whole_error: str) -> Iterator[pa.RecordBatch]:
    """A JSONL file read line by line. A line that is not a JSON object, or whose id, kept or
    `where` value has another JSON type than that column's (the first value's), is a row of
    nulls with reason `not_json`; a text that is not a string, reason `not_text`; a line that
    is not UTF-8, `undecodable`. The rest read as pyarrow would (numbers: int64 unless a
    float occurs). Two passes: the column types, then the rows. A column whose first value is
    a list or an object is not read this way: `whole_error` is raised instead."""
    columns = list(corpus.read_columns())
    fs, path = filesystem(source.path)
    types = _column_types(fs, path, columns, corpus.text_column, whole_error)
    python = {pa.int64(): (int,), pa.float64(): (int, float), pa.bool_(): (bool,),
              pa.string(): (str,)}  # fmt: skip

    def fits(value: Any, kind: pa.DataType) -> bool:
        if isinstance(value, bool) and kind != pa.bool_():
            return False
        if isinstance(value, int) and kind == pa.int64() and not -(2**63) <= value < 2**63:
            return False  # too large for int64
        return value is None or isinstance(value, python[kind])

    def batch_of(rows: list[tuple[dict[str, Any], str | None]]) -> pa.RecordBatch:
        arrays = [pa.array([r.get(c) for r, _ in rows], types[c]) for c in columns]
        reasons = pa.array([why for _, why in rows], pa.string())
        return pa.RecordBatch.from_arrays([*arrays, reasons], names=[*columns, ROW_REASON])

    rows: list[tuple[dict[str, Any], str | None]] = []
    for record, why in _json_lines(fs, path, columns):
        if why is not None:
            rows.append(({}, why))
        elif not all(fits(record.get(c), types[c]) for c in columns if c != corpus.text_column):
            rows.append(({}, ReasonCode.NOT_JSON))
        elif not fits(record.get(corpus.text_column), pa.string()):
            rows.append(({c: record.get(c) for c in columns if c != corpus.text_column},
                         ReasonCode.NOT_TEXT))  # fmt: skip
        else:
            rows.append((record, None))
        if len(rows) == JSONL_LINES_PER_BATCH:
            yield batch_of(rows)
            rows = []
    if rows:
        yield batch_of(rows)


def _column_types(
    fs: pa_fs.FileSystem, path: str, columns: list[str], text_column: str, whole_error: str
) -> dict[str, pa.DataType]:
    """The first pass of `_by_line`: each column's type from its first JSON type (numbers:
    int64 unless a float occurs; the text column is string). ValueError(whole_error) for a
    column whose first value is a list or an object."""
    first: dict[str, type] = {}  # each column's first JSON type
    floats: set[str] = set()  # number columns holding a float somewhere
    for record, _ in _json_lines(fs, path, columns):
        for c in columns:
            if (value := record.get(c)) is not None:
                first.setdefault(c, type(value))
                if type(value) is float:
                    floats.add(c)
    types: dict[str, pa.DataType] = {}
    for c in columns:
        kind = first.get(c, str)
        if c == text_column:
            types[c] = pa.string()
        elif issubclass(kind, (list, dict)):
            raise ValueError(whole_error)
        elif kind in (int, float):
            types[c] = pa.float64() if c in floats else pa.int64()
        else:
            types[c] = pa.bool_() if kind is bool else pa.string()
    return types
