"""Classification metrics from scikit-learn, computed from the class probabilities of the evaluation set."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm

from finetune_trainer.spec import CLASSIFICATION_METRICS

POSITIVE_LABEL = 1
"""With two labels, f1, precision and recall are those of this class (the usual detection setting)."""


def probabilities(logits: Any, labels: Any) -> torch.Tensor:
    """Keep class probabilities (batch x classes) during evaluation: argmax and top-k come from them."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return torch.as_tensor(logits).float().softmax(dim=-1)


def classification_metrics(wanted: Collection[str], num_labels: int) -> Callable[[Any], dict[str, float]] | None:
    """A ``compute_metrics`` for the Trainer computing the ``wanted`` classification metrics (None if none)."""
    names = [m for m in CLASSIFICATION_METRICS if m in wanted]
    if not names:
        return None
    classes = list(range(num_labels))
    average = "binary" if num_labels == 2 else "macro"

    def compute(eval_pred: Any) -> dict[str, float]:
        probs = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, num_labels)
        labels = np.asarray(eval_pred.label_ids).reshape(-1)
        if labels.size == 0:
            return {}
        predicted = probs.argmax(axis=-1)
        common: dict[str, Any] = {"zero_division": 0}  # averaged over the classes present in labels or predictions
        chosen: dict[str, Any] = {**common, "average": average}
        if average == "binary":
            chosen["pos_label"] = POSITIVE_LABEL
        scores: dict[str, Callable[[], float]] = {
            "accuracy": lambda: skm.accuracy_score(labels, predicted),
            "f1": lambda: skm.f1_score(labels, predicted, **chosen),
            "f1_macro": lambda: skm.f1_score(labels, predicted, average="macro", **common),
            "f1_weighted": lambda: skm.f1_score(labels, predicted, average="weighted", **common),
            "precision": lambda: skm.precision_score(labels, predicted, **chosen),
            "recall": lambda: skm.recall_score(labels, predicted, **chosen),
            "auroc": lambda: _auroc(labels, probs),
            "top5_accuracy": lambda: _top_k(labels, probs, 5, classes),
        }
        return {name: float(scores[name]()) for name in names}

    return compute


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """NaN (left out of the reported metrics) when the evaluation set holds a single class."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(skm.roc_auc_score(labels, probs[:, POSITIVE_LABEL]))


def _top_k(labels: np.ndarray, probs: np.ndarray, k: int, classes: list[int]) -> float:
    if k >= len(classes):
        return 1.0  # every class is among the k most likely
    return float(skm.top_k_accuracy_score(labels, probs, k=k, labels=classes))
