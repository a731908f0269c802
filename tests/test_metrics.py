"""Tests of fedtl.shared.metrics: balanced accuracy and macro-F1 equal scikit-learn's to the last bit."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from fedtl.shared import constants as k
from fedtl.shared.metrics import balanced_accuracy, classification_metrics, macro_f1


def _cases():
    rng = np.random.default_rng(3)
    for _ in range(40):
        c = int(rng.integers(2, 12))
        n = int(rng.integers(1, 300))
        labels = rng.integers(0, c, n)
        preds = np.where(rng.random(n) < rng.random(), labels, rng.integers(0, c, n))
        yield labels, preds, c
    yield np.array([0, 0, 0]), np.array([1, 2, 0]), 3  # predictions of classes absent from the labels
    yield np.array([1, 1]), np.array([1, 1]), 4  # classes neither true nor predicted: F1 0 for them


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_macro_f1_equal_scikit_learns_bit_for_bit():
    for labels, preds, c in _cases():
        assert balanced_accuracy(labels, preds) == balanced_accuracy_score(labels, preds)
        expected = f1_score(labels, preds, average="macro", labels=np.arange(c), zero_division=0)
        assert macro_f1(labels, preds, c) == expected


def test_classification_metrics_on_a_known_case():
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9]])
    out = classification_metrics(labels, probs)
    assert out[k.ACCURACY] == pytest.approx(3 / 5)
    assert out[k.BALANCED_ACCURACY] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out[k.MACRO_F1] == pytest.approx((2 / 4 + 4 / 6) / 2)  # F1 = 2 tp / (true + predicted): 2/(2+2), 4/(3+3)
    assert out[k.AUROC] == roc_auc_score(labels, probs[:, 1])
    assert np.isnan(classification_metrics(np.array([1, 1]), probs[:2])[k.AUROC])  # one class: undefined
