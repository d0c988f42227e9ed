"""The majority-class baseline: the accuracy a model gets by always predicting the most frequent label.

The operator's diagnosis compares the best accuracy against it (``NoBetterThanBaseline``): 0.55 accuracy
on a 55/45 validation set means nothing was learned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any


def majority_baseline(labels: Iterable[Any]) -> float | None:
    """Fraction of the most frequent label; None for no labels."""
    counts = Counter(labels)
    total = sum(counts.values())
    return max(counts.values()) / total if total else None


def validation_baseline(validation: Any) -> float | None:
    """The baseline of a prepared classification validation set (its ``labels`` column, transforms bypassed)."""
    if validation is None or "labels" not in validation.column_names:
        return None
    return majority_baseline(validation.with_format(None)["labels"])
