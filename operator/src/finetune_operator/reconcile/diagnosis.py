"""What the learning curves say: a short diagnosis of a run from its reported history. Pure.

Each rule reads only ``status`` (evaluations with the training loss at each, best, early stopping,
progress) and documented thresholds, and is tuned not to fire on ordinary evaluation noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final

from finetune_operator.api.job import Diagnosis, EvaluationRecord, FineTuneJob, FineTuneJobStatus

OVERFIT_EVALUATIONS: Final = 3
"""The last this many evaluations all clearly above the lowest validation loss (reached before them) mean
overfitting; a slow rise right after the minimum still counts."""
OVERFIT_RISE: Final = 0.05
""""Clearly above": a validation loss at least 5% over its minimum (smaller wiggles are noise)."""
MIN_EVALUATIONS: Final = 3
"""Curves shorter than this say nothing about their shape: no diagnosis reads them."""
BASELINE_MARGIN: Final = 0.01
"""Best accuracy within one point of the majority-class baseline is no better than always guessing it."""
UNDERFIT_DROP: Final = 0.05
"""Training loss that fell by less than 5% of its first value over the run barely moved."""
UNDERFIT_CHANCE_FRACTION: Final = 0.5
"""...and only while still above half the loss of uniform guessing, ln(classes) (a converged loss may stay flat)."""
EARLY_FRACTION: Final = 0.25
"""Early stopping that kept a best from the first quarter of the planned steps stopped early."""


def _losses(evaluations: Sequence[EvaluationRecord]) -> list[tuple[int, float, float | None]]:
    return [(e.step, e.metrics["loss"], e.train_loss) for e in evaluations if "loss" in e.metrics]


def _overfitting(job: FineTuneJob, status: FineTuneJobStatus) -> Diagnosis | None:
    curve = _losses(status.evaluations)
    if len(curve) < OVERFIT_EVALUATIONS + 1:
        return None
    low = min(range(len(curve)), key=lambda i: curve[i][1])
    after = curve[low + 1 :]
    step, minimum, train_at_min = curve[low]
    recent = curve[-OVERFIT_EVALUATIONS:]
    if len(after) < OVERFIT_EVALUATIONS or not all(v > minimum * (1 + OVERFIT_RISE) for _, v, _ in recent):
        return None
    last_step, last, train_last = after[-1]
    if train_at_min is None or train_last is None or train_last >= train_at_min:
        return None  # the training loss must still be falling: otherwise it is divergence or noise, not memorising
    return Diagnosis(
        code="Overfitting",
        severity="Warning",
        message=(
            f"validation loss rose for {len(after)} evaluations after step {step} while the training loss fell: "
            "the model memorises the training set; freeze more layers, raise weightDecay or dropout, "
            "or train fewer epochs"
        ),
        evidence=(
            f"validation loss {minimum:.4g} at step {step} -> {last:.4g} at step {last_step}; "
            f"training loss {train_at_min:.4g} -> {train_last:.4g}"
        ),
    )


def _best_at_first(job: FineTuneJob, status: FineTuneJobStatus) -> Diagnosis | None:
    evaluations, best = status.evaluations, status.best
    if best is None or len(evaluations) < MIN_EVALUATIONS or best.step != evaluations[0].step:
        return None
    return Diagnosis(
        code="BestAtFirstEvaluation",
        severity="Warning",
        message=(
            f"the best {best.metric} came at the first evaluation and never improved in {len(evaluations) - 1} more: "
            "lower hyperparameters.learningRate, or train fewer epochs"
        ),
        evidence=f"best {best.metric} {best.value:.4g} at step {best.step} of {evaluations[-1].step}",
    )


def _no_better_than_baseline(job: FineTuneJob, status: FineTuneJobStatus) -> Diagnosis | None:
    best = status.best
    baseline = best.majority_baseline if best is not None else None
    accuracies = [e.metrics["accuracy"] for e in status.evaluations if "accuracy" in e.metrics]
    if baseline is None or not accuracies or max(accuracies) > baseline + BASELINE_MARGIN:
        return None
    return Diagnosis(
        code="NoBetterThanBaseline",
        severity="Warning",
        message=(
            "the best accuracy is no better than always predicting the most frequent validation label: "
            "the model learned nothing useful; check the labels, unfreeze more layers or raise the learning rate"
        ),
        evidence=f"best accuracy {max(accuracies):.4g} vs majority-class baseline {baseline:.4g}",
    )


def _underfitting(job: FineTuneJob, status: FineTuneJobStatus) -> Diagnosis | None:
    train = [(e.step, e.train_loss) for e in status.evaluations if e.train_loss is not None]
    if len(train) < MIN_EVALUATIONS:
        return None
    (first_step, first), (last_step, last) = train[0], train[-1]
    lowest = min(v for _, v in train)
    if first <= 0 or (first - lowest) / first >= UNDERFIT_DROP:
        return None
    classes = job.spec.model.effective_num_labels
    if classes is not None and classes > 1 and last < UNDERFIT_CHANCE_FRACTION * math.log(classes):
        return None  # already low: converged before the first evaluation, not stuck
    return Diagnosis(
        code="Underfitting",
        severity="Warning",
        message=(
            "the training loss barely moved: the model is not learning the training set; raise "
            "hyperparameters.learningRate or unfreeze more layers"
        ),
        evidence=f"training loss {first:.4g} at step {first_step} -> {last:.4g} at step {last_step}",
    )


def _early_stopping(job: FineTuneJob, status: FineTuneJobStatus) -> Diagnosis | None:
    es, best = status.early_stopping, status.best
    if es is None or not es.triggered:
        return None
    total = status.progress.total_steps if status.progress is not None else None
    best_step = best.step if best is not None else es.best_step
    if total and best_step is not None and best_step <= EARLY_FRACTION * total:
        return Diagnosis(
            code="EarlyStoppedEarly",
            severity="Info",
            message=(
                f"early stopping kept a best from the first {EARLY_FRACTION:.0%} of the planned steps: the model "
                "learned quickly and then got worse; a lower learning rate may find a better optimum, "
                "or fewer epochs cost less"
            ),
            evidence=f"best at step {best_step} of {total} planned; stopped after {es.patience} evaluations without "
            f"improvement",
        )
    return Diagnosis(
        code="RanOutOfPatience",
        severity="Info",
        message=(
            f"{es.metric} stopped improving for {es.patience} evaluations and training stopped: the best model "
            "is from before the plateau; more epochs would not have helped"
        ),
        evidence=f"best {es.metric} {es.best_value} at step {best_step}; last evaluation at step {es.last_step}",
    )


RULES: Final[tuple[Callable[[FineTuneJob, FineTuneJobStatus], Diagnosis | None], ...]] = (
    _overfitting,
    _best_at_first,
    _no_better_than_baseline,
    _underfitting,
    _early_stopping,
)


LIVE: Final = (_overfitting,)
"""Rules that hold while the run goes on (the others judge a whole run): overfitting is worth knowing early."""


def diagnose(job: FineTuneJob, status: FineTuneJobStatus, finished: bool = True) -> list[Diagnosis]:
    """Every diagnosis the reported history supports, in a fixed order; only the live ones while running."""
    return [d for rule in (RULES if finished else LIVE) if (d := rule(job, status)) is not None]
