"""Columns and values every reader shares: the columns a corpus needs, Arrow's text layouts,
missing ids, `where`, cutting batches by bytes, and error text that never quotes a value.

Pure functions over Arrow data, no I/O. Nothing here logs or raises with note text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..spec import CorpusSpec
from .units import ParquetInput

UNDECODABLE = "_undecodable"  # staged column: which id/kept columns of a row were not UTF-8
ROW_REASON = "_reason"  # staged column (JSONL/CSV files with broken rows): a row's error reason
ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)
# What a column name shown in an error looks like: a letter or _ first, then letters, digits,
# spaces and _ . - : ( ) / # ("Unnamed: 0", "Date (UTC)"), 63 at most (as PostgreSQL's).
_COLUMN_NAME = re.compile(r"[^\W\d][\w .:()/#-]{0,62}")
MAX_SHOWN_COLUMNS = 20  # column names an error lists


def plain_values(values: pa.Array) -> pa.Array:
    """A dictionary-encoded column as its values (`plain_type`); others as they are."""
    return values.dictionary_decode() if pa.types.is_dictionary(values.type) else values


def as_plain_text(texts: pa.Array) -> pa.Array:
    """A text column in any of Arrow's text layouts as string or binary: dictionary-encoded
    (pandas' category, written to Parquet as such), string/binary views. Other types pass
    through (their rows are `not_text`)."""
    texts = plain_values(texts)
    if pa.types.is_string_view(texts.type):
        texts = texts.cast(pa.string())
    elif pa.types.is_binary_view(texts.type):
        texts = texts.cast(pa.binary())
    return texts


def cut_by_bytes(batch: pa.RecordBatch, column: str, limit: int | None) -> Iterator[pa.RecordBatch]:
    """Slices of `batch` whose `column` (string/binary) holds at most `limit` bytes each, or one
    row when a single value is larger."""
    arr = batch.column(column)
    if limit is None or not (pa.types.is_string(arr.type) or pa.types.is_binary(arr.type)
                             or pa.types.is_large_string(arr.type)
                             or pa.types.is_large_binary(arr.type)):  # fmt: skip
        yield batch
        return
    sizes = pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False)
    start, used = 0, 0
    for i, n in enumerate(sizes):
        if i > start and used + n > limit:
            yield batch.slice(start, i - start)
            start, used = i, 0
        used += int(n)
    yield batch.slice(start)


def missing_ids(ids: pa.Array) -> pa.Array:
    """Per row: the id is null, NaN (pandas' null in a float column), or a text id that is
    empty or only whitespace (a quoted "" in a CSV, "" in JSONL): the row cannot be found by
    its id (`null_id`)."""
    ids = as_plain_text(ids)
    missing = pc.is_null(ids, nan_is_null=True)
    if is_text(ids.type):
        missing = pc.or_(missing, pc.fill_null(pc.match_substring_regex(ids, r"^\s*$"), True))
    return missing


def is_text(kind: pa.DataType) -> bool:
    """A string or binary type, in any of Arrow's layouts but dictionary-encoded."""
    return any(
        test(kind) for test in (
            pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
            pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view,
        )
    )  # fmt: skip


_AS_BYTES = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}


def _bad_utf8_rows(values: pa.Array) -> np.ndarray:
    """Positions of the non-null values of a string column that are not UTF-8 (an empty
    array, cheaply, when the whole column is)."""
    try:
        values.validate(full=True)
        return np.arange(0)
    except pa.ArrowInvalid:
        pass

    def decodes(raw: bytes | None) -> bool:
        try:
            raw is None or raw.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    raw = values.view(_AS_BYTES[values.type]).to_pylist()
    return np.flatnonzero([not decodes(v) for v in raw])


def checked_utf8(batch: pa.RecordBatch, names: dict[str, str]) -> pa.RecordBatch:
    """A batch whose string columns all hold UTF-8. pyarrow's JSON and Parquet readers do not
    check: bytes that are not UTF-8 in a `text` string column turn it to binary (such a row
    becomes an `undecodable` error row); in another column of `names` (batch column -> the
    input's name for it) the value becomes null and the column is named in that row's
    `_undecodable` mark, as CSV staging marks it."""
    columns = dict(zip(batch.schema.names, batch.columns))
    marked: dict[int, list[str]] = {}
    for name, arr in columns.items():
        if arr.type not in _AS_BYTES or not len(bad := _bad_utf8_rows(arr)):
            continue
        if name == "text":
            columns[name] = arr.view(_AS_BYTES[arr.type])
            continue
        mask = np.zeros(len(arr), bool)
        mask[bad] = True
        raw = pc.if_else(pa.array(mask), pa.scalar(None, _AS_BYTES[arr.type]),
                         arr.view(_AS_BYTES[arr.type]))  # fmt: skip
        columns[name] = raw.view(arr.type)
        for i in bad:
            marked.setdefault(int(i), []).append(names.get(name, name))
    if marked:
        old = columns.get(UNDECODABLE, pa.nulls(batch.num_rows, pa.string())).to_pylist()
        columns[UNDECODABLE] = pa.array(
            [",".join(filter(None, [old[i], *marked.get(i, [])])) or None for i in range(len(old))],
            pa.string(),
        )
    return pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))


def plain_type(kind: pa.DataType) -> pa.DataType:
    """The type a column is read and written as: a dictionary-encoded one as its values'."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def check_column_types(inputs: list[ParquetInput]) -> None:
    """Every input must give the id and keep columns one type, so the parts form one table:
    ValueError naming the column, two inputs and their types."""
    first: dict[str, tuple[str, str]] = {}
    for parquet in inputs:
        for column, kind in parquet.column_types:
            seen = first.setdefault(column, (kind, parquet.source))
            if seen[0] != kind:
                raise ValueError(
                    f"column {column!r} is {seen[0]} in {seen[1]} but {kind} in "
                    f"{parquet.source}: the output parts would not form one table. Give the "
                    "inputs one type (csv: pin it with corpus.csv.column_types)"
                )


def check_columns(available: list[str], corpus: CorpusSpec, path: str) -> None:
    """Raise ValueError naming the first column the corpus needs that `available` lacks."""
    roles = [("id_column", corpus.id_column), ("text_column", corpus.text_column)]
    roles += [("keep_columns", c) for c in corpus.keep_columns]
    roles += [("where", c) for c in corpus.where or {}]
    for role, column in roles:
        if column not in available:
            raise ValueError(
                f"{path}: column {column!r} (corpus.{role}) not found; available columns: "
                f"{shown_columns(available)}"
            )
        if (times := available.count(column)) > 1:
            raise ValueError(repeated_column(path, role, column, times))


def shown_columns(names: list[str]) -> str:
    """A file's column names for an error message: quoted (at most MAX_SHOWN_COLUMNS, then a
    count) when every one looks like a name, else only their count. A first line that is no
    header (a headerless CSV, a header broken by a stray quote) holds a row's values: ids,
    dates, note text, never shown."""
    if not all(_COLUMN_NAME.fullmatch(n) for n in names):
        return f"{len(names):,}, not all of them names (is the file's first line a header?)"
    shown = [repr(n) for n in names[:MAX_SHOWN_COLUMNS]]
    more = len(names) - len(shown)
    return ", ".join(shown + [f"... and {more:,} more"] * bool(more)) or "none"


def repeated_column(path: str, role: str, column: str, times: int) -> str:
    """The error for a column the corpus reads that the file has more than once."""
    return (f"corpus.{role}: {path} has {times} columns named {column!r}: the job cannot "
            "tell which one to read; rename the others")  # fmt: skip


def where_mask(batch: pa.RecordBatch, where: dict[str, Any], path: str) -> pa.BooleanArray:
    """True for rows matching every condition (value: equality, tuple: membership, None: null)."""
    mask = None
    for column, value in where.items():
        arr = batch.column(column)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        values = value if isinstance(value, tuple) else (value,)
        wanted = [v for v in values if v is not None]
        match = None
        if wanted:
            try:
                value_set = pa.array(wanted).cast(arr.type)
                match = pc.is_in(arr, value_set=value_set)
            except ARROW_ERRORS as e:
                raise ValueError(
                    f"{path}: corpus.where.{column}: cannot compare {value!r} with column type "
                    f"{arr.type}"
                ) from e
        if len(wanted) < len(values):
            nulls = pc.is_null(arr)
            match = nulls if match is None else pc.or_(match, nulls)
        mask = match if mask is None else pc.and_(mask, match)
    assert mask is not None, "where must not be empty"
    return mask


def redact(error: Exception) -> str:
    """pyarrow's parse errors quote the offending row or value: keep only the part before it."""
    message = (str(error).splitlines() or [""])[0]
    message = re.sub(r"(got \d+):.*", r"\1", message)
    return re.sub(r"(invalid value).*", r"\1", message)
