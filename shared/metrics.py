"""Classification metrics shared by federated (site) and centralised (server) evaluation."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

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
        k.BALANCED_ACCURACY: float(balanced_accuracy_score(labels, preds)),
        k.MACRO_F1: float(f1_score(labels, preds, average="macro", labels=np.arange(num_classes), zero_division=0)),
    }
    if num_classes == 2:
        # AUROC is undefined when the split holds one class only; report NaN rather than guess.
        out[k.AUROC] = float(roc_auc_score(labels, probs[:, 1])) if len(np.unique(labels)) == 2 else float("nan")
    return out


def majority_rate(labels: np.ndarray) -> float:
    """Return the accuracy of always predicting the most frequent class."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else float("nan")
