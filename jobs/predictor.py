"""EncoderPredictor: the runner as a Ray Data `map_batches` class, for users' own pipelines.

    ds = ray.data.read_parquet("notes/")
    ds = ds.map_batches(
        EncoderPredictor,
        fn_constructor_kwargs={"model": "models/bio_clinicalbert", "variant": "bio_clinicalbert"},
        num_gpus=1, concurrency=4, batch_size=256,
    )

Loads once per actor in `__init__`, handles one batch (dict of numpy arrays) in `__call__`:
adds an `embedding` column (float32 [rows, C]; NaN rows where the note is bad) and an
`error` column (None, or the reason code of jobs.output.ReasonCode). Testable without Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from clinicalbert_core.hub import ModelBundle
from clinicalbert_core.runner import ClinicalBertRunner

from .actor import classify, tokenize_rows


class EncoderPredictor:
    def __init__(
        self,
        model: str | ModelBundle,
        *,
        text_column: str = "text",
        output_column: str = "embedding",
        device: str | None = None,
        max_note_chars: int = 2_000_000,
        **runner_options: Any,
    ):
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, ModelBundle):
            self.runner = ClinicalBertRunner.from_bundle(model, device=device, **runner_options)
        else:
            self.runner = ClinicalBertRunner.load(model, device=device, **runner_options)
        if self.runner.aggregate == "none":
            raise ValueError(
                "EncoderPredictor writes one vector per row: use aggregate 'mean' or 'first'"
            )
        self.text_column, self.output_column = text_column, output_column
        self.max_note_chars = max_note_chars

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.text_column not in batch:
            raise ValueError(
                f"batch has no column {self.text_column!r} (columns: {sorted(batch)}); "
                "set text_column in fn_constructor_kwargs"
            )
        texts = pa.array(list(batch[self.text_column]), from_pandas=True)
        ids = pa.array(np.zeros(len(texts), np.int8))  # row identity is the batch position
        notes, reasons = classify(texts, ids, self.max_note_chars)
        good, windows = tokenize_rows(self.runner, notes, reasons)
        vectors = np.full((len(notes), self.runner.config.hidden_size), np.nan, np.float32)
        if len(good):
            out = self.runner.encode_windows(windows)
            vectors[good] = self.runner.aggregate_vectors(windows, out.vectors)
        return {
            **batch,
            self.output_column: vectors,
            "error": np.array(reasons, dtype=object),
        }
