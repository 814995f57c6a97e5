"""Runtime edges: empty notes through the runtime API, and the varlen startup probe on CPU.

A note is empty when it has no character but whitespace or the tokenizer yields no token for
it. `encode` leaves it out of the encoder and flags its zero row (`EncodeOutput.empty`), the
other notes bit for bit as encoded alone; `embed` refuses it by index; `mlm` gives it no
predictions. The varlen probe must make the encoder's own call (window_size included), so a
torch whose `varlen_attn` lacks the argument is refused at startup, not at the first batch.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types

import numpy as np
import pytest
import torch

import clinicalbert_core.device as device
from clinicalbert_core import ClinicalBertRunner
from clinicalbert_core.aggregate import select_notes, token_index
from clinicalbert_core.attention import attention
from clinicalbert_core.packing import pack
from jobs.notes import tokenize_rows
from jobs.synthetic import make_bpe_tokenizer

EMPTY = ["", "   ", "\u200b\u200b", "\x01\x02"]
REAL = [
    "Pt is a 67 yo M with hx of CHF, afib. Started on [MASK] today.",
    "denies chest pain",
    "cxr showed bilateral effusions. " * 4,
]
MIXED = ["", REAL[0], "   ", "\u200b\u200b", REAL[1], "\x01\x02", REAL[2]]


def empty_of(r: ClinicalBertRunner, notes: list[str]) -> np.ndarray:
    """The documented rule: only whitespace, or no token. WordPiece yields no token for any
    of EMPTY; byte-level BPE has tokens for all but "" (whitespace, zero-width spaces and
    control characters are bytes to it), so there only "" and "   " are empty, as in a job."""
    no_tokens = r.tokenize(notes).note_tokens == 0
    blank = np.array([not n.strip() for n in notes])
    if r.tokenizer_kind == "WordPiece":
        assert no_tokens[[i for i, n in enumerate(notes) if n in EMPTY]].all()
    else:
        assert no_tokens.tolist() == [n == "" for n in notes]
    return blank | no_tokens


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_modernbert import save_modernbert

    path, _ = save_modernbert(tmp_path_factory.mktemp("mb_edges"), make_bpe_tokenizer())
    return path


@pytest.fixture(params=["bert", "modernbert"])
def arch_dir(request):
    name = "model_dir" if request.param == "bert" else "modernbert_dir"
    return request.getfixturevalue(name)


def runner(path, **kw) -> ClinicalBertRunner:
    opts = dict(variant="custom", precision="fp32", max_seq=16, long_notes="windows", stride=4)
    return ClinicalBertRunner.load(path, **{**opts, **kw})


# ---- encode: flagged zero rows, the other notes as alone ----------------------------------------
@pytest.mark.parametrize("aggregate", ["mean", "first", "none"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encode_flags_empty_notes_and_keeps_the_others_exact(arch_dir, aggregate, pooling):
    r = runner(arch_dir, aggregate=aggregate, pooling=pooling, normalize=aggregate == "mean")
    empty = empty_of(r, MIXED)
    out, alone = r.encode(MIXED), r.encode([n for n, e in zip(MIXED, empty) if not e])
    want = empty[out.windows.note] if aggregate == "none" else empty
    assert out.empty.dtype == bool and np.array_equal(out.empty, want)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.hidden).all()
    assert torch.equal(out.pooled[torch.from_numpy(out.empty)], torch.zeros(want.sum(), 32))
    assert torch.equal(out.pooled[torch.from_numpy(~out.empty)], alone.pooled)
    # hidden: every window's tokens in place (cu_seqlens over all windows), the empty notes'
    # windows as zeros (not encoded), the others' exactly as alone
    assert torch.equal(out.cu_seqlens, torch.from_numpy(out.windows.bounds).to(torch.int32))
    kept = token_index(out.windows.bounds, ~empty[out.windows.note])
    assert torch.equal(out.hidden[torch.from_numpy(kept)], alone.hidden)
    others = np.ones(len(out.hidden), bool)
    others[kept] = False
    assert others.sum() == out.windows.lengths[empty[out.windows.note]].sum()
    assert not out.hidden[torch.from_numpy(others)].any()
    for note in [n for n in EMPTY if empty_of(r, [n])[0]]:  # each alone, and all at once
        one = r.encode([note])
        assert one.empty.all() and torch.equal(one.pooled, torch.zeros(len(one.empty), 32))
        n = one.windows.lengths.sum()  # [CLS][SEP] (BPE: "   " has tokens), not encoded
        assert torch.equal(one.hidden, torch.zeros(n, 32))
    both = r.encode(["", "   "], return_hidden=False)
    assert both.empty.all() and not both.pooled.any()


def test_select_notes_equals_tokenizing_only_those(arch_dir):
    r = runner(arch_dir)
    keep = ~empty_of(r, MIXED)
    got = select_notes(r.tokenize(MIXED), keep)
    want = r.tokenize([n for n, k in zip(MIXED, keep) if k])
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        assert a.dtype == b.dtype and np.array_equal(a, b), field.name


# ---- embed: refused by index; the step API: zero rows for notes without tokens ---------------
def test_embed_names_the_empty_notes(arch_dir):
    r = runner(arch_dir)
    empty = empty_of(r, MIXED)
    named = ", ".join(map(str, np.flatnonzero(empty)))
    with pytest.raises(ValueError, match=rf"notes {named} of 7 are empty .* encode\(\)"):
        r.embed(MIXED)
    for note in [n for n in EMPTY if empty_of(r, [n])[0]]:
        with pytest.raises(ValueError, match="notes 0 of 1 are empty"):
            r.embed([note])
    with pytest.raises(ValueError, match="notes 0, 1, .*, 9 and 2 more of 12 are empty"):
        r.embed([""] * 12)
    vectors = r.embed(REAL)
    assert np.isfinite(vectors).all()
    assert np.array_equal(vectors, r.encode(REAL).pooled.numpy())


@pytest.mark.parametrize("aggregate", ["mean", "first", "none"])
def test_aggregate_vectors_gives_notes_without_tokens_zero_rows(arch_dir, aggregate):
    """The step API encodes what it is given ([CLS][SEP] for a note without tokens): its
    aggregate is a zero row, never the 0/0 of a token-weighted mean."""
    r = runner(arch_dir, aggregate=aggregate)
    windows = r.tokenize(MIXED)
    vectors = r.encode_windows(windows).vectors
    assert np.isfinite(vectors).all()
    rows = r.aggregate_vectors(windows, vectors)
    assert np.isfinite(rows).all()
    no_tokens = windows.note_tokens == 0
    assert no_tokens[0]  # "" (WordPiece: the zero-width spaces and control characters too)
    flags = no_tokens[windows.note] if aggregate == "none" else no_tokens
    assert len(rows) == len(flags) and not rows[flags].any() and rows[~flags].any(axis=1).all()
    kept = select_notes(windows, ~no_tokens)
    want = r.aggregate_vectors(kept, vectors[~no_tokens[windows.note]])
    assert np.array_equal(rows[~flags], want)


# ---- mlm: no predictions for an empty note -------------------------------------------------------
@pytest.mark.parametrize("positions", ["mask", "all"])
def test_mlm_skips_empty_notes(arch_dir, positions):
    r = runner(arch_dir, mlm=True)
    empty = empty_of(r, MIXED)
    got = r.mlm(MIXED, positions=positions)
    alone = r.mlm([n for n, e in zip(MIXED, empty) if not e], positions=positions)
    assert [got[i] for i in np.flatnonzero(empty)] == [[]] * empty.sum()
    for j, i in enumerate(np.flatnonzero(~empty)):
        assert [dataclasses.replace(p, note=j) for p in got[i]] == alone[j]
        assert all(np.isfinite(p.log_probs).all() for p in got[i])
    assert sum(map(len, got)) > 0
    assert r.mlm(["", "   "], positions=positions) == [[], []]
    bare = runner(arch_dir, mlm=True, embeddings=False).encode(MIXED)  # hidden states only
    assert bare.pooled.shape == (0, 32) and np.array_equal(bare.empty, empty)
    assert torch.isfinite(bare.hidden).all()


def test_job_path_still_makes_empty_notes_error_rows(model_dir):
    """jobs.notes.tokenize_rows (unchanged): notes without tokens get reason `empty` before
    encoding and the kept notes' windows are those of tokenizing them alone."""
    r = runner(model_dir)
    notes = ["", REAL[0], "\u200b\u200b", "\x01\x02", REAL[1]]
    reasons: list[str | None] = [None] * len(notes)
    rows, windows = tokenize_rows(r, notes, reasons)
    assert reasons == ["empty", None, "empty", "empty", None]
    assert rows.tolist() == [1, 4] and np.array_equal(windows.ids, r.tokenize(REAL[:2]).ids)


# ---- the varlen probe makes the encoder's call ---------------------------------------------------
def fake_varlen(monkeypatch, calls: list, *, window_arg: bool) -> None:
    """Install a stand-in for torch's `torch.nn.attention.varlen` (whatever torch is here):
    its varlen_attn with or without the `window_size` keyword."""
    if window_arg:

        def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1)):
            calls.append((q.shape[1:], (cu_q is cu_k, max_q == max_k), window_size))
            return torch.zeros_like(q)

    else:  # torch releases whose varlen_attn predates local windows

        def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
            return torch.zeros_like(q)

    module = types.ModuleType("torch.nn.attention.varlen")
    module.varlen_attn = fake
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_varlen_probe_refuses_a_varlen_attn_without_window_size(monkeypatch, caplog):
    cpu = torch.device("cpu")  # the probe runs on whatever device it is given
    fake_varlen(monkeypatch, [], window_arg=False)
    with caplog.at_level(logging.WARNING, logger="clinicalbert_core.device"):
        assert not device.varlen_probe(cpu, torch.bfloat16)
    assert "TypeError" in caplog.text and "window_size" in caplog.text
    assert "padded SDPA" in caplog.text
    calls: list = []
    fake_varlen(monkeypatch, calls, window_arg=True)
    assert device.varlen_probe(cpu, torch.bfloat16)
    assert [c[2] for c in calls] == [(-1, -1), (1, 1)]  # full, and a local window


def test_varlen_probe_makes_the_encoders_call(monkeypatch):
    """Every call shape the encoder's attention makes (full and local windows) is one the
    probe made: same function, same positional layout, same keyword arguments."""
    calls: list = []
    fake_varlen(monkeypatch, calls, window_arg=True)
    q = torch.randn(11, 2, 8)  # (N, H, D)
    batch = pack([list(range(4)), list(range(7))])
    for window in (None, 3):
        attention(q, q, q, batch, varlen=True, window=window)
    encoder = {(c[1], c[2] != (-1, -1)) for c in calls}
    calls.clear()
    assert device.varlen_probe(torch.device("cpu"), torch.float16)
    assert encoder == {(c[1], c[2] != (-1, -1)) for c in calls}


def test_varlen_supported_asks_the_probe_once_and_only_for_cuda_half(monkeypatch):
    asked: list = []
    monkeypatch.setattr(device, "varlen_probe", lambda d, t: asked.append((d, t)) or False)
    device.varlen_supported.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert not device.varlen_supported(cuda, torch.bfloat16)
        assert not device.varlen_supported(cuda, torch.bfloat16)  # cached
        assert not device.varlen_supported(cuda, torch.float32)  # fp32: never varlen
        assert not device.varlen_supported(torch.device("cpu"), torch.bfloat16)
        assert asked == [(cuda, torch.bfloat16)]
    finally:
        device.varlen_supported.cache_clear()
