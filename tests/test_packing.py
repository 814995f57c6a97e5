"""Exact tests of the runtime's pure pieces, without transformers: packing (layout, token-budget
batches, padded slots that never reach the output) and note windows (casing, stride, offsets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinicalbert_core.attention import attention
from clinicalbert_core.packing import pack, pad, token_budget_batches, unpad
from clinicalbert_core.tokenizer import NoteTokenizer, wordpiece_from_vocab

WORDS = [
    "pt",
    "is",
    "a",
    "yo",
    "m",
    "f",
    "with",
    "hx",
    "of",
    "chf",
    "afib",
    "was",
    "started",
    "on",
    "for",
    "the",
    "and",
    "to",
    "in",
    "no",
    "at",
    "by",
    "dr",
    "seen",
    "known",
    "lastname",
    "hospital",
    "first",
    "name",
    "admitted",
    "discharge",
    "lasix",
    "metoprolol",
    "heparin",
    "mg",
    "po",
    "b",
    "i",
    "d",
    "bp",
    "hr",
    "denies",
    "chest",
    "pain",
    "sob",
    "cxr",
    "showed",
    "bilateral",
    "effusions",
    "follow",
    "up",
    "weeks",
    "labs",
    "cr",
    "wbc",
    "hct",
]
NOTES = [
    "Pt is a 67 yo M with [**Hospital 123**] hx of CHF, afib.",
    "Pt was started on [MASK] for afib.",
    "Seen by Dr. [**Known lastname 658**] on [**2112-4-18**]. BP 120/80, HR 72. Lasix 40 mg PO b.i.d.",
    "denies chest pain",
    "cxr showed bilateral effusions. " * 6,
    "a",
]


def vocab_list() -> list[str]:
    chars = [chr(c) for c in range(33, 127)]
    words = WORDS + [w.capitalize() for w in WORDS] + ["CHF", "BP", "HR", "PO"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return list(dict.fromkeys(specials + chars + [f"##{c}" for c in chars] + words))


# ---- packing ---------------------------------------------------------------------------------
def test_pack_exact_layout():
    b = pack([[5, 6, 7], [8], [9, 10]])
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.pad_index.tolist() == [0, 1, 2, 3, 6, 7]  # grid [3 seqs x 3 slots]
    assert b.max_seqlen == 3 and b.key_mask.squeeze().tolist() == [
        [True, True, True], [True, False, False], [True, True, False]]  # fmt: skip
    x = torch.arange(6.0)[:, None]
    padded = pad(x, b, value=-1.0)
    assert padded.squeeze(-1).tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]
    assert torch.equal(unpad(padded, b), x)
    assert pack([[1, 2], [3, 4]]).key_mask is None  # equal lengths: no mask at all
    with pytest.raises(ValueError, match="empty sequence"):
        pack([[1], []])


def test_token_budget_batches_exact():
    batches = token_budget_batches([5, 100, 30, 100, 7, 60], budget=200)
    assert [b.tolist() for b in batches] == [[1, 3], [5, 2, 4], [0]]
    assert [b.tolist() for b in token_budget_batches([300, 10], 100)] == [[0], [1]]


def test_padded_slots_never_reach_the_output():
    torch.manual_seed(1)
    lengths = [5, 2, 4]
    b = pack([list(range(n)) for n in lengths])
    qkv = torch.randn(sum(lengths), 3, 2, 8)
    clean = attention(*qkv.unbind(1), b, pad_value=0.0)
    poisoned = attention(*qkv.unbind(1), b, pad_value=1e30)
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, clean)
    for a, e in zip(b.cu_seqlens[:-1], b.cu_seqlens[1:]):  # per-sequence reference
        q, k, v = qkv[a:e].permute(1, 2, 0, 3)  # 3 x (H, L, D)
        ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
        torch.testing.assert_close(clean[a:e], ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


# ---- tokenizer windows ----------------------------------------------------------------------
def test_casing_per_variant(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(vocab_list()) + "\n")
    cased = wordpiece_from_vocab(tmp_path / "vocab.txt", lowercase=False)
    uncased = wordpiece_from_vocab(tmp_path / "vocab.txt", lowercase=True)
    assert cased.encode("Pt").ids != cased.encode("pt").ids
    assert uncased.encode("Pt").ids == uncased.encode("pt").ids


def test_default_stride_fits_short_windows(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(vocab_list()) + "\n")
    tok = wordpiece_from_vocab(tmp_path / "vocab.txt", lowercase=False)
    assert NoteTokenizer(tok, max_seq=512, policy="windows").stride == 128
    nt = NoteTokenizer(tok, max_seq=20, policy="windows")  # 128 would not fit a 20-token window
    assert nt.stride == 9
    w = nt([" ".join(NOTES) * 3])
    assert w.num_windows > 2
    first, second = w.window_ids(0)[1:-1], w.window_ids(1)[1:-1]
    assert len(first) == 18 and first[-9:].tolist() == second[:9].tolist()  # 9 shared, 9 new
    with pytest.raises(ValueError, match="stride"):
        NoteTokenizer(tok, max_seq=20, policy="windows", stride=18)


def test_windows_cover_every_token_with_offsets(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(vocab_list()) + "\n")
    tok = wordpiece_from_vocab(tmp_path / "vocab.txt", lowercase=False)
    note = " ".join(NOTES) * 3
    full = tok.encode(note, add_special_tokens=False)
    nt = NoteTokenizer(tok, max_seq=20, policy="windows", stride=5)
    w = nt([note, ""])
    mine = np.flatnonzero(w.note == 0)
    starts, covered = [], []
    for k, win in enumerate(mine):
        ids = w.window_ids(win)
        assert ids[0] == nt.cls_id and ids[-1] == nt.sep_id and len(ids) <= 20
        assert w.window_index[win] == k
        body = ids[1:-1].tolist()
        start = k * (18 - 5)
        assert body == full.ids[start : start + 18]
        starts.append(start)
        covered += range(start, start + len(body))
        chars = w.char_start[win], w.char_end[win]
        assert chars == (full.offsets[start][0], full.offsets[start + len(body) - 1][1])
    assert set(covered) == set(range(len(full.ids)))
    assert w.note_tokens[0] == len(full.ids) and not w.truncated[0]
    empty = np.flatnonzero(w.note == 1)
    assert len(empty) == 1 and w.lengths[empty[0]] == 2  # [CLS] [SEP]
    trunc = NoteTokenizer(tok, max_seq=20, policy="truncate")([note])
    assert trunc.num_windows == 1 and trunc.truncated[0]
    assert trunc.window_ids(0)[1:-1].tolist() == full.ids[:18]
