"""Classification metrics shared by federated (site) and centralised (server) evaluation."""

from __future__ import annotations

import numpy as np

from fedtl.shared import constants as k


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Return loss, accuracy, balanced accuracy, macro-F1 and (binary tasks) AUROC.

    Args:
        labels: int (N,) true classes.
        probs: float (N, C) predicted class probabilities.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    eps = 1e-12
    out = {
        k.LOSS: float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + eps))),
        k.ACCURACY: float(np.mean(preds == labels)),
        k.BALANCED_ACCURACY: balanced_accuracy(labels, preds),
        k.MACRO_F1: macro_f1(labels, preds, num_classes),
    }
    if num_classes == 2:
        # AUROC is undefined when the split holds one class only; report NaN rather than guess.
        out[k.AUROC] = _auroc(labels, probs[:, 1]) if len(np.unique(labels)) == 2 else float("nan")
    return out


# Balanced accuracy and macro-F1 in numpy, with scikit-learn's arithmetic (tests/test_metrics.py checks them equal
# to the last bit): every evaluation computes them, and scikit-learn costs a ClientApp process 1 s to import and
# its argument checks 3 ms a call.


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (sklearn's `balanced_accuracy_score`)."""
    classes, inverse = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    truth, guess = inverse[: len(labels)], inverse[len(labels) :]
    confusion = np.bincount(truth * len(classes) + guess, minlength=len(classes) ** 2).reshape(len(classes), -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = np.diagonal(confusion) / confusion.sum(axis=1)
    return float(np.mean(per_class[~np.isnan(per_class)]))  # classes only predicted have no recall


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over classes 0..C-1 of F1 = 2 tp / (true + predicted), 0 where both are 0."""
    tp = np.bincount(labels[labels == preds], minlength=num_classes)[:num_classes].astype(np.float64)
    true = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.float64)
    predicted = np.bincount(preds, minlength=num_classes)[:num_classes].astype(np.float64)
    denom = true + predicted
    f1 = 2 * tp / np.where(denom == 0, 1.0, denom)
    return float(np.nanmean(np.where(denom == 0, 0.0, f1)))


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC by scikit-learn (imported here: only binary tasks pay for it)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def majority_rate(labels: np.ndarray) -> float:
    """Return the accuracy of always predicting the most frequent class."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else float("nan")
