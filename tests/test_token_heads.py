"""Token classifiers end to end: `runner.entities` against transformers' token-classification
pipeline (both families, every aggregation strategy), long notes stitched over windows against
one unwindowed pass, and heads.tokens in jobs (entities, text_redacted, metadata, validate,
EncoderPredictor). The grouping rules themselves: test_entities.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_core import hf_config, save_hf
from test_modernbert import perturb, save_modernbert

from clinicalbert_core import ClinicalBertRunner, prepare
from clinicalbert_core.entities import STRATEGIES
from jobs.synthetic import make_bpe_tokenizer, make_notes

transformers = pytest.importorskip("transformers")
LABELS = ["O", "B-NAME", "I-NAME", "B-DATE", "I-DATE", "AGE"]
ID2LABEL = dict(enumerate(LABELS))
NOTES = make_notes(5, seed=21, min_words=5, max_words=25) + [
    "Mr. Zyxwvut seen 12/03 ,, age 87;  stable",  # an unknown word: [UNK] in the WordPiece vocab
    "pt [MASK] seen [SEP] by dr. [**Name**]",  # special tokens written in a note are its words
]


def sharpen(model, scale: float = 20.0):
    """Random heads give near-uniform scores: a larger classifier makes the argmax vary token
    to token, so entities of several tokens form."""
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    torch.manual_seed(3)
    bert = transformers.BertForTokenClassification(
        hf_config(num_labels=len(LABELS), id2label=ID2LABEL, max_position_embeddings=512)
    ).eval()
    perturb(bert, 3)
    bert_path = save_hf(sharpen(bert), root / "bert")
    bpe = make_bpe_tokenizer()
    modern_path, modern = save_modernbert(
        root / "modern", bpe, 4, cls=transformers.ModernBertForTokenClassification,
        num_labels=len(LABELS), id2label=ID2LABEL,
    )  # fmt: skip
    sharpen(modern).save_pretrained(modern_path)
    return {"bert": (bert_path, bert), "modern": (modern_path, modern)}


def load(path, **kw) -> ClinicalBertRunner:
    opts = dict(variant="custom", lowercase=False, precision="fp32", max_seq=128,
                batch_tokens=1024, embeddings=False, classify=True)  # fmt: skip
    return ClinicalBertRunner.load(path, **{**opts, **kw})


def pipeline_of(runner: ClinicalBertRunner, model, strategy: str):
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=runner.tokenizer.tokenizer, unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
    )  # fmt: skip
    return transformers.pipeline("token-classification", model=model, tokenizer=tok,
                                 aggregation_strategy=strategy, device="cpu")  # fmt: skip


@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")
@pytest.mark.parametrize("family", ["bert", "modern"])
def test_entities_equal_transformers_pipeline_for_every_strategy(checkpoints, family):
    path, model = checkpoints[family]
    runner = load(path, max_seq=512)  # every note in one window, as the pipeline reads it
    assert not runner.tokenize(NOTES).truncated.any()
    for strategy in STRATEGIES:
        ours = runner.entities(NOTES, aggregation=strategy)
        theirs = pipeline_of(runner, model, strategy)(NOTES)
        assert sum(len(e) for e in ours) > len(NOTES)  # entities of several labels found
        for mine, want in zip(ours, theirs):
            label = "entity" if strategy == "none" else "entity_group"
            spans = [(e["start"], e["end"], e[label]) for e in want]
            assert [(e["start"], e["end"], e["label"]) for e in mine] == spans, strategy
            np.testing.assert_allclose([e["score"] for e in mine],
                                       [e["score"] for e in want], atol=1e-4)  # fmt: skip


def test_long_notes_stitched_over_windows_agree_with_one_pass(tmp_path):
    """A model whose per-token output depends mostly on the token itself (no position
    embeddings, attention output scaled down), so that what is left to differ is the stitching:
    a windowed run (40 tokens, stride 10) agrees with one 512-token pass on
    >= 99% of entity spans; no entity is repeated or overlaps another at a seam."""
    torch.manual_seed(5)
    model = transformers.BertForTokenClassification(
        hf_config(num_labels=len(LABELS), id2label=ID2LABEL, max_position_embeddings=512)
    ).eval()
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.zero_()
        for layer in model.bert.encoder.layer:
            layer.attention.output.dense.weight.mul_(0.01)
    path = save_hf(sharpen(model, 40.0), tmp_path / "ner")
    notes = make_notes(10, seed=9, min_words=40, max_words=60)
    windowed = load(path, long_notes="windows", max_seq=40, stride=10)
    whole = load(path, max_seq=512)
    assert (windowed.tokenize(notes).windows_per_note() >= 4).all()
    assert not whole.tokenize(notes).truncated.any()
    same = total = 0
    for a, b in zip(windowed.entities(notes), whole.entities(notes)):
        spans = [(e["start"], e["end"], e["label"]) for e in a]
        assert spans == sorted(set(spans))  # in order, none twice
        assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))  # none overlapping
        want = {(e["start"], e["end"], e["label"]) for e in b}
        same, total = same + len(want & set(spans)), total + max(len(want), len(spans))
    assert total > 100 and same / total >= 0.99


def test_entities_of_empty_notes_and_a_sequence_classifier_refused(checkpoints, tmp_path):
    runner = load(checkpoints["bert"][0])
    assert runner.entities(["", "   "]) == [[], []]
    with pytest.raises(ValueError, match="classify\\(\\) needs a sequence classifier"):
        runner.classify(NOTES[:1])
    seq = save_hf(transformers.BertForSequenceClassification(hf_config()), tmp_path / "seq")
    with pytest.raises(ValueError, match="entities\\(\\) needs a token classifier"):
        load(seq, max_seq=64).entities(NOTES[:1])


# ---- jobs ----------------------------------------------------------------------------------
def tokens_spec(tmp_path: Path, model: Path, **tokens) -> dict:
    from test_jobs import job, parquet_corpus

    _, corpus = parquet_corpus(tmp_path, 12, group=5)
    return job(tmp_path, model, corpus, heads={"pooling": "cls", "tokens": tokens},
               model={"lowercase": False})  # fmt: skip


def test_a_job_writes_each_notes_entities_and_redacted_text(tmp_path, checkpoints):
    from test_jobs import clean_run, embeddings

    from clinicalbert_core.redact import redact

    model = prepare(checkpoints["bert"][0], tmp_path / "model", variant="custom",
                    lowercase=False)  # fmt: skip
    spec = tokens_spec(tmp_path, model, aggregation="first", min_score=0.3, redact=True)
    out = clean_run(spec, tmp_path).sort_by("id")
    notes = pq.read_table(tmp_path / "notes.parquet").sort_by("note_id")["text"].to_pylist()
    runner = load(model, long_notes="windows", max_seq=64, stride=16)
    want = runner.entities(notes, aggregation="first", min_score=0.3)
    assert (runner.tokenize(notes).windows_per_note() > 1).any()  # long notes among them
    got = out["entities"].to_pylist()
    assert [[(e["start"], e["end"], e["label"]) for e in g] for g in got] == [
        [(e["start"], e["end"], e["label"]) for e in w] for w in want
    ]
    assert all(e["score"] >= 0.3 for g in got for e in g) and sum(map(len, got)) > 12
    assert out["text_redacted"].to_pylist() == [
        redact(n, [(e["start"], e["end"], e["label"]) for e in w]) for n, w in zip(notes, want)
    ]
    assert embeddings(out).shape == (12, 32)  # the vectors too, from the same encoder pass
    meta = pq.read_schema(sorted((tmp_path / "fresh" / "out").glob("part-*.parquet"))[0]).metadata
    assert json.loads(meta[b"class_labels"]) == LABELS
    assert (meta[b"entity_aggregation"], meta[b"min_score"], meta[b"redact"]) == (
        b"first", b"0.3", b"true")  # fmt: skip
    plain = clean_run(tokens_spec(tmp_path, model), tmp_path, "plain")
    assert "text_redacted" not in plain.column_names  # off by default: no note text


def test_redact_replaces_each_span_by_its_label():
    from clinicalbert_core.redact import redact

    text = "seen by Dr. Smith on 3/4 at Mercy"
    spans = [(28, 33, "HOSPITAL"), (12, 17, "NAME"), (21, 24, "DATE")]
    assert redact(text, spans) == "seen by Dr. [NAME] on [DATE] at [HOSPITAL]"
    assert redact(text, []) == text
    assert redact(text, [(0, 4, "A"), (2, 7, "B")]) == "[A] Dr. Smith on 3/4 at Mercy"


def test_spec_and_validate_refuse_what_tokens_cannot_do(tmp_path, checkpoints):
    from jobs.preflight import check_model
    from jobs.spec import SpecError, parse_spec

    path = checkpoints["bert"][0]
    spec = tokens_spec(tmp_path, path)
    spec["model"]["long_notes"]["aggregate"] = "none"
    with pytest.raises(SpecError, match="heads.tokens.*needs one row per note"):
        parse_spec(spec, tmp_path)
    both = tokens_spec(tmp_path, path)
    both["heads"]["classify"] = {}
    with pytest.raises(SpecError, match="set heads.classify or heads.tokens"):
        parse_spec(both, tmp_path)
    seq = save_hf(transformers.BertForSequenceClassification(hf_config()), tmp_path / "seq")
    (problem,) = check_model(parse_spec(tokens_spec(tmp_path, seq), tmp_path))
    assert problem.startswith("heads.tokens: this checkpoint's classifier is a sequence "
                              "classifier")  # fmt: skip
    assert check_model(parse_spec(tokens_spec(tmp_path, path), tmp_path)) == []


def test_encoder_predictor_adds_entities_and_classes(tmp_path, checkpoints):
    import pyarrow as pa

    from jobs.predictor import EncoderPredictor

    path = checkpoints["bert"][0]
    batch = pa.table({"text": NOTES[:3] + ["", None]})
    predictor = EncoderPredictor(str(path), variant="custom", lowercase=False, max_seq=128,
                                 precision="fp32",
                                 classify=True, entity_options={"aggregation": "max"})  # fmt: skip
    out = predictor(batch)
    want = load(path).entities(NOTES[:3], aggregation="max")
    assert out["entities"].to_pylist()[:3] == [
        [{**e, "score": pytest.approx(e["score"], abs=1e-6)} for e in w] for w in want
    ]
    assert out["entities"].null_count == 2 and out["error"].to_pylist()[3:] == ["empty", "null"]
    seq = save_hf(transformers.BertForSequenceClassification(hf_config(num_labels=2)),
                  tmp_path / "seq")  # fmt: skip
    out = EncoderPredictor(str(seq), variant="custom", lowercase=False, classify=True, precision="fp32",
                           embeddings=False, max_seq=64)(batch)  # fmt: skip
    assert "embedding" not in out.column_names and out["labels"].null_count == 2
    assert len(out["class_scores"][0].as_py()) == 2


@pytest.mark.parametrize("name", ["readmission", "deid"])
def test_the_example_configs_run_on_the_demo_data(tmp_path, name):
    """configs/readmission.yaml (a model in Huang's archive layout, read raw) and
    configs/deid.yaml, as written, on `clinicalbert demo-data`'s corpus and models."""
    import yaml
    from test_jobs import clean_run

    from jobs.cli import main

    demo = tmp_path / "demo"
    main(["demo-data", "--out", str(demo), "--notes", "20", "--hidden", "32"])
    spec = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{name}.yaml").read_text())
    spec["corpus"]["paths"] = [str(demo / "corpus" / "notes.parquet")]
    spec["model"]["path"] = spec["model"]["path"].replace("../out/demo", str(demo))
    out = clean_run(spec, tmp_path)
    assert out.num_rows == pq.read_metadata(demo / "corpus" / "notes.parquet").num_rows - sum(
        1 for c in pq.read_table(demo / "corpus" / "notes.parquet")["category"].to_pylist()
        if "where" in spec["corpus"] and c != spec["corpus"]["where"]["category"]
    )  # fmt: skip
    if name == "readmission":
        assert (raw := demo / "raw_readmission" / "pytorch_model.bin").is_file()
        assert not (raw.parent / "config.json").exists()  # bert_config.json, as Huang's
        scores = np.concatenate(out["class_scores"].to_numpy(zero_copy_only=False))
        assert ((scores > 0) & (scores < 1)).all()
    else:
        from clinicalbert_core.redact import redact

        corpus = pq.read_table(demo / "corpus" / "notes.parquet")
        text = dict(zip(corpus["note_id"].to_pylist(), corpus["text"].to_pylist()))
        found = out["entities"].to_pylist()
        assert sum(map(len, found)) > out.num_rows  # the demo model tags a few tokens a note
        assert out["text_redacted"].to_pylist() == [
            redact(text[i], [(e["start"], e["end"], e["label"]) for e in es])
            for i, es in zip(out["id"].to_pylist(), found)
        ]


def test_verify_checks_the_entity_columns(tmp_path, checkpoints):
    import pyarrow as pa
    from test_jobs import clean_run

    from jobs.rows import ENTITY_TYPE
    from jobs.verify import verify_output

    model = prepare(checkpoints["bert"][0], tmp_path / "model", variant="custom",
                    lowercase=False)  # fmt: skip
    clean_run(tokens_spec(tmp_path, model, redact=True), tmp_path)
    out = tmp_path / "fresh" / "out"
    before = verify_output(str(out))
    assert not [f for f in before if "entities" in f or "text_redacted" in f]
    path = sorted(out.glob("part-*.parquet"))[0]
    part = pq.read_table(path)
    rows = part["entities"].to_pylist()
    k = next(i for i, r in enumerate(rows) if r)  # a row with entities
    rows[k][0]["end"] = rows[k][0]["start"]  # an empty span
    texts = part["text_redacted"].to_pylist()
    texts[k - 1 if k else 1] = None
    part = part.set_column(part.schema.get_field_index("entities"), "entities",
                           pa.array(rows, ENTITY_TYPE))  # fmt: skip
    part = part.set_column(part.schema.get_field_index("text_redacted"), "text_redacted",
                           pa.array(texts, pa.string()))  # fmt: skip
    pq.write_table(part.replace_schema_metadata(pq.ParquetFile(path).metadata.metadata), path)
    found = sorted(f for f in verify_output(str(out)) if f not in before)
    ids = part["id"].to_pylist()
    assert found == [
        f"{path.name}: 1 rows with a null or malformed value in entities, e.g. id {ids[k]!r}",
        f"{path.name}: 1 rows with a null or malformed value in text_redacted, e.g. id "
        f"{ids[k - 1 if k else 1]!r}",
    ]
