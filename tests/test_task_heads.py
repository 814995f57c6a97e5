"""Fine-tuned classifiers against transformers: BertFor/ModernBertFor Sequence/Token
Classification on tiny random checkpoints written with `save_pretrained`, loaded strictly
(head tensors named when missing), their logits equal to transformers' on notes that fit one
window; `classify()` per note, with Huang's readmission score over a long note's windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_core import hf_config, save_hf
from test_modernbert import perturb, save_modernbert

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
    return save_modernbert(path, tok, seed, cls=cls, **kw)


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


# ---- the job side: heads.classify through the actor's own ShardProcessor (no Ray) -------------
def classify_spec(tmp_path: Path, model: Path, **classify) -> dict:
    from test_jobs import job, parquet_corpus

    _, corpus = parquet_corpus(tmp_path, 12, group=5)
    return job(tmp_path, model, corpus, heads={"pooling": "cls", "classify": classify},
               model={"lowercase": False})  # fmt: skip


def test_a_job_writes_each_notes_classes_as_the_runner_gives_them(tmp_path):
    import pyarrow.parquet as pq
    from test_jobs import clean_run, embeddings

    raw, _ = bert_classifier(tmp_path / "raw", transformers.BertForSequenceClassification,
                             num_labels=3, id2label=LABELS, max_position_embeddings=128)  # fmt: skip
    model = prepare(raw, tmp_path / "model", variant="custom", lowercase=False)
    spec = classify_spec(tmp_path, model, aggregate="max")
    out = clean_run(spec, tmp_path).sort_by("id")
    notes = pq.read_table(tmp_path / "notes.parquet").sort_by("note_id")["text"].to_pylist()
    runner = load(model, class_aggregate="max", long_notes="windows", stride=16, embeddings=True,
                  aggregate="mean")  # fmt: skip
    want = runner.classify(notes)
    assert (want.windows.windows_per_note() > 1).any()  # long notes among them
    np.testing.assert_allclose(np.stack(out["class_logits"].to_numpy(zero_copy_only=False)),
                               want.logits, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.stack(out["class_scores"].to_numpy(zero_copy_only=False)),
                               want.scores, atol=1e-5)  # fmt: skip
    assert out["labels"].to_pylist() == want.labels
    assert embeddings(out).shape == (12, 32)  # the vectors too, from the same encoder pass
    meta = pq.read_schema(sorted((tmp_path / "fresh" / "out").glob("part-*.parquet"))[0]).metadata
    assert json.loads(meta[b"class_labels"]) == ["none", "heart failure", "diabetes"]
    assert (meta[b"class_scores"], meta[b"class_aggregate"]) == (b"softmax", b"max")


def test_validate_refuses_a_classifier_the_checkpoint_does_not_have(tmp_path):
    from jobs.preflight import check_model
    from jobs.spec import parse_spec

    mlm, _ = bert_classifier(tmp_path / "mlm", transformers.BertForMaskedLM)
    spec = parse_spec(classify_spec(tmp_path, mlm), tmp_path)
    assert check_model(spec) == [
        "heads.classify: this checkpoint has no fine-tuned classifier (its heads: mlm)"
    ]
    ner, _ = bert_classifier(tmp_path / "ner", transformers.BertForTokenClassification,
                             num_labels=3)  # fmt: skip
    (problem,) = check_model(parse_spec(classify_spec(tmp_path, ner), tmp_path))
    assert problem.startswith("heads.classify: this checkpoint's classifier is a token classifier")
    three, _ = bert_classifier(tmp_path / "three", transformers.BertForSequenceClassification,
                               num_labels=3)  # fmt: skip
    (problem,) = check_model(
        parse_spec(classify_spec(tmp_path, three, aggregate="huang"), tmp_path)
    )
    assert problem.startswith("heads.classify.aggregate: 'huang' needs a one-logit head")
    assert "3 label(s)" in problem


def test_verify_checks_the_classifier_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_jobs import clean_run

    from jobs.verify import verify_output

    raw, _ = bert_classifier(tmp_path / "raw", transformers.BertForSequenceClassification,
                             num_labels=2, max_position_embeddings=128)  # fmt: skip
    model = prepare(raw, tmp_path / "model", variant="custom", lowercase=False)
    clean_run(classify_spec(tmp_path, model), tmp_path)
    out = tmp_path / "fresh" / "out"
    before = verify_output(str(out))
    assert not [f for f in before if "class_" in f]
    path = sorted(out.glob("part-*.parquet"))[0]
    part = pq.read_table(path)
    scores = np.stack(part["class_scores"].to_numpy(zero_copy_only=False))
    scores[0, 1] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), 2)
    part = part.set_column(part.schema.get_field_index("class_scores"), "class_scores", column)
    pq.write_table(part.replace_schema_metadata(pq.ParquetFile(path).metadata.metadata), path)
    found = [f for f in verify_output(str(out)) if f not in before]
    assert found == [f"{path.name}: 1 rows with null, NaN or inf in class_scores, e.g. id "
                     f"{part['id'][0].as_py()!r}"]  # fmt: skip


@pytest.mark.ray
@pytest.mark.parametrize("head", ["classify", "tokens"])
def test_a_job_with_every_head_interrupted_and_resumed_equals_a_clean_run(
    tmp_path, ray_local, head
):
    """Vectors, MLM at every position and the classifier (a sequence one: per note; a token
    one: entities and the redacted note) from one encoder pass, in a Ray job stopped after two
    shards and resumed: the output equals a clean run's."""
    from test_jobs import clean_run, interrupt_after, job, parquet_corpus, run

    cls = (transformers.BertForSequenceClassification if head == "classify" else
           transformers.BertForTokenClassification)  # fmt: skip
    raw, _ = bert_classifier(tmp_path / "raw", cls, num_labels=1 if head == "classify" else 5,
                             max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(1)
    mlm = transformers.BertForMaskedLM(hf_config(max_position_embeddings=128)).state_dict()
    state = load_file(raw / "model.safetensors")  # + an MLM head: every head in one checkpoint
    state |= {k: v.clone() for k, v in mlm.items() if k.startswith("cls.predictions.")}
    for tied in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
        del state[tied]  # the word embeddings and cls.predictions.bias, as HF saves them
    save_file(state, raw / "model.safetensors", metadata={"format": "pt"})
    model = prepare(raw, tmp_path / "model", variant="custom", lowercase=False)
    _, corpus = parquet_corpus(tmp_path, 30, group=5)
    heads = {"pooling": "pooler", "mlm": {"enabled": True, "positions": "all", "top_k": 2},
             "classify": {"aggregate": "huang"}} if head == "classify" else {
             "pooling": "cls", "mlm": {"enabled": True, "positions": "all", "top_k": 2},
             "tokens": {"redact": True}}  # fmt: skip
    spec = job(tmp_path, model, corpus, heads=heads, run={"shard_rows": 5, "batch_rows": 5})
    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path, on_result=interrupt_after(2))
    report = run(spec, tmp_path)
    assert report["shards"]["committed_before"] >= 2 and report["rows_out"] == 30
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    resumed = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("id")
    clean = clean_run(spec, tmp_path).sort_by("id")
    assert resumed.column_names == clean.column_names
    wanted = ["class_scores"] if head == "classify" else ["entities", "text_redacted"]
    assert set(wanted) <= set(clean.column_names)
    if head == "tokens":
        assert pc.sum(pc.list_value_length(clean["entities"])).as_py() > 30  # entities found
    for column in clean.column_names:
        if column in ("embedding", "class_logits", "class_scores", "mlm_top_logprobs", "entities"):
            a, b = resumed[column], clean[column]
            while pa.types.is_list(a.type) or pa.types.is_fixed_size_list(a.type):
                assert pc.list_value_length(a).equals(pc.list_value_length(b)), column
                a, b = pc.list_flatten(a), pc.list_flatten(b)
            if pa.types.is_struct(a.type):  # entities: the same spans, scores within 1e-5
                for field in ("start", "end", "label"):
                    assert pc.struct_field(a, field).equals(pc.struct_field(b, field)), column
                a, b = pc.struct_field(a, "score"), pc.struct_field(b, "score")
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-5, err_msg=column)
        else:
            assert resumed[column].equals(clean[column]), column
