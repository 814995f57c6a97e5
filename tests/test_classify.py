"""Classifier heads' outputs without a model: what a config says the head predicts, scores,
labels, and long notes' windows aggregated (clinicalbert_core/classify.py)."""

from __future__ import annotations

import numpy as np
import pytest

from clinicalbert_core.classify import (
    SEQUENCE,
    TOKEN,
    TaskHead,
    aggregate_logits,
    predicted_labels,
    scores,
    task_head,
)


def test_the_head_kind_labels_and_scores_come_from_the_config_and_the_weights():
    huang = task_head({"model_type": "bert"}, 1)  # a config from before `architectures`
    assert huang == TaskHead(SEQUENCE, ("LABEL_0",), None) and huang.score == "sigmoid"
    icd = task_head({"architectures": ["BertForSequenceClassification"],
                     "problem_type": "multi_label_classification",
                     "id2label": {"1": "I50.9", "0": "E11.9", "2": "N18.3"}}, 3)  # fmt: skip
    assert icd.labels == ("E11.9", "I50.9", "N18.3") and icd.score == "sigmoid"
    ner = task_head({"architectures": ["ModernBertForTokenClassification"],
                     "id2label": {"0": "O", "1": "B-NAME", "2": "I-NAME"}}, 3)  # fmt: skip
    assert ner.kind == TOKEN and ner.score == "softmax" and "token classifier" in ner.describe()
    assert task_head({"problem_type": "regression"}, 1).score == "raw"
    assert task_head({"architectures": ["BertForMaskedLM"]}, None) is None


@pytest.mark.parametrize(
    ("raw", "rows", "says"),
    [
        ({"architectures": ["BertForSequenceClassification"]}, None, "the weights have none"),
        ({"num_labels": 3}, 2, "num_labels is 3, the classifier has 2 rows"),
        ({"id2label": {"0": "a", "2": "b"}}, 2, "with ids [0, 2]; the classifier has 2 rows"),
        ({"id2label": {"x": "a"}}, 1, "id2label keys must be label ids 0..0"),
        ({"id2label": ["a"]}, 1, "id2label must map label ids to names"),
        ({"problem_type": "ranking"}, 2, "problem_type 'ranking' is not one of"),
        (
            {"architectures": ["XForSequenceClassification", "XForTokenClassification"]},
            2,
            "both a sequence and a token classifier",
        ),
    ],
)
def test_a_config_that_contradicts_its_classifier_is_one_error_naming_it(raw, rows, says):
    with pytest.raises(ValueError, match="^cfg.json: ") as e:
        task_head(raw, rows, source="cfg.json")
    assert says in str(e.value)


def test_scores_and_labels():
    logits = np.array([[2.0, 0.0, -1.0], [-800.0, 800.0, 0.0]])
    soft = scores(logits, "softmax")
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    assert np.isfinite(scores(logits, "sigmoid")).all() and scores(logits, "raw")[1, 1] == 800
    single = TaskHead(SEQUENCE, ("a", "b", "c"), None)
    assert predicted_labels(soft, single) == [["a"], ["b"]]
    multi = TaskHead(SEQUENCE, ("a", "b", "c"), "multi_label_classification")
    assert predicted_labels(scores(logits, "sigmoid"), multi, threshold=0.5) == [
        ["a", "b"],
        ["b", "c"],
    ]
    one = TaskHead(SEQUENCE, ("readmitted",), None)
    assert predicted_labels(np.array([[0.7], [0.2]]), one) == [["readmitted"], []]
    assert predicted_labels(np.array([[3.1]]), TaskHead(SEQUENCE, ("los",), "regression")) == [[]]


def test_windows_aggregate_per_note_in_any_order():
    # note 0: windows 1, 0; note 1: one window (listed first)
    logits = np.array([[0.5, 1.5], [3.0, -1.0], [2.0, 0.0]])
    note, index = np.array([1, 0, 0]), np.array([0, 1, 0])
    mean, mean_scores = aggregate_logits(logits, note, index, 2, "mean", "softmax")
    np.testing.assert_allclose(mean, [[2.5, -0.5], [0.5, 1.5]])
    np.testing.assert_allclose(mean_scores, scores(mean, "softmax"), rtol=1e-6)
    first, _ = aggregate_logits(logits, note, index, 2, "first", "softmax")
    np.testing.assert_allclose(first, [[2.0, 0.0], [0.5, 1.5]])
    top, top_scores = aggregate_logits(logits, note, index, 2, "max", "sigmoid")
    np.testing.assert_allclose(top, [[3.0, 0.0], [0.5, 1.5]])
    np.testing.assert_allclose(top_scores, scores(top, "sigmoid"), rtol=1e-6)


def test_huang_is_the_papers_readmission_score_and_needs_one_logit():
    logits = np.array([[0.0], [2.0], [-1.0], [1.0]])  # note 0: 3 windows, note 1: 1 window
    note, index = np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0])
    logit, score = aggregate_logits(logits, note, index, 2, "huang", "sigmoid", c=2.0)
    p = 1 / (1 + np.exp(-logits[:, 0]))
    want0 = (p[:3].max() + p[:3].sum() / 2) / (1 + 3 / 2)
    want1 = (p[3] + p[3] / 2) / (1 + 1 / 2)  # one window: its own probability
    np.testing.assert_allclose(score[:, 0], [want0, want1], rtol=1e-6)
    np.testing.assert_allclose(scores(logit, "sigmoid"), score, rtol=1e-5)
    with pytest.raises(ValueError, match="'huang' needs a one-logit head"):
        aggregate_logits(np.zeros((2, 2)), note[:2], index[:2], 1, "huang", "softmax")
