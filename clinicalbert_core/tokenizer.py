"""Note tokenization with `tokenizers`: casing, specials, truncation or sliding windows.

Any `tokenizer.json` (WordPiece or BPE): its own padding and truncation are switched off, the
framing and mask tokens come from the tokenizer files and config (`find_specials`), casing
changes only where the normalizer has a switch for it. The output is packed like the
encoder's input: every window's ids (framed by [CLS]/[SEP] or their equivalents)
concatenated, `bounds[W+1]` marking where each starts, and per window the note it came from,
its index in that note and the character span of the note it covers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .checkpoint_limits import (
    MAX_CONFIG_SIZES,
    MAX_TOKENIZER_JSON_BYTES,
    MAX_VOCAB_TXT_BYTES,
    check_file_size,
)
from .errors import message_line
from .limits import FRAMING_TOKENS, body_tokens, default_stride, stride_problem

LONG_NOTE_POLICIES = ("truncate", "windows")
MAX_NOTE_CHARS = 2**31 - 1  # token char offsets are int32 (a job's run.max_note_chars is lower)
CHUNK_CHARS = 20_000  # longer notes are tokenized in pieces (see NoteTokenizer._pieces)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json; ValueError naming the file when it is over MAX_TOKENIZER_JSON_BYTES
    (checked before it is read) or `tokenizers` cannot read it."""
    check_file_size(Path(path), MAX_TOKENIZER_JSON_BYTES, "a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ValueError(
            f"{path}: not a valid tokenizer.json ({message_line(e) or type(e).__name__})"
        ) from None


def read_vocab(path: str | Path) -> dict[str, int]:
    """A vocab.txt, one token a line; at most MAX_VOCAB_TXT_BYTES (checked before it is read)
    and MAX_CONFIG_SIZES["vocab_size"] lines."""
    check_file_size(Path(path), MAX_VOCAB_TXT_BYTES, "a vocab.txt")
    data = Path(path).read_bytes()
    count, limit = data.count(b"\n") + (not data.endswith(b"\n")), MAX_CONFIG_SIZES["vocab_size"]
    if count > limit:
        raise ValueError(
            f"{path}: {count:,} tokens, over the limit of {limit:,} "
            "(clinicalbert_core.checkpoint_limits)"
        )
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    vocab: dict[str, int] = {}
    for i, token in enumerate(lines):
        if token in vocab:
            raise ValueError(f"{path}: duplicate token on line {i + 1}")
        vocab[token] = i
    missing = [t for t in SPECIALS if t not in vocab]
    if missing:
        raise ValueError(f"{path}: vocab lacks special tokens {missing}")
    return vocab


def wordpiece_from_vocab(vocab_path: str | Path, lowercase: bool) -> Tokenizer:
    """A BERT WordPiece tokenizer equal to BertTokenizerFast(vocab, do_lower_case=lowercase)."""
    vocab = read_vocab(vocab_path)
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIALS))  # "[MASK]" in a note is the mask token, not 3 pieces
    return tok


def tokenizer_kind(tok: Tokenizer) -> str:
    """The tokenizer's model: WordPiece, BPE, Unigram or WordLevel."""
    return json.loads(tok.to_str())["model"]["type"]


def _lowercases(norm: dict[str, Any] | None) -> bool:
    if not norm:
        return False
    kind = norm.get("type")
    if kind == "BertNormalizer":
        return bool(norm.get("lowercase"))
    if kind == "Sequence":
        return any(_lowercases(n) for n in norm.get("normalizers", []))
    return kind == "Lowercase"


def tokenizer_casing(tok: Tokenizer) -> bool:
    """True when the tokenizer's normalizer lowercases the text, False when it keeps case."""
    return _lowercases(json.loads(tok.to_str()).get("normalizer"))


def with_casing(tok: Tokenizer, lowercase: bool) -> Tokenizer:
    """The same tokenizer, lowercasing or not. Only a BertNormalizer has a switch for it
    (strip_accents follows it, as in BERT); any other tokenizer can only keep its own casing."""
    if tokenizer_casing(tok) == lowercase:
        return tok
    spec = json.loads(tok.to_str())
    norm = spec.get("normalizer") or {}
    if norm.get("type") != "BertNormalizer":
        raise ValueError(
            f"cannot make a {tokenizer_kind(tok)} tokenizer "
            f"{'lowercase' if lowercase else 'keep case'}: its normalizer "
            f"({norm.get('type') or 'none'}) has no casing switch (only BERT WordPiece "
            "tokenizers do); leave lowercase unset to use the tokenizer's own casing"
        )
    norm["lowercase"] = lowercase
    norm["strip_accents"] = None
    return Tokenizer.from_str(json.dumps(spec))


def without_padding_and_truncation(tok: Tokenizer) -> tuple[Tokenizer, list[str]]:
    """A copy of `tok` with its embedded padding and truncation switched off (the runtime
    owns windows and truncation), and a note of each setting it removed."""
    tok = Tokenizer.from_str(tok.to_str())
    notes = []
    if tok.padding is not None:
        notes.append(f"padding switched off (was {json.dumps(tok.padding, sort_keys=True)})")
        tok.no_padding()
    if tok.truncation is not None:
        notes.append(f"truncation switched off (was {json.dumps(tok.truncation, sort_keys=True)})")
        tok.no_truncation()
    return tok, notes


@dataclass(frozen=True)
class Specials:
    """Ids of the tokens that frame a window and mark a masked position."""

    cls: int  # starts every window ([CLS], or the tokenizer's equivalent)
    sep: int  # ends every window
    mask: int | None  # the mask token; None when the tokenizer has none

    def to_dict(self) -> dict[str, int | None]:
        return {"cls": self.cls, "sep": self.sep, "mask": self.mask}


def _frame(processor: dict[str, Any] | None) -> tuple[int, int] | None:
    """(first, last) special ids a post-processor puts around a single sequence."""
    if not processor:
        return None
    kind = processor.get("type")
    if kind in ("BertProcessing", "RobertaProcessing"):
        return int(processor["cls"][1]), int(processor["sep"][1])
    if kind == "TemplateProcessing":
        pieces = processor.get("single", [])
        names = [p["SpecialToken"]["id"] for p in pieces if "SpecialToken" in p]
        first, last = pieces[:1], pieces[-1:]
        if names and "SpecialToken" in first[0] and "SpecialToken" in last[0]:
            table = processor.get("special_tokens", {})
            head = table[first[0]["SpecialToken"]["id"]]["ids"]
            tail = table[last[0]["SpecialToken"]["id"]]["ids"]
            if len(head) == 1 and len(tail) == 1:
                return int(head[0]), int(tail[0])
        return None
    if kind == "Sequence":
        for p in processor.get("processors", []):
            if (found := _frame(p)) is not None:
                return found
    return None


def find_specials(
    tok: Tokenizer,
    tokenizer_config: dict[str, Any] | None = None,
    config_ids: dict[str, int | None] | None = None,
) -> Specials:
    """The framing and mask tokens, from the tokenizer files and the model config.

    In order: tokenizer_config.json (`cls_token`, `sep_token`, `mask_token`), the
    tokenizer.json post-processor's single-sequence template (its first and last special
    tokens), the config's `cls_token_id` / `sep_token_id`; the mask falls back to the
    tokenizer's added special token named mask ([MASK], <mask>).
    """
    spec = json.loads(tok.to_str())
    named: dict[str, int | None] = {}
    for role in ("cls", "sep", "mask"):
        entry = (tokenizer_config or {}).get(f"{role}_token")
        if isinstance(entry, dict):
            entry = entry.get("content")
        named[role] = tok.token_to_id(entry) if isinstance(entry, str) else None
    frame = _frame(spec.get("post_processor"))
    config_ids = config_ids or {}
    cls = next(
        (i for i in (named["cls"], frame and frame[0], config_ids.get("cls")) if i is not None),
        None,
    )
    sep = next(
        (i for i in (named["sep"], frame and frame[1], config_ids.get("sep")) if i is not None),
        None,
    )
    if cls is None or sep is None:
        raise ValueError(
            "cannot tell which tokens start and end a sequence: the tokenizer.json has no "
            "post-processor template, there is no tokenizer_config.json cls_token/sep_token "
            "and the config has no cls_token_id/sep_token_id"
        )
    mask = named["mask"]
    if mask is None:
        masks = [
            t["id"] for t in spec.get("added_tokens", [])
            if t.get("special") and t["content"].strip("[]<>").lower() == "mask"
        ]  # fmt: skip
        mask = masks[0] if len(masks) == 1 else None
    return Specials(cls=int(cls), sep=int(sep), mask=None if mask is None else int(mask))


def _arrays(enc: Any, shift: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(enc.ids, dtype=np.int32)
    return ids, np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2) + shift


def _cut(text: str, at: int) -> int:
    """Where to end a piece at or after `at`: the start of a whitespace run (or the end)."""
    i = at
    while i < len(text) and not (text[i].isspace() and not text[i - 1].isspace()):
        i += 1
    return i


def _column(spans: list[np.ndarray], i: int) -> np.ndarray:
    """Column `i` of int32[t, 2] (start, end) char spans, concatenated."""
    return np.ascontiguousarray(np.concatenate(spans)[:, i]) if spans else np.zeros(0, np.int32)


@dataclass
class Windows:
    """Tokenized notes as packed windows (W windows, T tokens in all)."""

    ids: np.ndarray  # int32[T] every window's ids, [CLS] ... [SEP], concatenated
    token_char: np.ndarray  # int32[T] first char of each token in its note (-1 for specials)
    token_end: np.ndarray  # int32[T] one past each token's last char (-1 for specials)
    bounds: np.ndarray  # int64[W+1] window w is ids[bounds[w]:bounds[w+1]]
    note: np.ndarray  # int64[W] note index of each window
    window_index: np.ndarray  # int32[W] position of the window within its note
    char_start: np.ndarray  # int64[W] first char of the note the window covers
    char_end: np.ndarray  # int64[W] one past its last char
    note_tokens: np.ndarray  # int64[notes] word pieces in the note (no specials)
    truncated: np.ndarray  # bool[notes] tokens were dropped (truncate policy)

    @property
    def num_windows(self) -> int:
        return len(self.note)

    @property
    def num_notes(self) -> int:
        return len(self.note_tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)  # int64[W]

    def window_ids(self, w: int) -> np.ndarray:
        return self.ids[self.bounds[w] : self.bounds[w + 1]]

    def windows_per_note(self) -> np.ndarray:
        return np.bincount(self.note, minlength=self.num_notes)


class NoteTokenizer:
    """Batch tokenization of notes into windows of at most `max_seq` tokens."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_seq: int = 512,
        policy: str = "truncate",
        stride: int | None = None,
        specials: Specials | None = None,
        threads: int = 1,
    ):
        if policy not in LONG_NOTE_POLICIES:
            raise ValueError(
                f"long-note policy must be one of {LONG_NOTE_POLICIES}, got {policy!r}"
            )
        if max_seq <= FRAMING_TOKENS:  # a window holds its framing and one token at least
            raise ValueError(f"max_seq must be at least {FRAMING_TOKENS + 1}, got {max_seq}")
        stride = default_stride(max_seq) if stride is None else stride
        if policy == "windows" and (problem := stride_problem(stride, max_seq)):
            raise ValueError(problem)
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        # the runtime owns truncation and windows: a tokenizer.json's own are switched off
        self.tokenizer, _ = without_padding_and_truncation(tokenizer)
        self.max_seq, self.policy, self.stride = max_seq, policy, stride
        self.specials = specials or find_specials(tokenizer)
        self.cls_id, self.sep_id = self.specials.cls, self.specials.sep
        self.mask_id = self.specials.mask
        self.chunk_chars = CHUNK_CHARS
        self.threads = threads  # pieces one encode_batch call gets (see `encode`)

    @property
    def step(self) -> int:
        """Tokens between the starts of a note's consecutive windows."""
        return body_tokens(self.max_seq) - self.stride

    def __call__(self, notes: Sequence[str]) -> Windows:
        """Every note's windows (a note without tokens gets one: [CLS][SEP])."""
        return self._windows(notes, drop_empty=False)[1]

    def nonempty(self, notes: Sequence[str]) -> tuple[np.ndarray, Windows]:
        """(kept int64[k], windows): the notes that yield at least one token (by index in
        `notes`) and their windows, numbered 0..k-1 in that order."""
        return self._windows(notes, drop_empty=True)

    def _pieces(self, notes: Sequence[str]) -> Iterator[tuple[int, np.ndarray, np.ndarray, bool]]:
        """(note, ids int32[t], char offsets int64[t, 2], last piece of the note) in order.

        A note longer than `chunk_chars` is tokenized in pieces cut where a whitespace run
        starts (the same tokens as in one piece, since every pre-tokenizer splits there).
        Pieces (and short notes) go to `encode_batch` about `chunk_chars x threads`
        characters at a time, so the tokenizer's per-token objects exist for that much text
        at once, never for a whole long note; `tokenizers` spreads each call over its thread
        pool when TOKENIZERS_PARALLELISM allows (RAYON_NUM_THREADS threads) and releases the
        GIL meanwhile.
        """
        budget = self.chunk_chars * self.threads
        group: list[tuple[int, int, int]] = []  # (note, start, end)
        size = 0
        for n, text in enumerate(notes):
            if len(text) > MAX_NOTE_CHARS:  # token_char is int32
                raise ValueError(f"note {n} has {len(text):,} characters, over {MAX_NOTE_CHARS:,}")
            start = 0
            while True:
                end = len(text)
                if end - start > self.chunk_chars:
                    end = _cut(text, start + self.chunk_chars)
                if group and size + end - start > budget:
                    yield from self._encode(notes, group)
                    group, size = [], 0
                group.append((n, start, end))
                size += end - start
                start = end
                if start >= len(text):
                    break
        yield from self._encode(notes, group)

    def _encode(
        self, notes: Sequence[str], group: list[tuple[int, int, int]]
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, bool]]:
        texts = [notes[n][s:e] for n, s, e in group]
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        for (n, s, e), enc in zip(group, encs):
            yield n, *_arrays(enc, s), e >= len(notes[n])

    def _windows(self, notes: Sequence[str], drop_empty: bool) -> tuple[np.ndarray, Windows]:
        """Windows made as the pieces come: a note's tokens are kept only from its next
        window's start on, so a long note costs its windows, not its tokens once more."""
        body = body_tokens(self.max_seq)  # room for [CLS] and [SEP]
        step = body - self.stride
        ids, chars, bounds, note, widx, cstart, cend = [], [], [0], [], [], [], []
        kept: list[int] = []  # notes done (and kept), in order
        counts: list[int] = []  # their tokens
        first = pos = total = 0  # this note's first window, next window start, tokens read
        tok, offs = np.zeros(0, np.int32), np.zeros((0, 2), np.int64)  # tokens from `pos` on

        def emit(size: int) -> None:
            """A window of the note being read: [CLS] tok[:size] [SEP]."""
            body_ids, body_offs = tok[:size], offs[:size]
            widx.append(len(note) - first)
            note.append(len(kept))
            ids.append(np.concatenate(([self.cls_id], body_ids, [self.sep_id])).astype(np.int32))
            chars.append(np.concatenate(([[-1, -1]], body_offs, [[-1, -1]])).astype(np.int32))
            bounds.append(bounds[-1] + size + FRAMING_TOKENS)
            cstart.append(body_offs[0, 0] if size else 0)  # empty note: [CLS][SEP], (0, 0)
            cend.append(body_offs[-1, 1] if size else 0)

        for n, piece, piece_offs, last in self._pieces(notes):
            if not len(tok):  # nothing carried: no copy
                tok, offs = piece, piece_offs
            else:
                tok, offs = np.concatenate((tok, piece)), np.concatenate((offs, piece_offs))
            total += len(piece)
            if self.policy == "truncate":
                if len(note) == first and len(tok) >= body:
                    emit(body)
                if len(note) > first:  # the note has its window: the rest is only counted
                    tok, offs = tok[:0], offs[:0]
            else:
                while len(tok) >= body:  # every full window the tokens so far allow
                    emit(body)
                    pos += step
                    tok, offs = tok[step:], offs[step:]
            if not last:
                continue
            if total or not drop_empty:
                if len(note) == first or (self.policy == "windows" and total > pos - step + body):
                    emit(len(tok))  # the last (partial) window, or the only one
                kept.append(n)
                counts.append(total)
            first, pos, total = len(note), 0, 0
            tok, offs = tok[:0], offs[:0]
        note_tokens = np.asarray(counts, dtype=np.int64)
        return np.asarray(kept, np.int64), Windows(
            ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
            token_char=_column(chars, 0),
            token_end=_column(chars, 1),
            bounds=np.asarray(bounds, dtype=np.int64),
            note=np.asarray(note, dtype=np.int64),
            window_index=np.asarray(widx, dtype=np.int32),
            char_start=np.asarray(cstart, dtype=np.int64),
            char_end=np.asarray(cend, dtype=np.int64),
            note_tokens=note_tokens,
            truncated=(note_tokens > body) & (self.policy == "truncate"),
        )
