"""Fine-tuned classifiers against transformers: BertFor/ModernBertFor Sequence/Token
Classification on tiny random checkpoints written with `save_pretrained`, loaded strictly
(head tensors named when missing), their logits equal to transformers' on notes that fit one
window; `classify()` per note, with Huang's readmission score over a long note's windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_core import hf_config, save_hf
from test_modernbert import ids_of, perturb

from clinicalbert_core import ClinicalBertRunner, inspect, prepare
from clinicalbert_core.classify import scores
from jobs.synthetic import make_bpe_tokenizer, make_notes

transformers = pytest.importorskip("transformers")
NOTES = make_notes(6, seed=11, min_words=5, max_words=30)
LABELS = {"0": "none", "1": "heart failure", "2": "diabetes"}


def bert_classifier(path: Path, cls, seed: int = 0, **kw) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = cls(hf_config(**kw)).eval()
    perturb(model, seed)
    return save_hf(model, path), model


def modernbert_classifier(path: Path, cls, tok, seed: int = 0, **kw):
    cfg = transformers.ModernBertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=512,
        local_attention=16, global_attn_every_n_layers=2, **ids_of(tok, "modernbert"), **kw,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    perturb(model, seed)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path, model


def load(path, **kw) -> ClinicalBertRunner:
    opts = dict(variant="custom", lowercase=False, precision="fp32", max_seq=64,
                batch_tokens=512, embeddings=False, classify=True)  # fmt: skip
    return ClinicalBertRunner.load(path, **{**opts, **kw})


def hf_logits(model, runner: ClinicalBertRunner, note: str) -> np.ndarray:
    ids = runner.tokenize([note]).ids
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_classifiers_give_transformers_logits(tmp_path, bpe, pooling):
    bert, bert_model = bert_classifier(tmp_path / "bert", transformers.BertForSequenceClassification,
                                       num_labels=3, id2label=LABELS)  # fmt: skip
    modern, modern_model = modernbert_classifier(
        tmp_path / "modern", transformers.ModernBertForSequenceClassification, bpe,
        num_labels=3, id2label=LABELS, classifier_pooling=pooling, classifier_bias=True,
    )  # fmt: skip
    for path, model in ((bert, bert_model), (modern, modern_model)):
        runner = load(path, class_aggregate="first")
        assert runner.task.labels == ("none", "heart failure", "diabetes")
        info = inspect(path)
        assert info["classifier"]["kind"] == "sequence" and info["contradictions"] == []
        assert info["classifier"]["labels"] == ["none", "heart failure", "diabetes"]
        out = runner.classify(NOTES)
        assert not out.empty.any() and (runner.tokenize(NOTES).windows_per_note() == 1).all()
        want = np.stack([hf_logits(model, runner, n) for n in NOTES])
        np.testing.assert_allclose(out.logits, want, atol=1e-4)
        np.testing.assert_allclose(out.scores, scores(want, "softmax"), atol=1e-5)
        assert out.labels == [[runner.task.labels[i]] for i in want.argmax(1)]
        prepared = prepare(path, tmp_path / f"prepared-{path.name}", variant="custom",
                           lowercase=False)  # fmt: skip
        again = load(prepared, class_aggregate="first")  # the config's labels kept
        assert again.task == runner.task
        np.testing.assert_array_equal(again.classify(NOTES).logits, out.logits)


def test_token_classifiers_give_transformers_logits_per_token(tmp_path, bpe):
    bert, bert_model = bert_classifier(tmp_path / "bert", transformers.BertForTokenClassification,
                                       num_labels=5)  # fmt: skip
    modern, modern_model = modernbert_classifier(
        tmp_path / "modern", transformers.ModernBertForTokenClassification, bpe, num_labels=5
    )
    for path, model in ((bert, bert_model), (modern, modern_model)):
        runner = load(path)
        assert runner.task.kind == "token" and runner.task.num_labels == 5
        windows = runner.tokenize(NOTES)
        out = runner.encode_windows(windows, return_hidden=True)
        with torch.no_grad():
            ours = runner.classifier(out.hidden, out.cu_seqlens).numpy()  # (N, 5)
        cu = out.cu_seqlens.numpy()
        for i, note in enumerate(NOTES):
            np.testing.assert_allclose(ours[cu[i] : cu[i + 1]], hf_logits(model, runner, note),
                                       atol=1e-4)  # fmt: skip
        with pytest.raises(ValueError, match="this checkpoint's is a token classifier"):
            runner.classify(NOTES[:1])


def test_huangs_readmission_model_scores_long_notes_by_the_papers_formula(tmp_path):
    """A one-logit BertForSequenceClassification whose config predates `architectures` and
    `problem_type` (as Huang's readmission checkpoint): a sigmoid score; `huang` over a long
    note's windows equals the formula over the same runner's per-window ('none') rows."""
    path, _ = bert_classifier(tmp_path / "readmission", transformers.BertForSequenceClassification,
                              num_labels=1)  # fmt: skip
    config = json.loads((path / "config.json").read_text())
    for key in ("architectures", "problem_type", "id2label", "label2id"):
        config.pop(key, None)
    (path / "config.json").write_text(json.dumps(config))
    notes = make_notes(3, seed=5, min_words=60, max_words=90) + [""]
    per_window = load(path, class_aggregate="none", long_notes="windows", stride=16)
    assert per_window.task.score == "sigmoid" and per_window.task.labels == ("LABEL_0",)
    rows = per_window.classify(notes)
    huang = load(path, class_aggregate="huang", long_notes="windows", stride=16).classify(notes)
    windows = rows.windows
    assert (windows.windows_per_note()[:3] > 1).all()  # long notes: several windows each
    for i in range(3):
        p = rows.scores[windows.note == i, 0].astype(np.float64)
        want = (p.max() + p.sum() / 2) / (1 + len(p) / 2)
        np.testing.assert_allclose(huang.scores[i, 0], want, rtol=1e-5)
        assert huang.labels[i] == (["LABEL_0"] if want >= 0.5 else [])
    assert huang.empty.tolist() == [False, False, False, True] and huang.labels[3] == []
    assert (huang.scores[3] == 0).all()


def test_a_classifier_missing_a_head_tensor_is_one_error_naming_it(tmp_path):
    path, _ = bert_classifier(tmp_path / "clf", transformers.BertForSequenceClassification,
                              num_labels=2)  # fmt: skip
    state = load_file(path / "model.safetensors")
    del state["classifier.bias"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: classifier\.bias") as e:
        load(path)
    assert "\n" not in str(e.value)
    info = inspect(path)
    assert info["heads"]["classifier"] and any(
        "classifier.bias" in c for c in info["contradictions"]
    )


def test_classify_on_a_checkpoint_without_a_classifier_says_so(tmp_path):
    path, _ = bert_classifier(tmp_path / "mlm", transformers.BertForMaskedLM)
    with pytest.raises(ValueError, match="classify=True needs a fine-tuned classifier"):
        load(path)
