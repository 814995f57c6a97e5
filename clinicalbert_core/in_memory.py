"""The runner's methods for notes in memory: `encode`, `embed`, `classify`, `entities`, `mlm`.

Each chains the runner's steps (tokenize, encode_windows, the heads' aggregation) for a list of
notes. An empty note (aggregate.empty_notes) is never encoded: it gets a zero row, no labels,
no entities or no predictions, flagged where the output has a flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .aggregate import empty_notes, empty_problem, fill_hidden, fill_rows, select_notes
from .classify import SEQUENCE, TOKEN, ClassifyOutput, note_classes
from .mlm import MlmPrediction

if TYPE_CHECKING:
    from .tokenizer import Windows


@dataclass
class EncodeOutput:
    pooled: torch.Tensor  # float32[notes, C] ([windows, C] with aggregate 'none'; [0, C]
    # when the runner computes no embeddings)
    windows: Windows
    empty: np.ndarray  # bool[rows of pooled]: an empty note (or its window), not encoded; the
    # row is zeros (see aggregate.empty_notes)
    hidden: torch.Tensor | None = None  # float32[N, C] packed over windows (zeros for empty)
    cu_seqlens: torch.Tensor | None = None  # int32[W+1]


class NoteMethods:
    """Mixed into ClinicalBertRunner (self is the runner)."""

    def encode(self, notes: Sequence[str], return_hidden: bool = True) -> EncodeOutput:
        """Pooled vectors (and hidden states) of `notes`. An empty note is not encoded: its
        row of `pooled` (its window's, with aggregate 'none') is zeros and `empty` flags it;
        the other notes' rows are exactly those of encoding them alone."""
        windows = self.tokenize(notes)
        empty = empty_notes(notes, windows)
        kept = ~empty[windows.note]  # (W,) the windows encoded
        sub = select_notes(windows, ~empty)
        out = self.encode_windows(sub, return_hidden=return_hidden)
        rows = kept if self.aggregate == "none" else ~empty
        hidden = cu = None
        if return_hidden:
            hidden, cu = fill_hidden(windows, kept, out.hidden)
        pooled = out.vectors  # [0, C]: the runner computes no embeddings
        if self.options.embeddings:
            pooled = fill_rows(rows, self.aggregate_vectors(sub, out.vectors))
        return EncodeOutput(
            pooled=torch.from_numpy(pooled),
            windows=windows,
            empty=~rows,
            hidden=hidden,
            cu_seqlens=cu,
        )

    def embed(self, notes: Sequence[str]) -> np.ndarray:
        """One float32 vector per note (per window with aggregate 'none') as numpy. An empty
        note has no vector: ValueError naming it (`encode` flags it in `empty` instead)."""
        windows = self.tokenize(notes)
        if problem := empty_problem(empty_notes(notes, windows)):
            raise ValueError(problem)
        return self.aggregate_vectors(windows, self.encode_windows(windows).vectors)

    def classify(self, notes: Sequence[str]) -> ClassifyOutput:
        """The loaded sequence classifier's logits, scores and labels per note, its windows
        aggregated by `class_aggregate` (classify.aggregate_logits). An empty note is not
        encoded: its row is zeros, without labels, flagged in `empty`."""
        _needs(self, SEQUENCE, "classify")
        windows = self.tokenize(notes)
        empty = empty_notes(notes, windows)
        sub = select_notes(windows, ~empty)
        o = self.options
        logits, note_scores, labels = note_classes(
            self.encode_windows(sub).class_logits, sub, self.task, o.class_aggregate,
            o.threshold, o.huang_c,
        )  # fmt: skip
        rows = ~empty[windows.note] if o.class_aggregate == "none" else ~empty
        found = iter(labels)
        return ClassifyOutput(
            fill_rows(rows, logits), fill_rows(rows, note_scores),
            [next(found) if r else [] for r in rows], windows, ~rows,
        )  # fmt: skip

    def mlm(
        self, notes: Sequence[str], top_k: int = 5, positions: str = "mask"
    ) -> list[list[MlmPrediction]]:
        """Top-k predictions per note at its [MASK] tokens (or at every token: positions='all');
        none for an empty note."""
        if self.mlm_head is None:
            raise ValueError("this runner was loaded without the MLM head: pass mlm=True")
        windows = self.tokenize(notes)
        keep = ~empty_notes(notes, windows)  # an empty note is not encoded: no predictions
        kept, windows = np.flatnonzero(keep), select_notes(windows, keep)
        rows = self.encode_windows(windows, mlm_positions=positions, top_k=top_k).mlm
        result: list[list[MlmPrediction]] = [[] for _ in notes]
        if rows is None:
            return result
        vocab = self.tokenizer.tokenizer
        for m in range(len(rows.window)):
            w, p = int(rows.window[m]), int(rows.position[m])
            ids, note = rows.top_ids[m].tolist(), int(kept[windows.note[w]])
            result[note].append(
                MlmPrediction(
                    note=note,
                    window=int(windows.window_index[w]),
                    position=p,
                    char_start=int(windows.token_char[windows.bounds[w] + p]),
                    ids=ids,
                    tokens=[vocab.id_to_token(i) for i in ids],
                    log_probs=rows.top_logprobs[m].tolist(),
                )
            )
        return result

    def entities(
        self,
        notes: Sequence[str],
        aggregation: str = "simple",
        ignore_labels: Sequence[str] = ("O",),
        min_score: float = 0.0,
    ) -> list[list[dict[str, Any]]]:
        """The loaded token classifier's entities per note: dicts of start, end (character
        offsets into the note), label and score, grouped by `aggregation` as transformers'
        token-classification pipeline groups them (entities.py); a long note's windows are
        stitched first (stitch.py). None for an empty note."""
        _needs(self, TOKEN, "entities")
        windows = self.tokenize(notes)
        keep = ~empty_notes(notes, windows)
        kept, sub = np.flatnonzero(keep), select_notes(windows, keep)
        found = self.group_entities(
            [notes[i] for i in kept], sub, self.encode_windows(sub).token_logits, aggregation,
            ignore_labels, min_score,
        )  # fmt: skip
        result: list[list[dict[str, Any]]] = [[] for _ in notes]
        for k, i in enumerate(kept):
            result[i] = found.note(k)
        return result


def _needs(runner: Any, kind: str, method: str) -> None:
    """ValueError unless the runner loaded a `kind` classifier."""
    task = runner.task
    if task is None or task.kind != kind:
        what = f"this checkpoint's is a {task.kind} classifier" if task else (
            "load the runner with classify=True")  # fmt: skip
        raise ValueError(f"{method}() needs a {kind} classifier: {what}")
