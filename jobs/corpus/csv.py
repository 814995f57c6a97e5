"""CSV inputs (plain or compressed, corpus.csv's delimiter and quote), staged into Parquet.

Notes are read as raw bytes (a note that is not UTF-8 becomes an error row), textual id and
kept columns as bytes decoded per value (`_decoded`); a row of more or fewer fields than the
header is an error row in its place (`_with_ragged_rows`).
"""

from __future__ import annotations

import csv  # the standard library's: imports are absolute, never this module
import io
import re
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs

from ..fs import filesystem
from ..reasons import ReasonCode
from ..spec import CorpusSpec, CsvOptions
from . import textfile
from .textfile import StartOver, unreadable
from .units import Source
from .values import ARROW_ERRORS, ROW_REASON, UNDECODABLE, check_columns, redact

STAGED = True  # staged into Parquet before sharding
NOTE_PER_FILE = False  # a file holds many notes, one per row
_ARROW_TYPES = {
    "string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
    "date32": pa.date32(), "timestamp": pa.timestamp("s"),
}  # fmt: skip
_RAGGED = re.compile(r"Expected \d+ columns, got \d+")


def columns(source: Source, corpus: CorpusSpec) -> list[str]:
    """The columns of one CSV file, read cheaply (no note is parsed): its header."""
    fs, path = filesystem(source.path)
    with fs.open_input_stream(path, compression="detect") as f:
        lines = (line for line in textfile.lines(f, source.path) if line.strip())
        header = next(lines, b"")
        try:
            text = header.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{source.path}: its header is not UTF-8") from None
        opts = corpus.csv or CsvOptions()
        try:  # newline="": a lone CR ends the header line, as it ends a row for pyarrow
            row = next(csv.reader(io.StringIO(text, newline=""), delimiter=opts.delimiter,
                                  quotechar=opts.quote_char), [])  # fmt: skip
        except csv.Error as e:
            raise ValueError(f"{source.path}: cannot read its header line: {e}") from None
        return list(row)


def batches(source: Source, corpus: CorpusSpec) -> Iterator[pa.RecordBatch]:
    """Stream a csv file as record batches of the columns the corpus reads, textual id and
    kept columns decoded per value. A file with ragged rows raises `StartOver` with those
    rows as error rows (`_with_ragged_rows`)."""
    if source.size == 0:  # an empty file is zero rows
        return
    columns = list(corpus.read_columns())
    fs, path = filesystem(source.path)
    decode = (corpus.id_column, *corpus.keep_columns)
    try:
        for batch in _reader(fs, path, source.path, corpus, columns):
            yield _decoded(batch.select(columns), decode)
    except (OSError, UnicodeError, *ARROW_ERRORS) as e:  # OSError: a truncated or corrupt .gz
        if _RAGGED.search(str(e)):  # staging skips those rows
            whole = f"{source.path}: cannot read as csv: {redact(e)}"
            raise StartOver(whole, _with_ragged_rows(source, corpus, whole)) from None
        raise unreadable(source.path, "csv", e) from None


def sample(
    source: Source, corpus: CorpusSpec, columns: list[str], rows: int
) -> pa.RecordBatch | None:
    """`columns` of the file's first block as pyarrow reads it (its default block size, not
    `rows`), for preflight's look at `where` values; None for a file without rows."""
    opts = corpus.csv or CsvOptions()
    parse = pa_csv.ParseOptions(delimiter=opts.delimiter, quote_char=opts.quote_char,
                                newlines_in_values=True)  # fmt: skip
    fs, path = filesystem(source.path)
    with fs.open_input_stream(path, compression="detect") as f:
        reader = pa_csv.open_csv(
            f, parse_options=parse,
            convert_options=pa_csv.ConvertOptions(include_columns=columns),
        )  # fmt: skip
        return next(iter(reader), None)


def columns_hint(corpus: CorpusSpec, names: list[str]) -> str:
    """' (... set corpus.csv.delimiter ...)' for a CSV header that came out as one column
    because the file is split by another delimiter (a TSV read as CSV)."""
    delimiter = (corpus.csv or CsvOptions()).delimiter
    if len(names) != 1:
        return ""
    for other in ("\t", ";", "|", ","):
        if other != delimiter and other in names[0]:
            shown = "\\t" if other == "\t" else other  # as YAML reads it in double quotes
            return f' (its header is split by {other!r}: set corpus.csv.delimiter to "{shown}")'
    return ""


def _with_ragged_rows(
    source: Source, corpus: CorpusSpec, whole_error: str
) -> Iterator[pa.RecordBatch]:
    """A CSV file whose ragged rows (more or fewer fields than the header) are rows of nulls
    with reason `not_csv`, in their places; every other row as pyarrow reads it. Python's csv
    module finds the ragged rows' places, pyarrow reads the file skipping them; where the two
    disagree (the field counts skipped, the rows read), `whole_error` refuses the file."""
    columns = list(corpus.read_columns())
    fs, path = filesystem(source.path)
    try:
        places, widths, records = _ragged_records(fs, path, corpus.csv or CsvOptions())
    except (csv.Error, OSError):
        raise ValueError(whole_error) from None
    except UnicodeError:  # pyarrow cannot hand such a row to its handler (a traceback on stderr)
        raise ValueError(f"{whole_error} (in a row whose bytes are not UTF-8)") from None
    skipped: list[int] = []

    def skip(row: Any) -> str:  # row.text is the row itself: never kept or shown
        skipped.append(row.actual_columns)
        return "skip"

    decode = (corpus.id_column, *corpus.keep_columns)
    read = _reader(fs, path, source.path, corpus, columns, invalid_row_handler=skip)
    rows = 0
    try:
        for batch in _with_error_rows(
            (_decoded(b.select(columns), decode) for b in read), places, ReasonCode.NOT_CSV
        ):
            rows += batch.num_rows
            yield batch
    except (OSError, UnicodeError, *ARROW_ERRORS):
        raise ValueError(whole_error) from None
    if sorted(skipped) != sorted(widths) or rows != records:
        raise ValueError(whole_error)


def _ragged_records(
    fs: pa_fs.FileSystem, path: str, opts: CsvOptions
) -> tuple[list[int], list[int], int]:
    """The places (0-based among the records after the header; blank lines are not records,
    as for pyarrow) and field counts of the records whose count differs from the header's,
    and the number of records. UnicodeError when such a record is not UTF-8."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a note is one field: no limit below the job's own
    places, widths, records, header = [], [], 0, None
    try:
        with fs.open_input_stream(path, compression="detect") as f:
            text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
            for fields in csv.reader(text, delimiter=opts.delimiter, quotechar=opts.quote_char):
                if not fields:
                    continue
                if header is None:
                    header = len(fields)
                    continue
                if len(fields) != header:
                    "".join(fields).encode("utf-8")  # UnicodeError for bytes that are not UTF-8
                    places.append(records)
                    widths.append(len(fields))
                records += 1
    finally:
        csv.field_size_limit(limit)
    return places, widths, records


def _with_error_rows(
    batches: Iterator[pa.RecordBatch], places: list[int], reason: str
) -> Iterator[pa.RecordBatch]:
    """The rows of `batches` with a `ROW_REASON` column, and a row of nulls with `reason` at
    each of `places` (ascending places in the rows yielded)."""
    schema: pa.Schema | None = None
    pos, k = 0, 0

    def errors(n: int) -> pa.RecordBatch:
        assert schema is not None
        nulls = [pa.nulls(n, field.type) for field in schema]
        return pa.RecordBatch.from_arrays(
            [*nulls, pa.array([reason] * n, pa.string())], names=[*schema.names, ROW_REASON]
        )

    for batch in batches:
        schema, i = batch.schema, 0
        while i < batch.num_rows or (k < len(places) and places[k] == pos):
            bad = 0
            while k + bad < len(places) and places[k + bad] == pos + bad:
                bad += 1
            if bad:
                yield errors(bad)
                k, pos = k + bad, pos + bad
                continue
            run = batch.num_rows - i
            if k < len(places):
                run = min(run, places[k] - pos)
            part = batch.slice(i, run)
            yield part.append_column(ROW_REASON, pa.nulls(run, pa.string()))
            i, pos = i + run, pos + run
    if k < len(places):
        yield errors(len(places) - k)


def _decoded(batch: pa.RecordBatch, columns: tuple[str, ...]) -> pa.RecordBatch:
    """The textual id/kept columns (read as raw bytes) as strings: a value that is not UTF-8
    becomes null and its column is named in `_undecodable` for that row, so one bad byte
    never turns a whole column into binary. Other columns pass through."""
    bad: dict[int, list[str]] = {}  # row -> its columns whose value is not UTF-8
    arrays, names = [], []
    for name in batch.schema.names:
        arr = batch.column(name)
        if name in columns and pa.types.is_binary(arr.type):
            try:
                arr = arr.cast(pa.string())  # the common case: every value is UTF-8
            except pa.ArrowInvalid:
                values = []
                for i, v in enumerate(arr.to_pylist()):
                    try:
                        values.append(None if v is None else v.decode("utf-8"))
                    except UnicodeDecodeError:
                        values.append(None)
                        bad.setdefault(i, []).append(name)
                arr = pa.array(values, pa.string())
        arrays.append(arr)
        names.append(name)
    if bad:
        marks = [",".join(bad[i]) if i in bad else None for i in range(batch.num_rows)]
        marked = pa.array(marks, pa.string())
    else:  # no Python work per row in the common case
        marked = pa.nulls(batch.num_rows, pa.string())
    return pa.RecordBatch.from_arrays([*arrays, marked], names=[*names, UNDECODABLE])


def _reader(
    fs: pa_fs.FileSystem,
    path: str,
    name: str,
    corpus: CorpusSpec,
    columns: list[str],
    invalid_row_handler: Callable[[Any], str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The file's batches; with `invalid_row_handler` (pyarrow's: ragged rows), at least one
    (empty when every row is ragged), so the file's schema is known."""
    opts = corpus.csv or CsvOptions()
    read = pa_csv.ReadOptions(block_size=textfile.INFER_BLOCK_BYTES)

    def parse(handler: Callable[[Any], str] | None) -> pa_csv.ParseOptions:
        return pa_csv.ParseOptions(
            delimiter=opts.delimiter, quote_char=opts.quote_char, newlines_in_values=True,
            invalid_row_handler=handler,
        )  # fmt: skip

    types = {c: _ARROW_TYPES[t] for c, t in opts.column_types.items()}
    types[corpus.text_column] = pa.binary()  # raw bytes: undecodable notes become error rows
    probe_skip = None if invalid_row_handler is None else (lambda row: "skip")  # counted below
    with fs.open_input_stream(path, compression="detect") as f:
        probe = pa_csv.open_csv(
            f, read, parse(probe_skip), pa_csv.ConvertOptions(column_types=types)
        )
        schema = probe.schema
    check_columns(schema.names, corpus, name)
    types |= {
        c: pa.string() for c in columns if c not in types and schema.field(c).type == pa.null()
    }
    for c in (corpus.id_column, *corpus.keep_columns):  # textual: raw bytes, decoded per value
        if c not in opts.column_types and schema.field(c).type in (
            pa.string(), pa.binary(), pa.null(),
        ):  # fmt: skip
            types[c] = pa.binary()
    # unquoted empty fields are null (as pandas reads MIMIC), a quoted "" is an empty string
    convert = pa_csv.ConvertOptions(
        column_types=types,
        include_columns=columns,
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    with fs.open_input_stream(path, compression="detect") as f:
        reader = pa_csv.open_csv(f, read, parse(invalid_row_handler), convert)
        empty = invalid_row_handler is not None
        for batch in reader:
            empty = False
            yield batch
        if empty:
            yield pa.RecordBatch.from_pylist([], schema=reader.schema)
