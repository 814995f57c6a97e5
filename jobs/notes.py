"""Which input rows are notes: classify each row (the note, or why it has no output row),
tokenize the notes, find the notes whose model output is not finite.

Errors parts hold a reason code per bad row (`reasons.ReasonCode`), never the text; nothing
here logs or raises with note text. No Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .corpus import ROW_REASON, as_plain_text, missing_ids
from .reasons import ReasonCode

if TYPE_CHECKING:
    from clinicalbert_core.runner import ClinicalBertRunner
    from clinicalbert_core.tokenizer import Windows


def classify(
    texts: pa.Array, ids: pa.Array, max_chars: int
) -> tuple[list[str | None], list[str | None]]:
    """Per row: the note as str (or None) and the error reason (or None). Never logs text."""
    notes: list[str | None] = []
    reasons: list[str | None] = []
    texts = as_plain_text(texts)
    binary = pa.types.is_binary(texts.type) or pa.types.is_large_binary(texts.type)
    stringy = pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
    id_null = missing_ids(ids).to_pylist()
    for i, value in enumerate(texts.to_pylist() if (binary or stringy) else [None] * len(texts)):
        reason = None
        if id_null[i]:
            reason = ReasonCode.NULL_ID
        elif not (binary or stringy):
            reason = ReasonCode.NOT_TEXT if texts[i].is_valid else ReasonCode.NULL
        elif value is None:
            reason = ReasonCode.NULL
        elif binary:
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                reason = ReasonCode.UNDECODABLE
        if reason is None:
            if "\x00" in value:
                reason = ReasonCode.NOT_TEXT  # NUL bytes: a binary blob, not a note
            elif not value.strip():
                reason = ReasonCode.EMPTY
            elif len(value) > max_chars:
                reason = ReasonCode.TOO_LONG
        notes.append(None if reason else value)
        reasons.append(None if reason is None else str(reason.value))
    return notes, reasons


def classify_batch(
    batch: pa.RecordBatch, max_chars: int, id_column: str
) -> tuple[list[str | None], list[str | None], list[list[str]]]:
    """A record batch's rows classified: per row the note (or None), the error reason (or
    None), and the id/kept columns staging could not decode (a kept one is written as null)."""
    notes, reasons = classify(batch["text"], batch["id"], max_chars)
    if ROW_REASON in batch.schema.names:  # a JSONL line staging could not read
        for i, why in enumerate(batch[ROW_REASON].to_pylist()):
            if why is not None:
                notes[i], reasons[i] = None, why
    marks = [[c for c in (m or "").split(",") if c] for m in _marks(batch)]
    for i, columns in enumerate(marks):  # an id that was not UTF-8: the row is an error
        if id_column in columns and reasons[i] in (None, str(ReasonCode.NULL_ID.value)):
            reasons[i] = str(ReasonCode.UNDECODABLE.value)
            notes[i] = None
    return notes, reasons, marks


def error_rows(
    reasons: list[str | None], marks: list[list[str]], encoded: np.ndarray, id_column: str
) -> list[tuple[int, str, str | None]]:
    """The batch's error rows as (row, reason, column): a reason per bad row, and per encoded
    row each kept column whose value was not UTF-8 (written as null, named here)."""
    rows = [(i, reasons[i], None) for i in range(len(reasons)) if reasons[i] is not None]
    rows += [
        (i, str(ReasonCode.UNDECODABLE_VALUE.value), c)
        for i in encoded
        for c in marks[i]
        if c != id_column
    ]
    return rows


def _marks(batch: pa.RecordBatch) -> list[str | None]:
    """Per row, the id/kept columns staging could not decode (comma-joined), or None."""
    if "_undecodable" not in batch.schema.names:
        return [None] * batch.num_rows
    return batch["_undecodable"].to_pylist()


def tokenize_rows(
    runner: ClinicalBertRunner,
    notes: list[str | None],
    reasons: list[str | None],
    rows: Iterable[int] | None = None,
) -> tuple[np.ndarray, Windows]:
    """Tokenize `rows` (default: every row with no error reason yet). A note that yields no
    token at all (only control characters, zero-width spaces, a BOM) gets reason `empty` in
    `reasons`. Returns the indices of the rows that were encoded and their windows."""
    if rows is None:
        rows = [i for i, r in enumerate(reasons) if r is None]
    rows = np.fromiter(rows, np.int64)
    kept, windows = runner.tokenizer.nonempty([notes[i] for i in rows])
    for i in np.setdiff1d(rows, rows[kept]):
        reasons[i] = str(ReasonCode.EMPTY.value)
    return rows[kept], windows


def non_finite_notes(
    windows: Windows,
    vectors: np.ndarray | None,
    mlm: Any = None,
    logits: np.ndarray | None = None,
    token_logits: np.ndarray | None = None,
) -> np.ndarray:
    """bool[notes]: the notes whose output holds NaN or inf, in `vectors` or a classifier's
    `logits` (one row per note, or per window when there is one per window), in a token
    classifier's `token_logits` (per packed token of `windows`) or in the MLM
    log-probabilities `mlm` (MlmRows, by window). Such a note gets reason `non_finite`
    instead of an output row."""
    bad_windows = np.zeros(windows.num_windows, bool)
    if token_logits is not None and windows.num_windows:
        bad_tokens = ~np.isfinite(token_logits).all(axis=1)  # (T,)
        bad_windows |= np.add.reduceat(bad_tokens, windows.bounds[:-1]) > 0
    bad_notes = np.zeros(windows.num_notes, bool)
    for rows in (r for r in (vectors, logits) if r is not None):
        finite = np.isfinite(rows).all(axis=1)
        if len(finite) == windows.num_notes:
            bad_notes |= ~finite
        else:
            bad_windows |= ~finite
    if mlm is not None and len(mlm.window):
        bad_windows[mlm.window[~np.isfinite(mlm.top_logprobs).all(axis=1)]] = True
    bad_notes[windows.note[bad_windows]] = True
    return bad_notes
