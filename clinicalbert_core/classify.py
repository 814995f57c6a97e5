"""Fine-tuned classifiers' outputs: what the checkpoint's config says a classifier head predicts
(`TaskHead`), logits turned into scores and labels, and a long note's windows aggregated into
one prediction. Pure numpy, no torch: the heads' layers live beside each architecture.

A checkpoint's head kind comes from its config's `architectures` (`*ForSequenceClassification`,
`*ForTokenClassification`); a classifier in a config that predates `architectures` (Huang's
readmission model) is a sequence classifier. Labels are `id2label` in id order (transformers'
`LABEL_<i>` where the config has none); the number of labels is the classifier's rows.

Scores (`TaskHead.score`): softmax for single-label heads; sigmoid for multi-label heads and for
a one-logit head whose config names no problem type (a binary score such as Huang's 30-day
readmission probability); the raw value where `problem_type` is `regression`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint_limits import shown

if TYPE_CHECKING:
    from .tokenizer import Windows

SEQUENCE, TOKEN = "sequence", "token"
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
CLASS_AGGREGATES = ("mean", "max", "first", "none", "huang")
HUANG_C = 2.0  # the scaling constant of Huang et al.'s readmission score (their code's c)


@dataclass(frozen=True)
class TaskHead:
    """What a checkpoint's classifier predicts: per note (`sequence`) or per token (`token`)."""

    kind: str
    labels: tuple[str, ...]  # id2label, in id order
    problem_type: str | None  # as the config says; None where it predates problem_type

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def score(self) -> str:
        """How logits become scores: `softmax`, `sigmoid` or `raw` (see the module doc)."""
        if self.problem_type == "regression":
            return "raw"
        if self.problem_type == "multi_label_classification" or self.num_labels == 1:
            return "sigmoid"
        return "softmax"

    def describe(self) -> str:
        """One line for `inspect` and error messages."""
        kind = "sequence classifier" if self.kind == SEQUENCE else "token classifier"
        labels = ", ".join(self.labels[:8]) + (f", ... ({self.num_labels} labels)"
                                               if self.num_labels > 8 else "")  # fmt: skip
        problem = self.problem_type or "no problem_type"
        return f"{kind}, {self.num_labels} label(s): {labels}; {problem}, scores by {self.score}"


@dataclass
class ClassifyOutput:
    """A sequence classifier's predictions (clinicalbert_core/classify.py), one row per note
    (per window with class_aggregate 'none'); an empty note's row is zeros without labels."""

    logits: np.ndarray  # float32[rows, L]
    scores: np.ndarray  # float32[rows, L]: softmax, sigmoid or raw (TaskHead.score)
    labels: list[list[str]]
    windows: Windows
    empty: np.ndarray  # bool[rows]: an empty note (or its window), not encoded


def task_head(
    raw: dict[str, Any], num_labels: int | None, source: str = "config"
) -> TaskHead | None:
    """The classifier head a checkpoint carries, from its config dict `raw` and the number of
    rows of its classifier weight (None: the weights have no classifier). ValueError naming
    `source` where the config contradicts the weights or names labels it cannot have."""
    names = raw.get("architectures") or []
    names = [a for a in names if isinstance(a, str)] if isinstance(names, list) else []
    kinds = {SEQUENCE for a in names if a.endswith("ForSequenceClassification")}
    kinds |= {TOKEN for a in names if a.endswith("ForTokenClassification")}
    if num_labels is None:
        if kinds:
            raise ValueError(f"{source}: architectures {shown(names)} names a classifier, but "
                             "the weights have none (no classifier.weight)")  # fmt: skip
        return None
    if len(kinds) > 1:
        raise ValueError(f"{source}: architectures {shown(names)} names both a sequence and a "
                         "token classifier")  # fmt: skip
    declared = raw.get("num_labels")
    if declared is not None and declared != num_labels:
        raise ValueError(f"{source}: num_labels is {shown(declared)}, the classifier has "
                         f"{num_labels} rows")  # fmt: skip
    problem = raw.get("problem_type")
    if problem is not None and problem not in PROBLEM_TYPES:
        raise ValueError(f"{source}: problem_type {shown(problem)} is not one of "
                         f"{', '.join(PROBLEM_TYPES)}")  # fmt: skip
    kind = kinds.pop() if kinds else SEQUENCE
    return TaskHead(kind, _labels(raw.get("id2label"), num_labels, source), problem)


def classifier_info(raw: dict[str, Any], num_labels: int | None) -> dict[str, Any] | None:
    """What `inspect` shows of a checkpoint's classifier (`task_head` of the same arguments):
    None without one, or where the config contradicts it (`inspect` names that elsewhere)."""
    try:
        return head_info(task_head(raw, num_labels))
    except ValueError:
        return None


def head_info(head: TaskHead | None) -> dict[str, Any] | None:
    """A classifier head as plain data (inspect, ModelBundle, validate); None for none."""
    if head is None:
        return None
    return {"kind": head.kind, "labels": list(head.labels), "problem_type": head.problem_type,
            "score": head.score, "description": head.describe()}  # fmt: skip


def _labels(id2label: Any, n: int, source: str) -> tuple[str, ...]:
    if id2label is None:
        return tuple(f"LABEL_{i}" for i in range(n))
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise ValueError(f"{source}: id2label must map label ids to names, got {shown(id2label)}")
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{source}: id2label keys must be label ids 0..{n - 1}, got "
                         f"{shown(list(id2label))}") from None  # fmt: skip
    if sorted(by_id) != list(range(n)):
        raise ValueError(f"{source}: id2label names {len(by_id)} labels with ids "
                         f"{shown(sorted(by_id))}; the classifier has {n} rows (ids 0..{n - 1})")  # fmt: skip
    return tuple(by_id[i] for i in range(n))


def scores(logits: np.ndarray, how: str) -> np.ndarray:
    """float32 scores of logits [..., L]: `softmax` over L, `sigmoid` per logit, or `raw`."""
    x = logits.astype(np.float64)
    if how == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    if how == "sigmoid":
        return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # no overflow at any x
    if how == "raw":
        return x.astype(np.float32)
    raise ValueError(f"unknown score {how!r}; expected softmax, sigmoid or raw")


def predicted_labels(
    note_scores: np.ndarray, head: TaskHead, threshold: float = 0.5
) -> list[list[str]]:
    """Each row's labels: the argmax label (softmax); every label whose score is >= threshold
    (sigmoid: multi-label, and a one-logit head's one label); none for regression."""
    if head.score == "raw":
        return [[] for _ in range(len(note_scores))]
    if head.score == "softmax":
        return [[head.labels[i]] for i in note_scores.argmax(axis=1)]
    return [[head.labels[i] for i in np.flatnonzero(row >= threshold)] for row in note_scores]


def aggregate_logits(
    logits: np.ndarray,
    note: np.ndarray,
    window_index: np.ndarray,
    num_notes: int,
    how: str,
    score: str,
    c: float = HUANG_C,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-window logits [W, L] -> per-note (logits, scores) [num_notes, L] float32.

    Windows may come in any order: `note[W]` says whose each is, `window_index[W]` its place.
    `mean`: the mean of the windows' logits, scored; `max`: each label's highest score over the
    windows (and its highest logit); `first`: window 0's; `huang`: for a one-logit sigmoid head,
    Huang et al.'s readmission score (max_p + sum_p / c) / (1 + n / c) over the note's n window
    probabilities, its logit the score's inverse sigmoid; `none`: the windows are the rows."""
    num_labels = logits.shape[1]
    if how == "none":
        return logits.astype(np.float32), scores(logits, score)
    if how == "first":
        out = np.zeros((num_notes, num_labels), np.float64)
        first = window_index == 0
        out[note[first]] = logits[first]
        return out.astype(np.float32), scores(out, score)
    if how == "mean":
        sums = np.zeros((num_notes, num_labels), np.float64)
        np.add.at(sums, note, logits.astype(np.float64))
        mean = sums / np.bincount(note, minlength=num_notes)[:, None]
        return mean.astype(np.float32), scores(mean, score)
    if how == "max":
        top_logits = np.full((num_notes, num_labels), -np.inf)
        np.maximum.at(top_logits, note, logits.astype(np.float64))
        top_scores = np.full((num_notes, num_labels), -np.inf, np.float32)
        np.maximum.at(top_scores, note, scores(logits, score))
        return top_logits.astype(np.float32), top_scores
    if how == "huang":
        if num_labels != 1 or score != "sigmoid":
            raise ValueError("aggregate 'huang' needs a one-logit head scored by sigmoid (a "
                             f"binary readmission model); this head has {num_labels} logits "
                             f"scored by {score}")  # fmt: skip
        p = scores(logits, "sigmoid")[:, 0].astype(np.float64)
        n = np.bincount(note, minlength=num_notes).astype(np.float64)
        top = np.full(num_notes, -np.inf)
        np.maximum.at(top, note, p)
        total = np.bincount(note, weights=p, minlength=num_notes)
        huang = ((top + total / c) / (1.0 + n / c))[:, None]
        clipped = np.clip(huang, 1e-7, 1 - 1e-7)
        return np.log(clipped / (1 - clipped)).astype(np.float32), huang.astype(np.float32)
    raise ValueError(f"unknown classification aggregate {how!r}; expected one of "
                     f"{', '.join(CLASS_AGGREGATES)}")  # fmt: skip


def note_classes(
    logits: np.ndarray, windows: Windows, head: TaskHead, how: str, threshold: float, c: float
) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Per-window logits [W, L] of `windows` -> (logits, scores, labels) per note (per window
    with `how` none): `aggregate_logits` and `predicted_labels`."""
    rows, row_scores = aggregate_logits(
        logits, windows.note, windows.window_index, windows.num_notes, how, head.score, c
    )
    return rows, row_scores, predicted_labels(row_scores, head, threshold)
