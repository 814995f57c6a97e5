"""Encoder outputs -> the output Arrow tables: pure functions, one builder per head.

A part's columns, in order: id, the kept columns, [embedding], n_tokens, n_windows, truncated,
[window_index, char_start, char_end] (one row per window: aggregate none), [mlm_*] (MLM head),
[class_logits, class_scores, labels] (a sequence classifier), [entities, text_redacted] (a
token classifier).
A head is its fields in `output_schema` plus one builder here returning its columns by name;
`output_table` runs the builders whose columns the schema holds. Errors parts hold
`errors_schema` rows (`error_table`). No Ray, no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clinicalbert_core.limits import body_tokens

if TYPE_CHECKING:
    from clinicalbert_core.entities import Entities
    from clinicalbert_core.tokenizer import Windows

VECTOR_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
COUNT_FIELDS = (
    pa.field("n_tokens", pa.int64()),
    pa.field("n_windows", pa.int32()),
    pa.field("truncated", pa.bool_()),
)
WINDOW_FIELDS = (
    pa.field("window_index", pa.int32()),
    pa.field("char_start", pa.int64()),
    pa.field("char_end", pa.int64()),
)
MLM_FIELDS = (
    pa.field("mlm_window", pa.list_(pa.int32())),
    pa.field("mlm_position", pa.list_(pa.int32())),
    pa.field("mlm_char_start", pa.list_(pa.int64())),
    pa.field("mlm_top_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("mlm_top_tokens", pa.list_(pa.list_(pa.string()))),
    pa.field("mlm_top_logprobs", pa.list_(pa.list_(pa.float32()))),
)


def class_fields(num_labels: int) -> tuple[pa.Field, ...]:
    """A sequence classifier's columns: its logits and scores (one per label, in label id
    order) and the labels it predicts."""
    per_label = pa.list_(pa.float32(), num_labels)
    return (
        pa.field("class_logits", per_label),
        pa.field("class_scores", per_label),
        pa.field("labels", pa.list_(pa.string())),
    )


ENTITY_FIELDS = [("start", pa.int32()), ("end", pa.int32()), ("label", pa.string()),
                 ("score", pa.float32())]  # fmt: skip
ENTITY_TYPE = pa.list_(pa.struct(ENTITY_FIELDS))


def entity_fields(redact: bool) -> tuple[pa.Field, ...]:
    """A token classifier's columns: the note's entities (character offsets into it), and
    with `redact` the note with each entity replaced by [LABEL]."""
    return (pa.field("entities", ENTITY_TYPE),) + (
        (pa.field("text_redacted", pa.string()),) if redact else ()
    )


def output_schema(
    id_type: pa.DataType,
    keep_fields: list[pa.Field],
    hidden: int,
    vector_dtype: str,
    embeddings: bool,
    windows: bool,
    mlm: bool,
    num_labels: int = 0,
    entities: bool = False,
    redact: bool = False,
) -> pa.Schema:
    """Schema of a part file.

    id (input type), kept columns, [embedding fixed_size_list<vector_dtype>[hidden]], n_tokens
    (word pieces of the note, or of the window), n_windows, truncated; `windows` (one row per
    window): window_index, char_start, char_end; `mlm`: one list entry per predicted position,
    in (window, position) order: mlm_window, mlm_position (token index in that window),
    mlm_char_start, and per position the top-k mlm_top_ids / mlm_top_tokens / mlm_top_logprobs;
    `num_labels` (a sequence classifier's): class_logits, class_scores, labels; `entities` (a
    token classifier's): entities, and with `redact` text_redacted.
    """
    if vector_dtype not in VECTOR_TYPES:
        raise ValueError(
            f"vector_dtype must be one of {sorted(VECTOR_TYPES)}, got {vector_dtype!r}"
        )
    if embeddings and hidden < 1:
        raise ValueError(f"hidden must be positive, got {hidden}")
    fields_ = [pa.field("id", id_type), *keep_fields]
    if embeddings:
        fields_.append(pa.field("embedding", pa.list_(VECTOR_TYPES[vector_dtype], hidden)))
    fields_ += COUNT_FIELDS
    if windows:
        fields_ += WINDOW_FIELDS
    if mlm:
        fields_ += MLM_FIELDS
    if num_labels:
        fields_ += class_fields(num_labels)
    if entities:
        fields_ += entity_fields(redact)
    names = [f.name for f in fields_]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"kept columns clash with output columns: {clash}")
    return pa.schema(fields_)


# Every column a part file can have, for any heads (kept columns aside).
EVERY_HEAD = {"embeddings": True, "windows": True, "mlm": True, "num_labels": 1,
              "entities": True, "redact": True}  # fmt: skip
PART_COLUMNS = tuple(output_schema(pa.int64(), [], 1, "float32", **EVERY_HEAD).names)


def errors_schema(id_type: pa.DataType) -> pa.Schema:
    """Schema of an errors part: id (input type, nullable), shard, row_index, reason code, and
    `column` (the kept column a value was nulled in, for reason undecodable_value; else null)."""
    return pa.schema(
        [
            pa.field("id", id_type),
            pa.field("shard", pa.string()),
            pa.field("row_index", pa.int64()),
            pa.field("reason", pa.string()),
            pa.field("column", pa.string()),
        ]
    )


def output_table(
    schema: pa.Schema,
    batch: pa.RecordBatch,
    rows: np.ndarray,
    windows: Windows,
    keep_columns: list[str] | tuple[str, ...],
    vectors: np.ndarray | None = None,
    mlm: Any = None,
    id_to_token: Callable[[int], str] | None = None,
    classes: tuple[np.ndarray, np.ndarray, list[list[str]]] | None = None,
    entities: Entities | None = None,
    redacted: list[str] | None = None,
) -> pa.Table:
    """The output rows of the notes at `rows` (int64[notes]) of `batch`, encoded as `windows`:
    one per note, or per window when `schema` has window rows. Each head whose columns
    `schema` holds is built from its output: `vectors` (float[rows, C] in the output dtype),
    `mlm` (MlmRows, by window; None: no prediction) with `id_to_token` (the vocabulary),
    `classes` (logits, scores, labels per row: classify.note_classes), `entities` (each
    note's: entities.Entities) and `redacted` (each note redacted)."""
    per_window = "window_index" in schema.names
    cols = base_columns(batch, rows, windows, keep_columns, per_window)
    if "embedding" in schema.names:
        assert vectors is not None, "an embedding column needs vectors"
        cols |= embedding_column(vectors)
    if "mlm_window" in schema.names:
        assert id_to_token is not None, "MLM columns need the vocabulary"
        cols |= mlm_columns(mlm, windows, per_window, len(cols["id"]), id_to_token)
    if "class_logits" in schema.names:
        assert classes is not None, "classifier columns need its predictions"
        cols |= class_columns(*classes)
    if "entities" in schema.names:
        assert entities is not None, "entity columns need the entities"
        cols["entities"] = entity_column(entities)
    if "text_redacted" in schema.names:
        assert redacted is not None, "text_redacted needs the redacted notes"
        cols["text_redacted"] = pa.array(redacted, pa.string())
    return pa.table(cols, schema=schema)


def base_columns(
    batch: pa.RecordBatch,
    rows: np.ndarray,
    windows: Windows,
    keep_columns: list[str] | tuple[str, ...],
    per_window: bool,
) -> dict[str, pa.Array]:
    """id, the kept columns, n_tokens, n_windows, truncated; `per_window` (aggregate none):
    one row per window, with window_index, char_start, char_end."""
    # one output row per note, or per window
    take = rows[windows.note] if per_window else rows
    cols: dict[str, pa.Array] = {"id": batch["id"].take(pa.array(take))}
    for c in keep_columns:
        cols[c] = batch[c].take(pa.array(take))
    if per_window:
        cols["n_tokens"] = pa.array(body_tokens(windows.lengths), pa.int64())
        cols["n_windows"] = pa.array(windows.windows_per_note()[windows.note], pa.int32())
        cols["truncated"] = pa.array(windows.truncated[windows.note])
        cols["window_index"] = pa.array(windows.window_index, pa.int32())
        cols["char_start"] = pa.array(windows.char_start, pa.int64())
        cols["char_end"] = pa.array(windows.char_end, pa.int64())
    else:
        cols["n_tokens"] = pa.array(windows.note_tokens, pa.int64())
        cols["n_windows"] = pa.array(windows.windows_per_note(), pa.int32())
        cols["truncated"] = pa.array(windows.truncated)
    return cols


def as_vector_dtype(vectors: np.ndarray, vector_dtype: str) -> np.ndarray:
    """Vectors cast to output.vector_dtype; a value float16 cannot hold becomes inf."""
    with np.errstate(over="ignore"):  # float16 may overflow: those notes are errors
        return vectors.astype(np.dtype(vector_dtype))


def embedding_column(vectors: np.ndarray) -> dict[str, pa.Array]:
    """`embedding`: float[rows, C] as fixed-size lists of C."""
    values = pa.array(vectors.ravel())
    return {"embedding": pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])}


def class_columns(
    logits: np.ndarray, scores: np.ndarray, labels: list[list[str]]
) -> dict[str, pa.Array]:
    """`class_logits`, `class_scores` (float[rows, L] as fixed-size lists of L) and `labels`."""
    per_label = lambda values: pa.FixedSizeListArray.from_arrays(  # noqa: E731
        pa.array(values.astype(np.float32).ravel()), values.shape[1]
    )
    return {
        "class_logits": per_label(logits),
        "class_scores": per_label(scores),
        "labels": pa.array(labels, pa.list_(pa.string())),
    }


def entity_column(entities: Entities) -> pa.Array:
    """`entities`: per note a list of (start, end, label, score) structs."""
    names = np.asarray(entities.names, dtype=object)
    structs = pa.StructArray.from_arrays(
        [pa.array(entities.start, pa.int32()), pa.array(entities.end, pa.int32()),
         pa.array(names[entities.label] if len(entities.label) else [], pa.string()),
         pa.array(entities.score, pa.float32())],
        fields=list(ENTITY_TYPE.value_type),
    )  # fmt: skip
    offsets = pa.array(entities.offsets.astype(np.int32))
    return pa.ListArray.from_arrays(offsets, structs, type=ENTITY_TYPE)


def mlm_columns(
    rows: Any,
    windows: Windows,
    per_window: bool,
    n_out: int,
    id_to_token: Callable[[int], str],
) -> dict[str, pa.Array]:
    """MLM predictions as list columns, grouped by output row (note or window)."""
    if rows is None or len(rows.window) == 0:
        owner = np.zeros(0, np.int64)
        order = owner
    else:
        owner = rows.window if per_window else windows.note[rows.window]
        order = np.lexsort((rows.position, windows.window_index[rows.window], owner))
    counts = np.bincount(owner, minlength=n_out)
    offsets = pa.array(np.concatenate(([0], np.cumsum(counts))).astype(np.int32))
    if len(order):
        w, p = rows.window[order], rows.position[order]
        ids, lps = rows.top_ids[order], rows.top_logprobs[order]
        chars = windows.token_char[windows.bounds[w] + p]
        k = ids.shape[1]
        inner = pa.array(np.arange(0, ids.size + 1, k, dtype=np.int32))
        top_ids = pa.ListArray.from_arrays(inner, pa.array(ids.ravel().astype(np.int32)))
        tokens = [id_to_token(int(i)) for i in ids.ravel()]
        top_tokens = pa.ListArray.from_arrays(inner, pa.array(tokens, pa.string()))
        top_lps = pa.ListArray.from_arrays(inner, pa.array(lps.ravel().astype(np.float32)))
    else:
        w = p = chars = np.zeros(0, np.int64)
        empty = pa.array([], pa.list_(pa.int32()))
        top_ids, top_tokens, top_lps = (
            empty, pa.array([], pa.list_(pa.string())), pa.array([], pa.list_(pa.float32())),
        )  # fmt: skip
    as_list = lambda values: pa.ListArray.from_arrays(offsets, values)  # noqa: E731
    return {
        "mlm_window": as_list(pa.array(windows.window_index[w] if len(w) else [], pa.int32())),
        "mlm_position": as_list(pa.array(p, pa.int32())),
        "mlm_char_start": as_list(pa.array(chars, pa.int64())),
        "mlm_top_ids": as_list(top_ids),
        "mlm_top_tokens": as_list(top_tokens),
        "mlm_top_logprobs": as_list(top_lps),
    }


def drop_notes(table: pa.Table, bad: np.ndarray, windows: Windows, per_window: bool) -> pa.Table:
    """`table` (output_table's rows) without the rows of the notes `bad` (bool[notes])."""
    return table.filter(pa.array(~(bad[windows.note] if per_window else bad)))


def error_table(
    batch: pa.RecordBatch,
    rows: list[tuple[int, str, str | None]],
    shard_id: str,
    id_type: pa.DataType,
) -> pa.Table | None:
    """Errors-part rows for (row in `batch`, reason, column) triples; None when empty."""
    if not rows:
        return None
    take = pa.array([i for i, _, _ in rows], pa.int64())
    return pa.table(
        {
            "id": batch["id"].take(take),
            "shard": pa.array([shard_id] * len(rows), pa.string()),
            "row_index": batch["row_index"].take(take),
            "reason": pa.array([r for _, r, _ in rows], pa.string()),
            "column": pa.array([c for _, _, c in rows], pa.string()),
        },
        schema=errors_schema(id_type),
    )
