"""Model families: ModernBERT on packed tokens, any tokenizer.json, long context.

Parity is against transformers' ModernBertModel / ModernBertForMaskedLM / BertForMaskedLM on
tiny random checkpoints written with `save_pretrained`, tokenized by a byte-level BPE
tokenizer trained here on synthetic notes. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clinicalbert_core import ClinicalBertRunner, inspect, prepare
from clinicalbert_core.architectures import load_config
from clinicalbert_core.attention import attention, banded_attention
from clinicalbert_core.hub import MANIFEST
from clinicalbert_core.packing import pack
from clinicalbert_core.tokenizer import NoteTokenizer
from jobs.synthetic import make_bpe_tokenizer, make_notes

transformers = pytest.importorskip("transformers")
cos = torch.nn.functional.cosine_similarity


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer()


def ids_of(tok, name: str) -> dict:
    return {f"{k}_token_id": tok.token_to_id(f"[{v}]") for k, v in
            (("pad", "PAD"), ("cls", "CLS"), ("sep", "SEP"), ("bos", "CLS"), ("eos", "SEP"))}  # fmt: skip


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norms and biases too, so a swapped or missing one cannot pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def save_modernbert(path: Path, tok, seed: int = 0, cls=None, **kw):
    """A tiny random ModernBERT (`cls`: the transformers class, default ForMaskedLM) saved
    with its tokenizer."""
    cfg = transformers.ModernBertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=4096,
        local_attention=16, global_attn_every_n_layers=3, **ids_of(tok, "modernbert"), **kw,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = (cls or transformers.ModernBertForMaskedLM)(cfg).eval()
    perturb(model, seed)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path, model


@pytest.fixture(scope="module")
def mb(tmp_path_factory, bpe):
    return save_modernbert(tmp_path_factory.mktemp("modernbert"), bpe)


@pytest.fixture(scope="module")
def mb_bias(tmp_path_factory, bpe):
    """Every optional bias on (attention, MLP, norms, head)."""
    return save_modernbert(
        tmp_path_factory.mktemp("modernbert_bias"), bpe, seed=1, attention_bias=True,
        mlp_bias=True, norm_bias=True, classifier_bias=True, classifier_activation="silu",
    )  # fmt: skip


def load(path, **kw) -> ClinicalBertRunner:
    opts = dict(variant="custom", precision="fp32", max_seq=4096, batch_tokens=8192)
    return ClinicalBertRunner.load(path, **{**opts, **kw})


def mixed_notes() -> list[str]:
    """Short notes (under the local window of 16 tokens) and long ones, with [MASK]s."""
    notes = make_notes(6, seed=3, min_words=40, max_words=200)
    notes[1] = "Pt was started on [MASK] for afib."
    notes[3] = "denies [MASK] pain"
    notes[4] = notes[4] + " Lasix [MASK] mg po daily."
    return notes + ["ok", "Ünïcode façade café [MASK]"]


def reference(model, ids: np.ndarray):
    with torch.no_grad():
        t = torch.from_numpy(ids.astype(np.int64))[None]
        hidden = model.model(t).last_hidden_state[0]
        return hidden, model.decoder(model.head(hidden))


# ---- attention ---------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 3, 8, 200])
def test_banded_attention_equals_a_dense_band(window):
    torch.manual_seed(0)
    lengths = [40, 5, 100, 1, 33]
    b = pack([list(range(n)) for n in lengths])
    q, k, v = torch.randn(3, sum(lengths), 2, 8).unbind(0)
    got = attention(q, k, v, b, window=window)
    for a, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
        i = torch.arange(e - a)
        band = (i[:, None] - i[None, :]).abs() <= window  # |i - j| <= window
        qs, ks, vs = (t[a:e].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        scores = (qs @ ks.transpose(-1, -2) / 8**0.5).masked_fill(~band, float("-inf"))
        ref = (torch.softmax(scores, -1) @ vs).transpose(0, 1)
        torch.testing.assert_close(got[a:e], ref, atol=1e-5, rtol=1e-5)
    direct = banded_attention(q, k, v, b.seq_ids, window)  # also when the window covers all
    torch.testing.assert_close(direct, got, atol=1e-5, rtol=1e-5)


def test_local_attention_never_builds_length_squared_scores(monkeypatch):
    """One 8,192-token note in a local layer: every attention call sees at most block + 2w
    keys per query block, so scores and mask grow with N x window, not N x N."""
    import torch.nn.functional as F

    from clinicalbert_core import attention as attn_module
    from clinicalbert_core.attention import band_block

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append((k.shape[-2], 0 if attn_mask is None else attn_mask.numel()))
        return real(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(attn_module.F, "scaled_dot_product_attention", spy)
    n, w = 8192, 64
    b = pack([np.zeros(n, np.int64)])
    q, k, v = torch.randn(3, n, 2, 8).unbind(0)
    out = attention(q, k, v, b, window=w)
    assert out.shape == (n, 2, 8) and torch.isfinite(out).all()
    span = band_block(w) + 2 * w
    assert seen == [(span, n * span)] and span * 20 < n
    seen.clear()
    attention(q, k, v, b)  # a global layer: one full-length call (SDPA's own flash kernel)
    assert seen == [(n, 0)]


# ---- parity with transformers ------------------------------------------------------------------
@pytest.mark.parametrize("which", ["mb", "mb_bias"])
def test_fp32_parity_hidden_and_mlm_logits_mixed_batch(which, request):
    path, model = request.getfixturevalue(which)
    r = load(path, mlm=True, pooling="mean")
    notes = mixed_notes()
    w = r.tokenize(notes)
    assert w.lengths.max() > 17 > w.lengths.min()  # longer and shorter than the window
    out = r.encode_windows(w, return_hidden=True, mlm_positions="mask", return_logits=True)
    assert len(set(np.flatnonzero(w.lengths > 0))) == len(notes)
    masked = 0
    for i in range(len(notes)):
        hidden, logits = reference(model, w.window_ids(i))
        a, e = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        assert (out.hidden[a:e] - hidden).abs().max() <= 1e-4
        assert np.abs(out.vectors[i] - hidden.mean(0).numpy()).max() <= 1e-4
        rows = np.flatnonzero(out.mlm.window == i)
        pos = out.mlm.position[rows]
        assert (w.window_ids(i)[pos] == r.tokenizer.mask_id).all()
        if len(rows):
            assert np.abs(out.mlm.logits[rows] - logits[pos].numpy()).max() <= 1e-4
        masked += len(rows)
    assert masked == 4


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_cosine_hidden_and_mlm_logits(mb, precision):
    path, model = mb
    r = load(path, mlm=True, precision=precision)
    notes = mixed_notes()
    w = r.tokenize(notes)
    out = r.encode_windows(w, return_hidden=True, return_logits=True)
    for i in range(len(notes)):
        hidden, logits = reference(model, w.window_ids(i))
        a, e = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        assert cos(out.hidden[a:e], hidden, -1).min() >= 0.99
        rows = np.flatnonzero(out.mlm.window == i)
        if len(rows):
            got = torch.from_numpy(out.mlm.logits[rows])
            assert cos(got, logits[out.mlm.position[rows]], -1).min() >= 0.99


def test_long_note_without_windows_equals_transformers_and_alone_equals_batch(mb):
    path, model = mb
    r = load(path, long_notes="truncate")
    pieces = make_notes(60, seed=9, min_words=50, max_words=80)
    long = pieces[0]
    for piece in pieces[1:]:
        if r.tokenize([long]).lengths[0] > 2100:
            break
        long += " " + piece
    w = r.tokenize([long])
    assert 2048 < w.lengths[0] <= 4096 and not w.truncated[0]
    out = r.encode_windows(w, return_hidden=True)
    hidden, _ = reference(model, w.window_ids(0))
    assert (out.hidden - hidden).abs().max() <= 1e-4

    notes = mixed_notes()
    small = load(path, batch_tokens=4096)  # several notes per batch, long one alone
    together = small.encode([*notes, long], return_hidden=False).pooled
    for i, note in enumerate([*notes, long]):
        alone = small.encode([note], return_hidden=False).pooled[0]
        assert (alone - together[i]).abs().max() <= 1e-5


def test_modernbert_windows_and_job_options(mb):
    """Windows stay available (a 512-token budget on an 8,192-position model); cls pooling,
    embeddings off with MLM on, and the pooler refused (ModernBERT has none)."""
    path, _ = mb
    r = load(path, max_seq=64, long_notes="windows", stride=16, batch_tokens=256)
    notes = mixed_notes()
    pooled = r.encode(notes, return_hidden=False).pooled
    assert pooled.shape == (len(notes), 32) and torch.isfinite(pooled).all()
    assert r.pooling == "mean"  # the architecture's default
    only_mlm = load(path, embeddings=False, mlm=True, pooling="pooler")
    assert only_mlm.mlm(["Pt was started on [MASK] for afib."])[0][0].tokens
    with pytest.raises(ValueError, match="no pooler weights"):
        load(path, pooling="pooler")
    with pytest.raises(ValueError, match="max_position_embeddings 4096"):
        load(path, max_seq=8192, batch_tokens=8192)


# ---- configs -----------------------------------------------------------------------------------
def test_config_layouts_and_errors(mb):
    path, model = mb
    raw = json.loads((path / "config.json").read_text())
    new = load_config(raw)
    assert new.layer_types == tuple(model.config.layer_types)
    assert new.layer_types[:4] == ("full_attention", "sliding_attention", "sliding_attention",
                                   "full_attention")  # fmt: skip
    assert (new.global_rope_theta, new.local_rope_theta, new.window) == (160000.0, 10000.0, 8)
    old = {k: v for k, v in raw.items() if k not in ("layer_types", "rope_parameters")}
    old |= {"global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
            "local_rope_theta": 10000.0}  # fmt: skip
    assert load_config(old) == new  # the hub repos' older layout reads the same
    assert load_config(new.to_dict()) == new  # what prepare writes and bundles ship
    with pytest.raises(ValueError, match="model_type 'deberta' is not supported"):
        load_config({**raw, "model_type": "deberta"})
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        load_config({**raw, "rope_parameters": {"full_attention": {"rope_type": "yarn"}}})
    with pytest.raises(ValueError, match="layer_types must list 4 entries"):
        load_config({**raw, "layer_types": ["full_attention"]})


# ---- tokenizers --------------------------------------------------------------------------------
def test_bpe_offsets_map_back_to_the_note(bpe):
    note = " ".join(make_notes(5, seed=4, max_words=120)) + " Ünïcode — façade 120/80 ✓"
    nt = NoteTokenizer(bpe, max_seq=24, policy="windows", stride=6)
    w = nt([note])
    assert w.num_windows > 5
    for k in range(w.num_windows):
        body = w.window_ids(k)[1:-1].tolist()
        text = note[w.char_start[k] : w.char_end[k]]
        decoded = bpe.decode(body)
        if "\ufffd" not in decoded:  # a window edge inside a multi-byte char decodes partially
            assert decoded == text
        else:
            assert decoded.replace("\ufffd", "") in text
    full = bpe.encode(note, add_special_tokens=False)
    assert w.note_tokens[0] == len(full.ids)


def test_embedded_padding_and_truncation_are_switched_off(tmp_path, bpe):
    configured = make_bpe_tokenizer()
    configured.enable_padding(length=128, pad_id=bpe.token_to_id("[PAD]"), pad_token="[PAD]")
    configured.enable_truncation(max_length=128)
    long = " ".join(make_notes(6, seed=2, min_words=150, max_words=200))
    plain = NoteTokenizer(bpe, max_seq=64, policy="windows", stride=16)([long, "short note"])
    ours = NoteTokenizer(configured, max_seq=64, policy="windows", stride=16)([long, "short note"])
    assert ours.note_tokens[0] > 128  # the whole note, not its first 128 tokens
    for field in ("ids", "bounds", "note_tokens", "char_start", "char_end"):
        np.testing.assert_array_equal(getattr(ours, field), getattr(plain, field))
    assert configured.padding is not None  # the caller's tokenizer is not modified

    # a sentence-transformers-style BERT save: same vectors as transformers on the same weights
    cfg = transformers.BertConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "st")
    configured.save(str(tmp_path / "st" / "tokenizer.json"))
    out = prepare(tmp_path / "st", tmp_path / "prepared", variant="custom")
    manifest = json.loads((out / MANIFEST).read_text())
    notes = manifest["tokenizer_notes"]
    assert any(n.startswith("padding switched off") for n in notes)
    assert any(n.startswith("truncation switched off") for n in notes)
    shipped = json.loads((out / "tokenizer.json").read_text())
    assert shipped["padding"] is None and shipped["truncation"] is None
    r = ClinicalBertRunner.load(out, precision="fp32", max_seq=512, pooling="cls")
    w = r.tokenize([long])
    assert w.note_tokens[0] > 128 and w.lengths[0] > 130
    with torch.no_grad():
        ref = model(torch.from_numpy(w.window_ids(0).astype(np.int64))[None]).last_hidden_state
    got = r.encode_windows(w).vectors[0]
    assert np.abs(got - ref[0, 0].numpy()).max() <= 1e-4


def test_clinical_modernbert_shaped_bert_with_bpe(tmp_path, bpe):
    """A BERT checkpoint with a BPE tokenizer.json (Clinical ModernBERT's layout): prepare ->
    load -> parity, casing untouched, specials from the tokenizer files."""
    cfg = transformers.BertConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, max_position_embeddings=1024,
        layer_norm_eps=1e-5, pad_token_id=bpe.token_to_id("[PAD]"),
    )  # fmt: skip
    torch.manual_seed(2)
    model = transformers.BertForMaskedLM(cfg).eval()
    perturb(model, 2)
    model.save_pretrained(tmp_path / "raw")
    bpe.save(str(tmp_path / "raw" / "tokenizer.json"))
    (tmp_path / "raw" / "tokenizer_config.json").write_text(
        json.dumps({"mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    )
    out = prepare(tmp_path / "raw", tmp_path / "cmb", variant="custom")
    info = inspect(out)
    assert info["architecture"] == "bert" and info["tokenizer"] == "BPE"
    assert info["lowercase"] is False and info["heads"] == {
        "pooler": False,
        "mlm": True,
        "classifier": False,
    }
    assert info["specials"] == {"cls": bpe.token_to_id("[CLS]"), "sep": bpe.token_to_id("[SEP]"),
                                "mask": bpe.token_to_id("[MASK]")}  # fmt: skip
    assert json.loads((out / "tokenizer.json").read_text())["normalizer"] is None
    r = ClinicalBertRunner.load(out, precision="fp32", max_seq=1024, mlm=True)
    assert r.pooling == "cls" and r.tokenizer_kind == "BPE" and r.architecture == "bert"
    notes = mixed_notes()
    w = r.tokenize(notes)
    res = r.encode_windows(w, return_hidden=True, return_logits=True)
    for i in range(len(notes)):
        ids = torch.from_numpy(w.window_ids(i).astype(np.int64))[None]
        with torch.no_grad():
            ref = model(ids, output_hidden_states=True)
        a, e = res.cu_seqlens[i], res.cu_seqlens[i + 1]
        assert (res.hidden[a:e] - ref.hidden_states[-1][0]).abs().max() <= 1e-4
        rows = np.flatnonzero(res.mlm.window == i)
        want = ref.logits[0][res.mlm.position[rows]].numpy()
        assert not len(rows) or np.abs(res.mlm.logits[rows] - want).max() <= 1e-4
    with pytest.raises(ValueError, match="cannot make a BPE tokenizer lowercase"):
        ClinicalBertRunner.load(out, lowercase=True)
    with pytest.raises(ValueError, match="hidden_size: preset 'clinical_modernbert' expects 768"):
        ClinicalBertRunner.load(out, variant="clinical_modernbert")


def test_prepare_and_inspect_modernbert(tmp_path, mb):
    path, _ = mb
    out = prepare(path, tmp_path / "prepared", variant="custom")
    info = inspect(out)
    assert info["architecture"] == "modernbert" and info["tokenizer"] == "BPE"
    assert info["local_window"] == 16 and info["global_every"] == 3
    assert info["rope_theta"] == {"global": 160000.0, "local": 10000.0}
    assert info["heads"] == {"pooler": False, "mlm": True, "classifier": False}
    a = load(path).encode(mixed_notes(), return_hidden=False).pooled
    b = load(out).encode(mixed_notes(), return_hidden=False).pooled
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_hidden_layers: preset 'bioclinical_modernbert_base'"):
        load(out, variant="bioclinical_modernbert_base")


def test_encoder_predictor_runs_modernbert(tmp_path, mb):
    from jobs import EncoderPredictor

    path, _ = mb
    notes = np.array([*mixed_notes()[:3], None, "", *mixed_notes()[3:5]], dtype=object)
    opts = dict(precision="fp32", max_seq=128, long_notes="windows", stride=32)
    out = EncoderPredictor(str(path), **opts)({"text": notes})
    assert out["error"].to_pylist() == [None, None, None, "null", "empty", None, None]
    assert out.schema.metadata[b"architecture"] == b"modernbert"
    good = [n for n in notes if n]
    want = load(path, **opts, batch_tokens=1024).embed(good)
    got = [v for v in out["embedding"].to_pylist() if v is not None]
    np.testing.assert_allclose(np.array(got, np.float32), want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_varlen_window_parity(mb):
    """CUDA: fp32 (banded SDPA) within 1e-4, bf16 (varlen flash with window) cosine >= 0.99."""
    path, model = mb
    notes = mixed_notes()
    for precision in ("fp32", "bf16"):
        r = load(path, device="cuda", precision=precision)
        w = r.tokenize(notes)
        out = r.encode_windows(w, return_hidden=True)
        for i in range(len(notes)):
            hidden, _ = reference(model, w.window_ids(i))
            a, e = out.cu_seqlens[i], out.cu_seqlens[i + 1]
            if precision == "fp32":
                assert (out.hidden[a:e] - hidden).abs().max() <= 1e-4
            else:
                assert cos(out.hidden[a:e], hidden, -1).min() >= 0.99


def test_long_notes_tokenize_in_pieces_exactly(tmp_path, bpe):
    """A note longer than the piece size is tokenized in pieces cut at whitespace runs: the
    same ids and offsets as one piece, for WordPiece and byte-level BPE."""
    from clinicalbert_core.tokenizer import wordpiece_from_vocab
    from jobs.synthetic import vocab_for

    (tmp_path / "vocab.txt").write_text("\n".join(vocab_for()) + "\n")
    wordpiece = wordpiece_from_vocab(tmp_path / "vocab.txt", lowercase=False)
    note = "  ".join(make_notes(30, seed=5, max_words=300)) + " Ünïcode —  tabs\t\tand \n spaces"
    for tok in (bpe, wordpiece):
        nt = NoteTokenizer(tok, max_seq=64, policy="windows", stride=8)
        whole = nt([note, "short"])
        nt.chunk_chars = 500  # dozens of pieces
        pieces = nt([note, "short"])
        for field in (
            "ids",
            "token_char",
            "token_end",
            "bounds",
            "char_start",
            "char_end",
            "note_tokens",
        ):
            np.testing.assert_array_equal(getattr(pieces, field), getattr(whole, field))
