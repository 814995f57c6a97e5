"""Entity grouping (clinicalbert_core/entities.py) against transformers' token-classification
pipeline, on tiny random token classifiers whose classifier weights are scaled up so labels
change from token to token: a BERT with a WordPiece tokenizer ("##" pieces, [UNK]) and a
ModernBERT with a byte-level BPE tokenizer (no subword prefix: the pipeline's fallback rule).
Every strategy, `ignore_labels`, `min_score`, a batch of notes equal to each note alone; exact
small cases of both subword rules; validation errors and empty batches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_core import hf_config
from test_modernbert import perturb, save_modernbert
from test_packing import vocab_list

from clinicalbert_core.entities import STRATEGIES, Entities, NoteTokens, Subwords, group
from clinicalbert_core.tokenizer import wordpiece_from_vocab
from jobs.synthetic import make_bpe_tokenizer, make_notes

transformers = pytest.importorskip("transformers")

# B-/I- tags, plain O, a non-BIO label, a hyphen inside a tag, and a non-BIO name with a hyphen
# (tagged "X-RAY" by get_tag, its group named "RAY" by group_sub_entities' split)
LABELS = ("O", "B-PER", "I-PER", "B-DRUG-DOSE", "I-DRUG-DOSE", "AGE", "X-RAY", "I-RAY")
NOTES = [
    "Pt Zoë Smith, 67 yo F  with CHF;  afib -- started lasix 40mg b.i.d.  xyzzyq!!",
    *make_notes(2, seed=7, min_words=8, max_words=20),
    "",
    "  BP 120/80,   HR 72. Zoë's  qxqzzy-vwv;; denies chest pain",
]
KINDS = ("wordpiece", "bpe")


def note_tokens(tok, model, note: str) -> NoteTokens:
    """One note's tokens as the caller gives them: the model's logits on the tokenized note,
    special tokens dropped."""
    enc = tok.encode(note)
    keep = np.array(enc.special_tokens_mask) == 0
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
    offsets = np.array(enc.offsets, np.int64).reshape(-1, 2)[keep]
    return NoteTokens(ids=np.array(enc.ids, np.int32)[keep], start=offsets[:, 0],
                      end=offsets[:, 1], logits=logits[keep].astype(np.float32),
                      offsets=np.array([0, keep.sum()], np.int64))  # fmt: skip


def concat(parts: list[NoteTokens]) -> NoteTokens:
    counts = [len(p.ids) for p in parts]
    return NoteTokens(
        ids=np.concatenate([p.ids for p in parts]),
        start=np.concatenate([p.start for p in parts]),
        end=np.concatenate([p.end for p in parts]),
        logits=np.concatenate([p.logits for p in parts]).reshape(-1, len(LABELS)),
        offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
    )


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict:
    """kind -> (tokenizers.Tokenizer, pipeline, [NoteTokens of each of NOTES])."""
    root = tmp_path_factory.mktemp("entities")
    (root / "vocab.txt").write_text("\n".join(vocab_list()) + "\n")
    id2label = dict(enumerate(LABELS))
    torch.manual_seed(0)
    bert = transformers.BertForTokenClassification(
        hf_config(id2label=id2label, max_position_embeddings=256)
    ).eval()
    perturb(bert, 0)
    bpe = make_bpe_tokenizer()
    _, modern = save_modernbert(root / "modern", bpe, seed=1, id2label=id2label,
                                cls=transformers.ModernBertForTokenClassification)  # fmt: skip
    out = {}
    pairs = {"wordpiece": (wordpiece_from_vocab(root / "vocab.txt", False), bert, "[UNK]"),
             "bpe": (bpe, modern, None)}  # fmt: skip
    for kind, (tok, model, unk) in pairs.items():
        with torch.no_grad():  # peaked scores, every label winning somewhere
            model.classifier.weight.mul_(20)
            logits = np.concatenate([note_tokens(tok, model, note).logits for note in NOTES])
            model.classifier.bias.sub_(torch.from_numpy(logits.mean(0)))
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk,
                                                    model_input_names=["input_ids", "attention_mask"])  # fmt: skip
        pipe = transformers.pipeline("token-classification", model=model, tokenizer=fast)
        out[kind] = (tok, pipe, [note_tokens(tok, model, note) for note in NOTES])
    return out


def pipeline_entities(pipe, note: str, strategy: str, **kw) -> tuple[list, list]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Tokenizer does not support real words")
        found = pipe(note, aggregation_strategy=strategy, **kw)
    key = "entity" if strategy == "none" else "entity_group"
    return [(e["start"], e["end"], e[key]) for e in found], [float(e["score"]) for e in found]


def only(found: tuple[list, list], keep) -> tuple[list, list]:
    """The pipeline's entities `found` for which keep(span, score) holds."""
    kept = [(span, score) for span, score in zip(*found) if keep(span, score)]
    return [span for span, _ in kept], [score for _, score in kept]


def assert_same(ours: list[dict], want: tuple[list, list]) -> None:
    assert [(e["start"], e["end"], e["label"]) for e in ours] == want[0]
    np.testing.assert_allclose([e["score"] for e in ours], want[1], atol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", KINDS)
def test_entities_are_the_pipelines(classifiers, kind, strategy):
    """Each note of a batch as the pipeline gives it (default ignore_labels, none ignored,
    a min_score), and each note alone exactly as inside the batch."""
    tok, pipe, parts = classifiers[kind]
    batch = concat(parts)
    subwords = Subwords.of(tok)
    flags = subwords.flags(NOTES, batch)
    default = group(batch, flags, LABELS, strategy)
    every = group(batch, flags, LABELS, strategy, ignore_labels=())
    threshold = float(np.median(every.score))
    sure = group(batch, flags, LABELS, strategy, ignore_labels=(), min_score=threshold)
    assert 0 < len(sure.score) < len(every.score) and (sure.score >= threshold).all()
    assert len(default.score) < len(every.score)  # O among the predictions, ignored
    assert_same(default.note(0), pipeline_entities(pipe, NOTES[0], strategy))
    for i, note in enumerate(NOTES):
        want = pipeline_entities(pipe, note, strategy, ignore_labels=[])
        assert_same(every.note(i), want)
        assert_same(default.note(i), only(want, lambda span, _: span[2] != "O"))
        assert_same(sure.note(i), only(want, lambda _, score: score >= threshold))
        alone = group(parts[i], subwords.flags([note], parts[i]), LABELS, strategy)
        assert alone.note(0) == default.note(i)
    assert default.note(NOTES.index("")) == []


@pytest.mark.parametrize("kind", KINDS)
def test_subword_flags_are_the_pipelines_is_subword(classifiers, kind):
    tok, pipe, parts = classifiers[kind]
    batch = concat(parts)
    flags = Subwords.of(tok).flags(NOTES, batch)
    assert flags.any() and not flags.all()
    first = transformers.pipelines.token_classification.AggregationStrategy.FIRST
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Tokenizer does not support real words")
        for i, note in enumerate(NOTES):
            enc = tok.encode(note)
            pre = pipe.gather_pre_entities(note, np.array(enc.ids), np.zeros((len(enc.ids), 1)),
                                           np.array(enc.offsets).reshape(-1, 2),
                                           np.array(enc.special_tokens_mask), first)  # fmt: skip
            a, b = batch.offsets[i : i + 2]
            assert flags[a:b].tolist() == [p["is_subword"] for p in pre]


def test_the_notes_exercise_the_rules(classifiers):
    """What the parity tests rely on: [UNK] inside a note, words of several pieces, groups of
    several tokens, and every kind of label predicted somewhere."""
    for kind in KINDS:
        tok, _, parts = classifiers[kind]
        batch = concat(parts)
        flags = Subwords.of(tok).flags(NOTES, batch)
        assert (flags[1:] & flags[:-1]).any()  # a word of three pieces or more
        simple = group(batch, flags, LABELS, "simple", ignore_labels=())
        assert len(simple.score) < len(batch.ids)  # some groups of several tokens
        predicted = {LABELS[k] for k in batch.logits.argmax(1)}
        assert {"B-PER", "I-DRUG-DOSE", "AGE", "X-RAY", "O"} <= predicted, kind
    tok, _, parts = classifiers["wordpiece"]
    assert tok.token_to_id("[UNK]") in parts[0].ids[1:]
    assert Subwords.of(tok).lengths is not None
    assert Subwords.of(classifiers["bpe"][0]).lengths is None


# ---- exact small cases ------------------------------------------------------------------------
def tokens_at(starts: list[int], ends: list[int], counts: list[int], ids=None) -> NoteTokens:
    n = len(starts)
    return NoteTokens(ids=np.array(ids or [0] * n, np.int32), start=np.array(starts, np.int64),
                      end=np.array(ends, np.int64), logits=np.zeros((n, len(LABELS)), np.float32),
                      offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64))  # fmt: skip


def test_fallback_rule_looks_for_a_space_either_side_of_the_start():
    notes = ["ab  c\nd", "éé b", "x y"]
    starts = [0, 1, 4, 5, 6, 7, 1, 3, 0, 2]
    tokens = tokens_at(starts, [s + 1 for s in starts], [6, 2, 2])
    flags = Subwords(None, None).flags(notes, tokens)
    # "ab  c\nd": a | b | " c" | "c\n" | "\nd" (a newline is no space) | "d" at the note's end
    assert flags.tolist() == [False, True, False, True, True, True, True, False, False, False]


def test_prefix_rule_compares_token_and_text_lengths_and_spares_unk():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece({"[UNK]": 0, "ab": 1, "##c": 2, "c": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    enc = tok.encode("abc c ü")
    assert enc.tokens == ["ab", "##c", "c", "[UNK]"]
    offsets = np.array(enc.offsets)
    tokens = tokens_at(offsets[:, 0].tolist(), offsets[:, 1].tolist(), [4], enc.ids)
    subwords = Subwords.of(tok)
    assert subwords.unk_id == 0 and subwords.lengths.tolist() == [5, 2, 3, 1]
    assert subwords.flags(["abc c ü"], tokens).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="outside the tokenizer's vocab of 4"):
        subwords.flags(["abc c ü"], tokens_at([0], [1], [1], [9]))


def onehot(labels: list[str], sure: float = 4.0) -> np.ndarray:
    logits = np.zeros((len(labels), len(LABELS)), np.float32)
    logits[np.arange(len(labels)), [LABELS.index(x) for x in labels]] = sure
    return logits


def test_grouping_by_tag_and_names_by_split_in_two_notes():
    """B- starts a group; I- and non-BIO join the same tag; a note start always splits."""
    seq = ["B-PER", "I-PER", "B-PER", "AGE", "AGE", "X-RAY", "I-RAY", "O", "I-DRUG-DOSE", "I-PER"]
    tokens = tokens_at(list(range(0, 20, 2)), list(range(1, 21, 2)), [9, 1])
    tokens.logits = onehot(seq)
    found = group(tokens, np.zeros(10, bool), LABELS, "simple")
    assert found.offsets.tolist() == [0, 6, 7]
    spans = [(e["start"], e["end"], e["label"]) for i in range(2) for e in found.note(i)]
    assert spans == [(0, 3, "PER"), (4, 5, "PER"), (6, 9, "AGE"), (10, 11, "RAY"),
                     (12, 13, "RAY"), (16, 17, "DRUG-DOSE"), (18, 19, "PER")]  # fmt: skip
    assert found.names == ("O", "PER", "DRUG-DOSE", "AGE", "RAY")
    none = group(tokens, np.zeros(10, bool), LABELS, "none", min_score=0.0)
    assert [e["label"] for e in none.note(0)] == [x for x in seq[:9] if x != "O"]


def test_word_strategies_pick_first_surest_or_average():
    """One word of three tokens: B-PER (surest of token 0), then AGE and B-PER both at exactly
    1.0: first -> PER, max -> AGE (the first of equals), average -> PER."""
    logits = np.full((3, len(LABELS)), -100.0, np.float32)  # exp(-100) vanishes next to 1
    logits[0] = 0
    logits[0, LABELS.index("B-PER")], logits[0, LABELS.index("AGE")] = 3, 2
    logits[1, LABELS.index("AGE")] = logits[2, LABELS.index("B-PER")] = 0
    tokens = tokens_at([0, 2, 3], [2, 3, 5], [3])
    tokens.logits = logits
    sub = np.array([True, True, True])  # a note's first token starts a word all the same
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    want = {"first": ("PER", p[1]), "max": ("AGE", 1.0), "average": ("PER", (p[1] + 1) / 3)}
    for strategy, (label, score) in want.items():
        (entity,) = group(tokens, sub, LABELS, strategy).note(0)
        assert (entity["start"], entity["end"], entity["label"]) == (0, 5, label)
        assert entity["score"] == pytest.approx(score, abs=1e-6)


# ---- validation and empties -------------------------------------------------------------------
def test_bad_input_is_a_value_error_without_note_text():
    tokens = tokens_at([0, 2], [1, 3], [2])
    with pytest.raises(ValueError, match="none, simple, first, average, max"):
        group(tokens, np.zeros(2, bool), LABELS, "mean")
    with pytest.raises(ValueError, match=r"logits have 8 labels per token but labels name 3"):
        group(tokens, np.zeros(2, bool), LABELS[:3])
    with pytest.raises(ValueError, match="subword has 3 rows for 2 tokens"):
        group(tokens, np.zeros(3, bool), LABELS)
    with pytest.raises(ValueError) as e:
        Subwords(None, None).flags(["Pt Zoë", "HR 72"], tokens)
    assert str(e.value) == "2 notes given for tokens of 1 notes" and "Zoë" not in str(e.value)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_batches_and_notes_without_tokens(strategy):
    for counts in ([], [0, 0, 0]):
        tokens = tokens_at([], [], counts)
        flags = Subwords(None, None).flags([""] * len(counts), tokens)
        assert flags.shape == (0,)
        found = group(tokens, flags, LABELS, strategy)
        assert isinstance(found, Entities) and found.offsets.tolist() == [0] * (len(counts) + 1)
        assert [found.note(i) for i in range(len(counts))] == [[]] * len(counts)
    # a note between two empty ones keeps its place
    tokens = tokens_at([0, 2], [1, 3], [0, 2, 0])
    tokens.logits = onehot(["AGE", "I-PER"])
    found = group(tokens, np.zeros(2, bool), LABELS, strategy)
    assert found.offsets.tolist() == [0, 0, 2, 2] and len(found.note(1)) == 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_logits_do_not_crash(strategy):
    tokens = tokens_at([0, 2, 4], [1, 3, 5], [3])
    tokens.logits = onehot(["AGE", "AGE", "B-PER"])
    tokens.logits[1] = np.nan
    found = group(tokens, np.array([False, True, False]), LABELS, strategy)
    assert len(found.start) == len(found.score) == found.offsets[-1]
