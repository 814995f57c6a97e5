"""Why an input row has no output row: the codes errors parts hold (never the note text)."""

from __future__ import annotations

import enum


class ReasonCode(enum.StrEnum):
    """Why an input row has no output row (errors parts hold only these codes, never text)."""

    NULL = "null"  # text is null
    EMPTY = "empty"  # text is empty or whitespace only
    NOT_TEXT = "not_text"  # not a string (a number, a blob with NUL bytes, ...)
    UNDECODABLE = "undecodable"  # bytes that are not UTF-8
    TOO_LONG = "too_long"  # more than run.max_note_chars characters
    NULL_ID = "null_id"  # the id is null, NaN, empty or blank: the row could not be identified
    # A JSONL line that is not a JSON object, or whose id/kept/where value has another JSON
    # type than its column's: nothing of it is read (its id is null; row_index names it).
    NOT_JSON = "not_json"
    # A CSV row with more or fewer fields than the header: nothing of it is read (as not_json).
    NOT_CSV = "not_csv"
    # The model's output for the note held NaN or inf (a vector, after the cast to
    # output.vector_dtype, or an MLM log-probability): an overflow (fp16) or a broken model.
    NON_FINITE = "non_finite"
    # Not a row error: the row is written, with this kept column's value (not UTF-8) as null;
    # the errors table names the column. Counted apart (Report.nulled_values).
    UNDECODABLE_VALUE = "undecodable_value"


ROW_REASONS = tuple(r.value for r in ReasonCode if r is not ReasonCode.UNDECODABLE_VALUE)
