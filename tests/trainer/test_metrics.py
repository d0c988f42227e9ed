"""Evaluation figures checked against independent computations: the loss is the token (or example)
negative log-likelihood of the final weights, and the classification metrics match hand counts."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from finetune_trainer.metrics import classification_metrics
from finetune_trainer.spec import EarlyStopping, TrainingSpec
from tests.trainer import tiny
from tests.trainer.helpers import independent_nll, of, train


def test_causal_lm_eval_loss_is_the_token_nll_and_perplexity_its_exp(assets: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2 under transformers 5 (loss_type None) reported a mis-scaled loss from uneven padded batches."""
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["gpt2"],
        assets["text"],
        out,
        task="causal-lm",
        hyperparameters={"epochs": 1, "batchSize": 5, "evalBatchSize": 7},
        evaluation={"strategy": "epoch", "metrics": ["loss", "perplexity"]},
    )
    result, _ = train(wire)
    expected = independent_nll(out, wire, causal=True)
    assert result.metrics["loss"] == pytest.approx(expected, rel=1e-4)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert result.metrics["perplexity"] < len(tiny.VOCAB)  # better than uniform after one epoch


def test_label_smoothing_stays_out_of_the_evaluation_loss(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={"epochs": 1, "labelSmoothing": 0.4, "evalBatchSize": 7},
    )
    result, _ = train(wire)
    assert result.metrics["loss"] == pytest.approx(independent_nll(out, wire, causal=False), rel=1e-4)


def probs(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


ALL = ["loss", "accuracy", "f1", "f1_macro", "f1_weighted", "precision", "recall", "auroc", "top5_accuracy"]


def test_binary_metrics_are_those_of_the_positive_class() -> None:
    labels = [1, 1, 1, 1, 0, 0]
    # predicted class 1 for rows 0, 1, 2 and 5; 3 of the 4 positives score above both negatives
    p1 = [0.9, 0.8, 0.7, 0.3, 0.2, 0.6]
    compute = classification_metrics(ALL, 2)
    assert compute is not None
    got = compute(SimpleNamespace(predictions=probs([[1 - p, p] for p in p1]), label_ids=np.asarray(labels)))
    # class 1: TP 3, FP 1, FN 1; class 0: TP 1, FP 1, FN 1
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx(0.75)  # positive class, not the macro 0.625
    assert got["precision"] == pytest.approx(0.75) and got["recall"] == pytest.approx(0.75)
    assert got["f1_macro"] == pytest.approx((0.75 + 0.5) / 2)
    assert got["f1_weighted"] == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    # pairs (positive, negative) ranked right: 0.9, 0.8, 0.7 beat both; 0.3 beats 0.2 only
    assert got["auroc"] == pytest.approx(7 / 8)
    assert got["top5_accuracy"] == 1.0
    assert set(got) == set(ALL) - {"loss"}


def test_multiclass_metrics_are_macro_and_top5_counts_the_five_most_likely() -> None:
    n = 7
    rows, labels = [], []
    for true, ranking in ((0, [0, 1, 2, 3, 4, 5, 6]), (1, [0, 2, 3, 4, 5, 6, 1]), (2, [3, 4, 5, 6, 2, 0, 1])):
        row = [0.0] * n
        for place, cls in enumerate(ranking):
            row[cls] = (n - place) / 28  # 7/28 for the first ... 1/28 for the last
        rows.append(row)
        labels.append(true)
    compute = classification_metrics(["f1", "top5_accuracy", "accuracy"], n)
    assert compute is not None
    got = compute(SimpleNamespace(predictions=probs(rows), label_ids=np.asarray(labels)))
    assert got["accuracy"] == pytest.approx(1 / 3)
    assert got["top5_accuracy"] == pytest.approx(2 / 3)  # class 1 is ranked last in row 1
    # predictions 0, 0, 3: class 0 F1 = 2*1/(2+1+0) = 2/3; classes 1, 2 and 3 score 0; 4..6 appear nowhere
    assert got["f1"] == pytest.approx((2 / 3) / 4)


def test_metric_rules() -> None:
    base = tiny.spec(Path("/m"), Path("/d"), Path("/o"))
    with pytest.raises(ValidationError, match="auroc needs exactly 2 labels"):
        TrainingSpec.model_validate(
            {**base, "model": {**base["model"], "numLabels": 3}, "evaluation": {"metrics": ["auroc"]}}
        )
    lm = tiny.spec(Path("/m"), Path("/d"), Path("/o"), task="causal-lm")
    with pytest.raises(ValidationError, match="need a classification task"):
        TrainingSpec.model_validate({**lm, "evaluation": {"metrics": ["loss", "f1_weighted"]}})
    for metric in ALL:
        mode = EarlyStopping(metric=metric).effective_mode
        assert mode == ("min" if metric == "loss" else "max")


def test_early_stopping_on_any_classification_metric(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={"maxSteps": 8, "evalBatchSize": 16},
        evaluation={"strategy": "steps", "interval": 4, "metrics": ALL},
        earlyStopping={"metric": "auroc", "patience": 5},
    )
    result, events = train(wire)
    evaluations = of(events, "evaluation")
    assert [e["step"] for e in evaluations] == [4, 8]
    for evaluation in evaluations:
        assert set(evaluation["metrics"]) == set(ALL)
        assert all(0.0 <= v <= 1.0 for k, v in evaluation["metrics"].items() if k != "loss")
    assert result.best is not None and result.best["metric"] == "auroc"
