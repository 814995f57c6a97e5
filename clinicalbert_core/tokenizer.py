"""Note tokenization with `tokenizers`: casing per variant, truncation or sliding windows.

The output is packed like the encoder's input: every window's ids (framed by [CLS]/[SEP])
concatenated, `bounds[W+1]` marking where each starts, and per window the note it came from,
its index in that note and the character span of the note it covers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

LONG_NOTE_POLICIES = ("truncate", "windows")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab(path: str | Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            token = line.rstrip("\n")
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


def tokenizer_casing(tok: Tokenizer) -> bool | None:
    """True/False when the tokenizer's normalizer lowercases or not; None when unknowable."""
    norm = json.loads(tok.to_str()).get("normalizer") or {}
    if norm.get("type") == "BertNormalizer":
        return bool(norm.get("lowercase"))
    if norm.get("type") == "Sequence":
        kinds = {n.get("type") for n in norm.get("normalizers", [])}
        return "Lowercase" in kinds
    return None


def with_casing(tok: Tokenizer, lowercase: bool) -> Tokenizer:
    """The same tokenizer with its BertNormalizer set to `lowercase` (strip_accents follows)."""
    spec = json.loads(tok.to_str())
    norm = spec.get("normalizer") or {}
    if norm.get("type") != "BertNormalizer":
        raise ValueError(
            f"cannot set casing on a tokenizer whose normalizer is {norm.get('type')!r} "
            "(only BertNormalizer tokenizers can be re-cased)"
        )
    norm["lowercase"] = lowercase
    norm["strip_accents"] = None
    return Tokenizer.from_str(json.dumps(spec))


@dataclass
class Windows:
    """Tokenized notes as packed windows (W windows, T tokens in all)."""

    ids: np.ndarray  # int32[T] every window's ids, [CLS] ... [SEP], concatenated
    token_char: np.ndarray  # int64[T] first char of each token in its note (-1 for specials)
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
        stride: int = 128,
    ):
        if policy not in LONG_NOTE_POLICIES:
            raise ValueError(
                f"long-note policy must be one of {LONG_NOTE_POLICIES}, got {policy!r}"
            )
        if max_seq < 3:
            raise ValueError(f"max_seq must be at least 3, got {max_seq}")
        body = max_seq - 2  # room for [CLS] and [SEP]
        if policy == "windows" and not 0 <= stride < body:
            raise ValueError(
                f"stride (tokens shared by consecutive windows) must be in [0, {body}) "
                f"for max_seq {max_seq}, got {stride}"
            )
        self.tokenizer = tokenizer
        self.max_seq, self.policy, self.stride = max_seq, policy, stride
        self.cls_id = self._special("[CLS]")
        self.sep_id = self._special("[SEP]")
        self.mask_id = self._special("[MASK]")
        self.pad_id = self._special("[PAD]")

    def _special(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token} token")
        return i

    def __call__(self, notes: list[str]) -> Windows:
        encs = self.tokenizer.encode_batch(notes, add_special_tokens=False)
        body, step = self.max_seq - 2, self.max_seq - 2 - self.stride
        ids, chars, bounds, note, widx, cstart, cend = [], [], [0], [], [], [], []
        note_tokens = np.zeros(len(notes), dtype=np.int64)
        truncated = np.zeros(len(notes), dtype=bool)
        total = 0
        for n, enc in enumerate(encs):
            tok = np.asarray(enc.ids, dtype=np.int32)
            offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            note_tokens[n] = len(tok)
            if self.policy == "truncate" or len(tok) <= body:
                starts = [0]
                truncated[n] = len(tok) > body
            else:
                starts = range(0, len(tok) - body + step, step)  # the last one reaches the end
            for i, s in enumerate(starts):
                piece = tok[s : s + body]
                ids.append(np.concatenate(([self.cls_id], piece, [self.sep_id])).astype(np.int32))
                chars.append(np.concatenate(([-1], offs[s : s + body, 0], [-1])))
                total += len(piece) + 2
                bounds.append(total)
                note.append(n)
                widx.append(i)
                if len(piece):
                    cstart.append(offs[s, 0])
                    cend.append(offs[s + len(piece) - 1, 1])
                else:  # empty note: the window is [CLS][SEP]
                    cstart.append(0)
                    cend.append(0)
        return Windows(
            ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
            token_char=np.concatenate(chars) if chars else np.zeros(0, np.int64),
            bounds=np.asarray(bounds, dtype=np.int64),
            note=np.asarray(note, dtype=np.int64),
            window_index=np.asarray(widx, dtype=np.int32),
            char_start=np.asarray(cstart, dtype=np.int64),
            char_end=np.asarray(cend, dtype=np.int64),
            note_tokens=note_tokens,
            truncated=truncated,
        )
