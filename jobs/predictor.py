"""EncoderPredictor: the runner as a Ray Data `map_batches` class, for users' own pipelines.

    ds = ray.data.read_parquet("notes/")
    ds = ds.map_batches(
        EncoderPredictor,
        fn_constructor_kwargs={"model": "models/bio_clinicalbert"},
        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=256,
    )

Loads once per actor in `__init__`, handles one batch (a dict of numpy arrays, a pyarrow
Table or a pandas DataFrame) in `__call__` and returns a pyarrow Table: the batch's columns
without the note text (`keep_text=True` keeps it), `embedding` as a jobs' part file has it
(fixed_size_list<float32>[hidden]; null where the note is bad), `error` (string: null, or a
reason code of jobs.output.ReasonCode) and `model` (the weights' sha256); the model's identity
is also in the schema metadata. Testable without Ray.

A fine-tuned classifier (`classify=True` among the runner options) adds its columns as a job's
part has them: `class_logits`, `class_scores`, `labels` (a sequence classifier, aggregated by
`class_aggregate`) or `entities` (a token classifier, grouped by `entity_options`); null where
the note is bad. `embeddings=False` leaves the vector column out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from clinicalbert_core.classify import SEQUENCE, TOKEN, note_classes
from clinicalbert_core.hub import ModelBundle
from clinicalbert_core.runner import ClinicalBertRunner

from .notes import classify, non_finite_notes, tokenize_rows
from .reasons import ReasonCode
from .rows import class_columns, embedding_column, entity_column


class EncoderPredictor:
    def __init__(
        self,
        model: str | ModelBundle,
        *,
        text_column: str = "text",
        output_column: str = "embedding",
        keep_text: bool = False,
        device: str | None = None,
        max_note_chars: int = 2_000_000,
        entity_options: dict[str, Any] | None = None,
        **runner_options: Any,
    ):
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, ModelBundle):
            self.runner = ClinicalBertRunner.from_bundle(model, device=device, **runner_options)
        else:
            self.runner = ClinicalBertRunner.load(model, device=device, **runner_options)
        if self.runner.aggregate == "none" or self.runner.options.class_aggregate == "none":
            raise ValueError("EncoderPredictor writes one row per input row: use aggregate and "
                             "class_aggregate other than 'none'")  # fmt: skip
        self.text_column, self.output_column = text_column, output_column
        self.keep_text, self.max_note_chars = keep_text, max_note_chars
        self.entity_options = entity_options or {}  # runner.group_entities' aggregation,
        # ignore_labels, min_score (a token classifier)
        r = self.runner
        self.identity = {
            "variant": r.variant, "architecture": r.architecture, "tokenizer": r.tokenizer_kind,
            "weights_sha256": r.weights_sha256 or "", "pooling": r.pooling,
            "precision": r.precision, "normalize": str(r.options.normalize).lower(),
        }  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table | Any) -> pa.Table:
        table = _as_table(batch)
        if self.text_column not in table.column_names:
            raise ValueError(
                f"batch has no column {self.text_column!r} (columns: {table.column_names}); "
                "set text_column in fn_constructor_kwargs"
            )
        texts = table[self.text_column].combine_chunks()
        ids = pa.array(np.zeros(len(texts), np.int8))  # row identity is the batch position
        notes, reasons = classify(texts, ids, self.max_note_chars)
        good, windows = tokenize_rows(self.runner, notes, reasons)
        columns = self._heads(notes, good, windows, reasons)
        if not self.keep_text:
            table = table.drop_columns([self.text_column])
        for name, values in columns.items():
            table = table.append_column(name, values)
        table = table.append_column("error", pa.array(reasons, pa.string()))
        model = pa.array([self.identity["weights_sha256"]] * len(notes), pa.string())
        table = table.append_column("model", model)
        return table.replace_schema_metadata(self.identity)

    def _heads(
        self, notes: list[str | None], good: np.ndarray, windows: Any, reasons: list[str | None]
    ) -> dict[str, pa.Array]:
        """The heads' columns for every row: computed for the `good` rows (their notes
        tokenized as `windows`), null on the others; a row whose output is not finite gets
        reason non_finite in `reasons` and nulls."""
        r, task = self.runner, self.runner.task
        out = r.encode_windows(windows) if len(good) else None
        vectors = classes = entities = None
        if r.options.embeddings:
            vectors = r.aggregate_vectors(windows, out.vectors) if out else np.zeros(
                (0, r.config.hidden_size), np.float32)  # fmt: skip
        if task is not None and task.kind == SEQUENCE:
            o = r.options
            classes = note_classes(
                out.class_logits if out else np.zeros((0, task.num_labels), np.float32),
                windows, task, o.class_aggregate, o.threshold, o.huang_c,
            )  # fmt: skip
        if task is not None and task.kind == TOKEN:
            logits = out.token_logits if out else np.zeros((0, task.num_labels), np.float32)
            entities = r.group_entities([notes[i] for i in good], windows, logits,
                                        **self.entity_options)  # fmt: skip
        bad = non_finite_notes(windows, vectors, None, None if classes is None else classes[0],
                               out.token_logits if out else None)  # fmt: skip
        for i in good[bad]:
            reasons[i] = str(ReasonCode.NON_FINITE.value)
        at = np.full(len(notes), -1)
        at[good[~bad]] = np.flatnonzero(~bad)
        rows = pa.array(at, mask=at < 0)  # each row's place among `good`; null: none
        columns: dict[str, pa.Array] = {}
        if vectors is not None:
            columns[self.output_column] = embedding_column(vectors)["embedding"]
        if classes is not None:
            columns |= class_columns(*classes)
        if entities is not None:
            columns["entities"] = entity_column(entities)
        return {name: values.take(rows) for name, values in columns.items()}


def _as_table(batch: Any) -> pa.Table:
    """A Ray Data batch (numpy dict, pyarrow Table, pandas DataFrame) as a pyarrow Table."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        columns = {}
        for name, values in batch.items():
            values = np.asarray(values)
            if values.ndim > 1:  # tensor columns: one fixed-size list per row
                rows = values.reshape(len(values), -1)
                columns[name] = pa.FixedSizeListArray.from_arrays(
                    pa.array(rows.ravel()), rows.shape[1]
                )
            else:
                columns[name] = pa.array(values, from_pandas=True)
        return pa.table(columns)
    return pa.Table.from_pandas(batch, preserve_index=False)
