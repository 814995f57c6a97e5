"""Per-token logits -> entity spans per note, grouped as transformers' token-classification
pipeline groups them (its aggregation strategies none, simple, first, average, max).

The pipeline's rules, reproduced (`TokenClassificationPipeline.postprocess` and its helpers):
- Scores: a softmax over each token's logits in float32; a token's label is its argmax.
- Words (first, average, max): a token flagged as a subword (`Subwords`, the pipeline's
  is_subword heuristics) continues the previous token's word; a note's first token starts one.
  A word takes its first token's label and score (first), its surest token's (max; the first
  of equals), or the argmax of the nanmean of its tokens' softmax rows (average); it spans from
  its first token's start to its last token's end.
- Groups (all but none): a token (simple) or word joins the previous one's group when both have
  the same tag and it is not a B- ("B-x" -> B, x; "I-x" -> I, x; any other name -> I, the whole
  name). A group is named after its first member's label `split("-", 1)[-1]` (so a non-BIO
  "X-RAY" is tagged "X-RAY" but its group is named "RAY", as the pipeline names it), scores the
  nanmean of its members' scores and spans from the first member's start to the last's end.
- `ignore_labels` drops entities whose label (none) or group name (the others) it lists.

The one deliberate difference: `min_score` also drops entities scoring below it (the pipeline
has no such threshold; 0 keeps every entity).

Everything runs in numpy over a whole batch of notes at once: word and group starts are boundary
masks (a note's first token is always one), members are reduced with `np.*.reduceat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

STRATEGIES = ("none", "simple", "first", "average", "max")


@dataclass
class NoteTokens:
    """A batch of notes' tokens, note after note (special tokens dropped, windows stitched)."""

    ids: np.ndarray  # int32[T] token ids
    start: np.ndarray  # int64[T] char offset of the token's first char in its note
    end: np.ndarray  # int64[T] one past its last char
    logits: np.ndarray  # float32[T, L]
    offsets: np.ndarray  # int64[notes+1]: note i's tokens are [offsets[i], offsets[i+1])

    @property
    def num_notes(self) -> int:
        return len(self.offsets) - 1


@dataclass
class Entities:
    """Every note's entities, note after note, each note's in text order."""

    start: np.ndarray  # int32[E]
    end: np.ndarray  # int32[E]
    label: np.ndarray  # int32[E] index into `names`
    score: np.ndarray  # float32[E]
    offsets: np.ndarray  # int64[notes+1]: note i's entities are [offsets[i], offsets[i+1])
    names: tuple[str, ...]  # label names `label` indexes

    def note(self, i: int) -> list[dict]:
        """Note i's entities as [{"start", "end", "label", "score"}, ...] (python types)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        rows = zip(self.start[a:b].tolist(), self.end[a:b].tolist(), self.label[a:b].tolist(),
                   self.score[a:b].tolist())  # fmt: skip
        return [{"start": s, "end": e, "label": self.names[k], "score": p} for s, e, k, p in rows]


@dataclass(frozen=True)
class Subwords:
    """How a tokenizer marks a token that continues the previous token's word, by the
    pipeline's rules: with a continuing_subword_prefix (WordPiece "##", some BPE), a token whose
    string is not as long as the text it covers; otherwise (byte-level BPE, Unigram) a token
    that starts neither at a note's start nor next to a space. The unknown token never does."""

    lengths: np.ndarray | None  # int64[V] each vocab id's token length; None: the fallback rule
    unk_id: int | None  # the tokenizer model's unk_token, if it has one

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> Subwords:
        model = tokenizer.model
        unk = getattr(model, "unk_token", None)
        unk_id = tokenizer.token_to_id(unk) if unk else None
        if not getattr(model, "continuing_subword_prefix", None):
            return cls(None, unk_id)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        ids = np.fromiter(vocab.values(), np.int64, len(vocab))
        lengths = np.full(int(ids.max(initial=-1)) + 1, -1, np.int64)  # -1: no token has the id
        lengths[ids] = np.fromiter(map(len, vocab), np.int64, len(vocab))
        return cls(lengths, unk_id)

    def flags(self, notes: Sequence[str], tokens: NoteTokens) -> np.ndarray:
        """bool[T]: each token continues the previous token's word (`notes`: the batch's notes,
        whose characters `tokens.start`/`end` count)."""
        counts = np.diff(tokens.offsets)  # (notes,)
        if len(notes) != len(counts):
            raise ValueError(f"{len(notes)} notes given for tokens of {len(counts)} notes")
        sizes = np.fromiter(map(len, notes), np.int64, len(notes))  # (notes,) in characters
        size = np.repeat(sizes, counts)  # (T,) the length of each token's note
        start = np.asarray(tokens.start, np.int64)
        if self.lengths is not None:
            ids = np.asarray(tokens.ids, np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= len(self.lengths)):
                raise ValueError(f"token ids run {ids.min()}..{ids.max()}, outside the "
                                 f"tokenizer's vocab of {len(self.lengths)}")  # fmt: skip
            covered = np.clip(tokens.end, 0, size) - np.clip(start, 0, size)  # len(note[s:e])
            sub = self.lengths[ids] != np.maximum(covered, 0)
        else:
            codes = np.frombuffer("".join(notes).encode("utf-32-le"), np.uint32)  # (chars,)
            space = np.append(codes == 32, False)  # " " only, as the pipeline looks
            base = np.repeat(np.cumsum(sizes) - sizes, counts)  # (T,) the note's first char

            def is_space(pos: np.ndarray) -> np.ndarray:
                inside = (pos >= 0) & (pos < size)
                return inside & space[np.where(inside, base + pos, len(codes))]

            sub = (start > 0) & ~is_space(start - 1) & ~is_space(start)
        if self.unk_id is not None:
            sub &= tokens.ids != self.unk_id
        return sub


def group(
    tokens: NoteTokens,
    subword: np.ndarray,
    labels: Sequence[str],
    strategy: str = "simple",
    ignore_labels: Sequence[str] = ("O",),
    min_score: float = 0.0,
) -> Entities:
    """The entities of every note in `tokens`, as transformers' token-classification pipeline
    with `aggregation_strategy=strategy` and `ignore_labels` gives them, less those scoring
    below `min_score`. `subword` bool[T]: `Subwords.flags` (used by first, average and max);
    `labels`: id2label in id order. Labels are the full label (none) or the group's name."""
    _check(tokens, subword, labels, strategy)
    n, total = tokens.num_notes, len(tokens.ids)
    note = np.repeat(np.arange(n), np.diff(tokens.offsets))  # (T,)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN logits give NaN scores, no error
        probs = softmax(tokens.logits)  # (T, L)
        if strategy in ("none", "simple") or not total:
            label = probs.argmax(1)  # (T,)
            score = probs[np.arange(total), label]
            start, end = tokens.start, tokens.end
        else:
            starts = _first_of_runs(note) | ~np.asarray(subword, bool)  # (T,) a word starts
            words = np.flatnonzero(starts)  # (W,) each word's first token
            label, score = _word_labels(probs, words, strategy)
            start, end = tokens.start[words], tokens.end[_ends(words, total) - 1]
            note = note[words]
        if strategy == "none":
            names = tuple(labels)
        else:
            label, score, start, end, note, names = _group_entities(label, score, start, end,
                                                                   note, labels)  # fmt: skip
    ignore = set(ignore_labels)
    ignored = np.array([name in ignore for name in names], bool)  # (names,)
    keep = ~ignored[label] & ~(score < min_score)
    counts = np.bincount(note[keep], minlength=n)
    return Entities(
        start=start[keep].astype(np.int32), end=end[keep].astype(np.int32),
        label=label[keep].astype(np.int32), score=score[keep].astype(np.float32),
        offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64), names=names,
    )  # fmt: skip


def _check(tokens: NoteTokens, subword: np.ndarray, labels: Sequence[str], strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    total, logits = len(tokens.ids), tokens.logits
    if not len(labels):
        raise ValueError("labels name no label: need the classifier's id2label, in id order")
    if logits.ndim != 2 or len(logits) != total:
        raise ValueError(f"logits of shape {logits.shape} for {total} tokens: need ({total}, L)")
    if logits.shape[1] != len(labels):
        raise ValueError(f"logits have {logits.shape[1]} labels per token but labels name "
                         f"{len(labels)}")  # fmt: skip
    for name, column in (("start", tokens.start), ("end", tokens.end), ("subword", subword)):
        if len(column) != total:
            raise ValueError(f"{name} has {len(column)} rows for {total} tokens")
    offsets = tokens.offsets
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
        raise ValueError(f"offsets must rise from 0 to the {total} tokens")


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32[T, L] -> float32[T, L]: the pipeline's softmax, row by row."""
    logits = np.asarray(logits, np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _first_of_runs(keys: np.ndarray) -> np.ndarray:
    """bool[n]: where keys int[n] differs from the one before (the first is always True)."""
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    return first


def _ends(starts: np.ndarray, total: int) -> np.ndarray:
    """int64[G]: one past each run's last row, for runs starting at `starts` int64[G]."""
    return np.append(starts[1:], total)[: len(starts)]  # none when there is no run


def _word_labels(probs: np.ndarray, words: np.ndarray, strategy: str) -> tuple[np.ndarray, ...]:
    """(label int64[W], score float32[W]) of the words starting at rows `words` int64[W] of
    probs float32[T, L]: first, max or average, as the pipeline's aggregate_word."""
    rows = np.arange(len(words))
    if strategy == "first":
        pick = words
    elif strategy == "max":  # the first token whose top score is the word's highest
        top = probs.max(1)  # (T,)
        highest = np.repeat(np.maximum.reduceat(top, words), _word_sizes(words, len(top)))
        index = np.where(top == highest, np.arange(len(top)), len(top))
        pick = np.minimum.reduceat(index, words)
        pick = np.where(pick == len(top), words, pick)  # NaN scores: the word's first token
    else:  # average: the nanmean of the word's softmax rows
        nan = np.isnan(probs)
        if nan.any():
            counts = np.add.reduceat((~nan).astype(np.float32), words, axis=0)  # (W, L)
            mean = np.add.reduceat(np.where(nan, 0, probs), words, axis=0) / counts
        else:
            counts = _word_sizes(words, len(probs)).astype(np.float32)  # (W,)
            mean = np.add.reduceat(probs, words, axis=0) / counts[:, None]  # (W, L)
        label = mean.argmax(1)
        return label, mean[rows, label].astype(np.float32)
    label = probs[pick].argmax(1)
    return label, probs[pick, label]


def _word_sizes(starts: np.ndarray, total: int) -> np.ndarray:
    """int64[G]: the rows in each run starting at `starts` int64[G]."""
    return _ends(starts, total) - starts


def _group_entities(label, score, start, end, note, labels: Sequence[str]):
    """Tokens or words -> entity groups (the pipeline's group_entities): each input int64/float32
    [U] in text order -> the same per group, with the group names `label` indexes."""
    is_b = np.array([name.startswith("B-") for name in labels], bool)
    tags = [name[2:] if name.startswith(("B-", "I-")) else name for name in labels]
    tag = np.array([tags.index(t) for t in tags], np.int64)  # (L,) the tag, as a number
    new = _first_of_runs(note) | _first_of_runs(tag[label]) | is_b[label]  # (U,)
    groups = np.flatnonzero(new)  # (G,) each group's first member
    named = [name.split("-", 1)[-1] for name in labels]
    names = tuple(dict.fromkeys(named))
    name_of = np.array([names.index(n) for n in named], np.int64)  # (L,)
    nan = np.isnan(score)
    total = np.add.reduceat(np.where(nan, 0, score), groups)
    mean = (total / np.add.reduceat((~nan).astype(np.int64), groups)).astype(np.float32)
    last = _ends(groups, len(label)) - 1
    return name_of[label[groups]], mean, start[groups], end[last], note[groups], names
