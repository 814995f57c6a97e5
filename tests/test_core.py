"""clinicalbert_core against transformers: parity, tokenizer, weights, hub, MLM placement.

The exact tests that need no transformers (packing, windows) are in test_packing.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_packing import NOTES, vocab_list

from clinicalbert_core import ClinicalBertRunner, ModelBundle, inspect, prepare
from clinicalbert_core.device import MlmExecMode, resolve_mlm_mode
from clinicalbert_core.hub import MANIFEST, download, resolve
from clinicalbert_core.tokenizer import wordpiece_from_vocab
from clinicalbert_core.weights import read_state_dict

transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    base = dict(vocab_size=len(vocab_list()), hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return transformers.BertConfig(**{**base, **kw})


def save_hf(model, path: Path, safe: bool = True) -> Path:
    """save_pretrained (safetensors), or config + a pickled `pytorch_model.bin` as the
    Bio_ClinicalBERT repos ship it (transformers 5 no longer writes .bin itself)."""
    model.save_pretrained(path)
    if not safe:
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")  # tied tensors share storage
    (path / "vocab.txt").write_text("\n".join(vocab_list()) + "\n")
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    out = {}
    for name, cls, safe in (
        ("mlm", transformers.BertForMaskedLM, True),
        ("pretraining", transformers.BertForPreTraining, True),
        ("pretraining_bin", transformers.BertForPreTraining, False),
        ("base", transformers.BertModel, True),
    ):
        model = cls(hf_config()).eval()
        out[name] = (save_hf(model, root / name, safe), model)
    return out


def load(path, **kw) -> ClinicalBertRunner:
    opts = dict(variant="custom", lowercase=False, precision="fp32", max_seq=64, batch_tokens=256)
    return ClinicalBertRunner.load(path, **{**opts, **kw})


def hf_run(model, runner: ClinicalBertRunner, note: str):
    ids = torch.tensor([runner.tokenizer.tokenizer.encode(note).ids[:64]])
    with torch.no_grad():
        return model(ids, output_hidden_states=True)


# ---- parity with transformers ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlm", "pretraining", "pretraining_bin", "base"])
def test_fp32_parity_hidden_pooled_logits(ckpts, kind):
    path, model = ckpts[kind]
    mlm = kind != "base"
    pooling = "cls" if kind == "mlm" else "pooler"
    r = load(path, mlm=mlm, pooling=pooling)
    windows = r.tokenize(NOTES)
    out = r.encode_windows(windows, return_hidden=True, mlm_positions="all", return_logits=True)
    bert = getattr(model, "bert", model)
    for i, note in enumerate(NOTES):
        ref = hf_run(bert, r, note)
        h = ref.last_hidden_state[0]
        a, e = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        assert (out.hidden[a:e] - h).abs().max() <= 1e-4
        want = ref.pooler_output[0] if pooling == "pooler" else h[0]
        assert np.abs(out.vectors[i] - want.numpy()).max() <= 1e-4
        if mlm:
            rows = np.flatnonzero(out.mlm.window == i)
            logits = out.mlm.logits[rows[np.argsort(out.mlm.position[rows])]]
            with torch.no_grad():
                head = model.cls if hasattr(model, "cls") else None
                ref_logits = head.predictions(h[None])[0] if kind != "mlm" else head(h[None])[0]
            assert np.abs(logits - ref_logits.numpy()).max() <= 1e-4


def test_mean_pooling_parity(ckpts):
    path, model = ckpts["base"]
    r = load(path, pooling="mean")
    vectors = r.encode(NOTES[:4], return_hidden=False).pooled
    for i, note in enumerate(NOTES[:4]):
        h = hf_run(model, r, note).last_hidden_state[0]
        assert (vectors[i] - h.mean(0)).abs().max() <= 1e-5


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "relu"])
def test_other_activations_parity(tmp_path, act):
    """hidden_act other than exact GELU (the fixtures' default): hidden states match."""
    torch.manual_seed(1)
    model = transformers.BertModel(hf_config(hidden_act=act)).eval()
    r = load(save_hf(model, tmp_path / act))
    out = r.encode_windows(r.tokenize(NOTES[:4]), return_hidden=True)
    for i, note in enumerate(NOTES[:4]):
        h = hf_run(model, r, note).last_hidden_state[0]
        a, e = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        assert (out.hidden[a:e] - h).abs().max() <= 1e-4


def test_bf16_cosine(ckpts):
    path, model = ckpts["pretraining"]
    r = load(path, precision="bf16", pooling="pooler", mlm=True)
    out = r.encode_windows(r.tokenize(NOTES), return_hidden=True)
    for i, note in enumerate(NOTES):
        ref = hf_run(model.bert, r, note)
        a, e = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        cos = torch.nn.functional.cosine_similarity(out.hidden[a:e], ref.last_hidden_state[0], -1)
        assert cos.min() >= 0.99
        v, w = torch.from_numpy(out.vectors[i]), ref.pooler_output[0]
        assert torch.nn.functional.cosine_similarity(v, w, 0) >= 0.99


def test_alone_equals_in_mixed_batch(ckpts):
    path, _ = ckpts["mlm"]
    r = load(path, batch_tokens=96, long_notes="windows", stride=8)
    together = r.encode(NOTES, return_hidden=False).pooled
    for i, note in enumerate(NOTES):
        alone = r.encode([note], return_hidden=False).pooled[0]
        assert (alone - together[i]).abs().max() <= 1e-5


# ---- tokenizer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lowercase", [False, True])
def test_vocab_tokenizer_equals_transformers(tmp_path, lowercase):
    (tmp_path / "vocab.txt").write_text("\n".join(vocab_list()) + "\n")
    ours = wordpiece_from_vocab(tmp_path / "vocab.txt", lowercase)
    ref = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=lowercase)
    for note in NOTES + ["Pt's b.i.d. 120/80 mg [**First Name8 (NamePattern2) 45**] Ünïcode"]:
        assert ours.encode(note).ids == ref(note)["input_ids"]


# ---- weights and config errors ---------------------------------------------------------------------
def test_unreadable_checkpoint_files_are_named(ckpts, tmp_path):
    """Binary or broken tokenizer, vocab, config and manifest files: a ValueError naming the
    file, never the library's bare exception."""
    from tokenizers import Tokenizer

    path, _ = ckpts["mlm"]
    garbage = bytes(range(256)) * 4
    cases = {
        "tokenizer.json": (garbage, "tokenizer.json: not a valid tokenizer.json ("),
        "vocab.txt": (b"[PAD]\n[UNK]\n\xff\xfe\n", "vocab.txt: line 3 is not UTF-8 text"),
        "config.json": (garbage, "config.json: not UTF-8 text (byte 128): not a JSON file"),
        "tokenizer_config.json": (b'{"do_lower_case": tr', "tokenizer_config.json: not valid JSON"),
    }
    for name, (data, want) in cases.items():
        bad = tmp_path / name
        shutil.copytree(path, bad)
        if name != "vocab.txt":  # a vocab-only checkpoint reads vocab.txt
            Tokenizer(wordpiece_from_vocab(path / "vocab.txt", False).model).save(
                str(bad / "tokenizer.json")
            )
        (bad / name).write_bytes(data)
        for opener in (load, inspect):
            with pytest.raises(ValueError) as e:
                opener(bad)
            assert want in str(e.value) and str(bad) in str(e.value), (name, str(e.value))
    out = prepare(path, tmp_path / "prepared", variant="custom", lowercase=False)
    (out / MANIFEST).write_text('{"variant": "cust')
    with pytest.raises(ValueError, match=f"{MANIFEST}: not valid JSON"):
        load(out)


def test_config_and_weight_errors(ckpts, tmp_path):
    path, _ = ckpts["mlm"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    state = load_file(bad / "model.safetensors")
    state["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(31, 32)
    del state["bert.encoder.layer.1.output.dense.bias"]
    state["bert.surprise.weight"] = torch.zeros(1)
    state["bert.encoder.layer.1.attention.output.dense.weight"][3, :2] = torch.tensor(
        [float("nan"), float("inf")]
    )  # a corrupt tensor: named with its count, never silently loaded
    state["bert.embeddings.word_embeddings.weight"][7, 0] = float("-inf")
    save_file(state, bad / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load(bad)
    msg = str(e.value)
    # every tensor by the name the file gives it (missing ones without the file's prefix)
    nan = "tensors holding NaN or inf (corrupt): bert.embeddings.word_embeddings.weight (1 of "
    assert nan in msg
    assert "bert.encoder.layer.1.attention.output.dense.weight (2 of 1024)" in msg
    assert "missing tensors: encoder.layer.1.output.dense.bias" in msg
    assert (
        "bert.surprise.weight" in msg
        and "bert.encoder.layer.0.attention.self.query.weight: expected (32, 32), got (31, 32)"
        in msg
    )
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        load(path, variant="nope")
    with pytest.raises(ValueError, match="vocab_size: preset 'bio_clinicalbert' expects 28996"):
        load(path, variant="bio_clinicalbert")
    with pytest.raises(ValueError, match="no pooler weights"):
        load(path, pooling="pooler")  # BertForMaskedLM has no pooler
    with pytest.raises(ValueError, match="no MLM head weights"):
        load(ckpts["base"][0], mlm=True)
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:500])
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load(bad)
    with pytest.raises(ValueError, match="weights bytes: not a valid safetensors"):
        read_state_dict(b"garbage bytes")
    cfg = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(ValueError, match="model_type 'roberta' is not supported"):
        load(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        load(bad)


def test_tied_decoder_and_legacy_checkpoint(ckpts, tmp_path):
    path, model = ckpts["pretraining"]
    untied = tmp_path / "untied"
    shutil.copytree(path, untied)
    state = load_file(untied / "model.safetensors")
    state.pop("cls.predictions.decoder.weight", None)
    save_file(state, untied / "model.safetensors")
    a = load(path, mlm=True).mlm(["Pt was started on [MASK] for afib."])
    b = load(untied, mlm=True).mlm(["Pt was started on [MASK] for afib."])
    assert a[0][0].ids == b[0][0].ids
    np.testing.assert_allclose(a[0][0].log_probs, b[0][0].log_probs, atol=1e-5)

    legacy = tmp_path / "legacy"  # bert_config.json, gamma/beta, bert. prefix, .bin, vocab only
    legacy.mkdir()
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    (legacy / "bert_config.json").write_text(json.dumps(cfg))
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in model.state_dict().items()}  # fmt: skip
    torch.save(sd, legacy / "pytorch_model.bin")
    shutil.copy(path / "vocab.txt", legacy / "vocab.txt")
    r_legacy, r = load(legacy, pooling="pooler"), load(path, pooling="pooler")
    np.testing.assert_allclose(r_legacy.encode(NOTES).pooled, r.encode(NOTES).pooled, atol=1e-6)


# ---- hub, prepare, bundle --------------------------------------------------------------------------
def fake_hub_cache(cache: Path, repo: str, src: Path, commit: str = "a" * 40) -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snap


def test_hub_offline_cache_and_prepare(ckpts, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    src, _ = ckpts["pretraining_bin"]
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/tiny-bert", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    local = download("org/tiny-bert")
    assert (local / "pytorch_model.bin").exists() and local.name == "a" * 40
    with pytest.raises(RuntimeError, match="'org/absent'.*not in the local cache"):
        download("org/absent")
    path, provenance = resolve("org/tiny-bert")
    assert provenance == {"hub": "org/tiny-bert", "revision": "main", "commit": "a" * 40}

    out = prepare("org/tiny-bert", tmp_path / "prepared", variant="custom", lowercase=False)
    files = sorted(p.name for p in out.iterdir())
    assert files == [MANIFEST, "config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["hub"] == "org/tiny-bert" and manifest["lowercase"] is False
    assert set(manifest["files"]) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    }
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare("org/tiny-bert", tmp_path / "prepared", variant="custom", lowercase=False)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}  # idempotent

    info = inspect(out)
    assert info["heads"] == {"pooler": True, "mlm": True, "classifier": False}
    assert info["parameters"] > 0
    raw = load(src, pooling="pooler").encode(NOTES).pooled
    np.testing.assert_allclose(load(out, pooling="pooler").encode(NOTES).pooled, raw, atol=1e-6)
    bundle = ModelBundle.load(out)
    assert bundle.lowercase is False and bundle.variant == "custom"
    from_bundle = ClinicalBertRunner.from_bundle(
        bundle, precision="fp32", max_seq=64, pooling="pooler"
    )
    np.testing.assert_allclose(from_bundle.encode(NOTES).pooled, raw, atol=1e-6)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# ---- MLM placement and heads -------------------------------------------------------------------
def test_mlm_placement_cpu_vs_in_graph_and_auto(ckpts):
    path, _ = ckpts["mlm"]
    outs = {}
    for mode in ("cpu", "in_graph"):
        r = load(path, mlm=True, mlm_mode=mode)
        outs[mode] = r.encode_windows(
            r.tokenize(NOTES), mlm_positions="all", return_logits=True
        ).mlm
    np.testing.assert_allclose(outs["cpu"].logits, outs["in_graph"].logits, atol=1e-5)
    r16 = load(path, mlm=True, mlm_mode="in_graph", precision="bf16")
    bf = r16.encode_windows(r16.tokenize(NOTES), mlm_positions="all", return_logits=True).mlm
    cos = torch.nn.functional.cosine_similarity(
        torch.from_numpy(bf.logits), torch.from_numpy(outs["cpu"].logits), -1
    )
    assert cos.min() >= 0.99
    assert resolve_mlm_mode("auto", "cpu", 1000) is MlmExecMode.IN_GRAPH
    assert resolve_mlm_mode("auto", "cuda", 512) is MlmExecMode.IN_GRAPH  # measured on H100
    assert resolve_mlm_mode("auto", "mps", 8) is MlmExecMode.IN_GRAPH  # reference table
    assert resolve_mlm_mode("auto", "mps", 9) is MlmExecMode.CPU
    assert resolve_mlm_mode("cpu", "cuda", 1) is MlmExecMode.CPU


def test_mlm_api_top_k_at_mask(ckpts):
    r = load(ckpts["mlm"][0], mlm=True)
    note = "Pt was started on [MASK] for afib."
    (preds,) = r.mlm([note], top_k=5)
    (p,) = preds
    assert note[p.char_start : p.char_start + 6] == "[MASK]"
    assert len(p.ids) == len(p.tokens) == len(p.log_probs) == 5
    assert p.log_probs == sorted(p.log_probs, reverse=True) and p.log_probs[0] <= 0
    assert r.mlm(["no mask here"])[0] == []


@pytest.mark.parametrize("aggregate", ["mean", "first", "none"])
def test_window_aggregation(ckpts, aggregate):
    r = load(ckpts["mlm"][0], long_notes="windows", stride=4, aggregate=aggregate, max_seq=16)
    windows = r.tokenize(NOTES)
    per_window = r.encode_windows(windows).vectors
    pooled = r.encode(NOTES).pooled.numpy()
    if aggregate == "none":
        assert pooled.shape == (windows.num_windows, 32)
        return
    assert pooled.shape == (len(NOTES), 32)
    for n in range(len(NOTES)):
        mine = np.flatnonzero(windows.note == n)
        if aggregate == "first":
            want = per_window[mine[windows.window_index[mine] == 0][0]]
        else:
            weights = windows.lengths[mine] - 2
            want = (per_window[mine] * weights[:, None]).sum(0) / weights.sum()
        np.testing.assert_allclose(pooled[n], want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parity_and_bf16(ckpts):
    path, model = ckpts["pretraining"]
    for precision, tol in (("fp32", 1e-4), ("bf16", None)):
        r = load(path, device="cuda", precision=precision, pooling="pooler", mlm=True)
        out = r.encode_windows(r.tokenize(NOTES), return_hidden=True)
        for i, note in enumerate(NOTES):
            h = hf_run(model.bert, r, note).last_hidden_state[0]
            a, e = out.cu_seqlens[i], out.cu_seqlens[i + 1]
            if tol:
                assert (out.hidden[a:e] - h).abs().max() <= tol
            else:
                assert torch.nn.functional.cosine_similarity(out.hidden[a:e], h, -1).min() >= 0.99


def test_compile_gives_the_same_vectors(ckpts):
    path, _ = ckpts["mlm"]
    eager = load(path).encode(NOTES[:3], return_hidden=False).pooled
    compiled = load(path, compile=True).encode(NOTES[:3], return_hidden=False).pooled
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_long_batches_run_the_ffn_in_chunks(ckpts):
    r = load(ckpts["mlm"][0], batch_tokens=4096)
    whole = r.encode(NOTES * 8, return_hidden=False).pooled
    r.encoder.place(varlen=False, ffn_chunk=7)  # many chunks, split mid-sequence
    torch.testing.assert_close(r.encode(NOTES * 8, return_hidden=False).pooled, whole)


def test_normalize_and_numpy_embed(ckpts):
    path, _ = ckpts["mlm"]
    plain = load(path, long_notes="windows", stride=8)
    unit = load(path, long_notes="windows", stride=8, normalize=True)
    a, b = plain.embed(NOTES), unit.embed(NOTES)
    assert isinstance(b, np.ndarray) and b.dtype == np.float32 and b.shape == (len(NOTES), 32)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(b, a / np.linalg.norm(a, axis=1, keepdims=True), atol=1e-6)


def test_unknown_casing_says_how_to_give_it_in_each_interface(tmp_path):
    """A vocab-only checkpoint of a custom variant: the casing must be given, and the error
    names the spec field (model.lowercase) as well as the Python and CLI spellings."""
    from clinicalbert_core.hub import prepare
    from jobs.synthetic import make_model

    raw = make_model(tmp_path / "raw", hidden=32, layers=1, heads=2, max_positions=64)
    with pytest.raises(ValueError) as e:
        prepare(raw, tmp_path / "out", variant="custom")
    message = str(e.value)
    assert "model.lowercase: true/false" in message and "lowercase=True/False" in message
    assert "--lowercase or --cased" in message and "\n" not in message
