"""The diagnosis of a run from hand-made histories: each finding fires on its shape and not on noise."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from finetune_cli.render import describe, parse_job
from finetune_operator.api.job import (
    BestResult,
    EarlyStoppingStatus,
    EvaluationRecord,
    FineTuneJob,
    FineTuneJobStatus,
    Progress,
)
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.reconcile import Observed, ObservedJob, decide
from finetune_operator.reconcile.diagnosis import diagnose
from finetune_operator.reconcile.observe import status_patch
from tests.cli.jobs import job as job_manifest
from tests.manifests import baseline

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def job(status: FineTuneJobStatus | None = None) -> FineTuneJob:
    manifest = baseline("diag")
    manifest["metadata"].update({"namespace": "ml", "uid": "uid-1", "generation": 1})
    j = FineTuneJob.model_validate(manifest)
    if status is not None:
        j.status = status
    return j


def history(
    eval_loss: list[float],
    train_loss: list[float] | None = None,
    accuracy: list[float] | None = None,
    every: int = 10,
) -> list[EvaluationRecord]:
    records = []
    for i, loss in enumerate(eval_loss):
        metrics = {"loss": loss}
        if accuracy is not None:
            metrics["accuracy"] = accuracy[i]
        records.append(
            EvaluationRecord(
                step=(i + 1) * every, metrics=metrics, train_loss=train_loss[i] if train_loss is not None else None
            )
        )
    return records


def status_of(records: list[EvaluationRecord], metric: str = "loss", **extra: object) -> FineTuneJobStatus:
    values = [r.metrics[metric] for r in records]
    pick = min if metric == "loss" else max
    best_i = values.index(pick(values))
    best = BestResult(metric=metric, value=values[best_i], step=records[best_i].step)
    return FineTuneJobStatus(evaluations=records, best=best, **extra)  # type: ignore[arg-type]


def codes(status: FineTuneJobStatus) -> list[str]:
    return [d.code for d in diagnose(job(), status)]


FALLING_TRAIN = [0.65, 0.5, 0.4, 0.3, 0.2, 0.1]


def test_overfitting_eval_loss_rises_while_training_loss_falls() -> None:
    status = status_of(history([0.6, 0.5, 0.55, 0.6, 0.7, 0.8], FALLING_TRAIN))
    found = {d.code: d for d in diagnose(job(), status)}
    assert "Overfitting" in found
    assert found["Overfitting"].severity == "Warning"
    assert "0.5 at step 20 -> 0.8 at step 60" in found["Overfitting"].evidence
    assert "freeze more layers" in found["Overfitting"].message


def test_a_slow_rise_right_after_the_minimum_is_still_overfitting() -> None:
    """Seen on a real run memorising noise: the first evaluations after the minimum are barely above it."""
    status = status_of(history([0.694, 0.699, 0.700, 0.75, 0.88, 1.1], FALLING_TRAIN))
    assert "Overfitting" in codes(status)


@pytest.mark.parametrize(
    "eval_loss",
    [
        [0.6, 0.5, 0.51, 0.505, 0.515, 0.51],  # noise within 5% of the minimum
        [0.6, 0.5, 0.55, 0.49, 0.56, 0.6],  # a new minimum late: still learning
        [0.6, 0.5, 0.45, 0.44, 0.6, 0.7],  # rising, but only for two evaluations
        [0.6, 0.55, 0.7, 0.52, 0.6, 0.58],  # jagged: one evaluation after the minimum dips near it
    ],
    ids=["flat-noise", "late-minimum", "two-rises", "jagged"],
)
def test_noisy_validation_loss_is_not_overfitting(eval_loss: list[float]) -> None:
    assert "Overfitting" not in codes(status_of(history(eval_loss, FALLING_TRAIN)))


def test_rising_eval_loss_with_rising_training_loss_is_not_overfitting() -> None:
    assert "Overfitting" not in codes(status_of(history([0.6, 0.5, 0.6, 0.7, 0.8], [0.6, 0.5, 0.6, 0.7, 0.8])))


def test_overfitting_needs_the_training_loss() -> None:
    assert "Overfitting" not in codes(status_of(history([0.6, 0.5, 0.55, 0.6, 0.7, 0.8])))


def test_best_at_first_evaluation() -> None:
    status = status_of(history([0.4, 0.5, 0.55, 0.6], FALLING_TRAIN[:4]))
    assert "BestAtFirstEvaluation" in codes(status)
    assert "BestAtFirstEvaluation" not in codes(status_of(history([0.5, 0.4, 0.45, 0.6], FALLING_TRAIN[:4])))
    assert "BestAtFirstEvaluation" not in codes(status_of(history([0.4, 0.5], FALLING_TRAIN[:2])))  # too short


def test_no_better_than_baseline() -> None:
    records = history([0.69, 0.69, 0.69], FALLING_TRAIN[:3], accuracy=[0.55, 0.555, 0.55])
    status = status_of(records, metric="accuracy")
    assert status.best is not None
    status.best.majority_baseline = 0.55
    found = {d.code: d for d in diagnose(job(), status)}
    assert (
        "NoBetterThanBaseline" in found
        and "0.555 vs majority-class baseline 0.55" in found["NoBetterThanBaseline"].evidence
    )
    status.evaluations[1].metrics["accuracy"] = 0.7
    assert "NoBetterThanBaseline" not in codes(status)
    status.best.majority_baseline = None  # not reported (e.g. causal-lm): nothing to compare
    status.evaluations[1].metrics["accuracy"] = 0.55
    assert "NoBetterThanBaseline" not in codes(status)


def test_underfitting_training_loss_barely_moved() -> None:
    flat = [0.693, 0.69, 0.692, 0.689]
    assert "Underfitting" in codes(status_of(history([0.7, 0.69, 0.695, 0.69], flat)))
    noisy_but_learning = [0.69, 0.6, 0.66, 0.5]
    assert "Underfitting" not in codes(status_of(history([0.7, 0.6, 0.62, 0.5], noisy_but_learning)))
    converged = [0.02, 0.019, 0.021, 0.02]  # flat because it learned before the first evaluation
    assert "Underfitting" not in codes(status_of(history([0.1, 0.1, 0.1, 0.1], converged)))


def _stopped(best_step: int, total: int) -> FineTuneJobStatus:
    records = history([0.6, 0.5, 0.55, 0.56, 0.57], FALLING_TRAIN[:5])
    status = status_of(records)
    status.early_stopping = EarlyStoppingStatus(
        metric="loss", mode="min", patience=3, best_value=0.5, best_step=best_step, triggered=True, last_step=50
    )
    status.progress = Progress(step=50, total_steps=total)
    assert status.best is not None
    status.best.step = best_step
    return status


def test_early_stopped_early_or_out_of_patience() -> None:
    assert "EarlyStoppedEarly" in codes(_stopped(best_step=20, total=200))
    late = codes(_stopped(best_step=20, total=60))
    assert "RanOutOfPatience" in late and "EarlyStoppedEarly" not in late
    not_triggered = _stopped(best_step=20, total=200)
    assert not_triggered.early_stopping is not None
    not_triggered.early_stopping.triggered = False
    assert not ({"EarlyStoppedEarly", "RanOutOfPatience"} & set(codes(not_triggered)))


def test_a_healthy_run_gets_no_warning() -> None:
    status = status_of(history([0.6, 0.5, 0.45, 0.42, 0.41, 0.405], FALLING_TRAIN))
    assert [d for d in diagnose(job(), status) if d.severity == "Warning"] == []


def test_decide_writes_the_diagnosis_and_emits_each_event_once() -> None:
    status = status_of(history([0.6, 0.5, 0.55, 0.6, 0.7, 0.8], FALLING_TRAIN))
    done = ObservedJob(succeeded=1, complete=True, completion_time=NOW)
    first = decide(job(status), Observed(job=done), NOW)
    assert [d.code for d in first.status.diagnosis] == ["Overfitting"]
    assert [e.reason for e in first.events if e.reason == "Overfitting"] == ["Overfitting"]
    assert status_patch(status, first.status)["diagnosis"][0]["code"] == "Overfitting"  # the operator writes it
    again = decide(job(first.status), Observed(job=done), NOW)
    assert again.status.diagnosis == first.status.diagnosis
    assert [e for e in again.events if e.reason == "Overfitting"] == []


def test_diagnosis_gauge_follows_the_status_and_goes_with_the_job() -> None:
    metrics = OperatorMetrics()
    status = status_of(history([0.6, 0.5, 0.55, 0.6, 0.7, 0.8], FALLING_TRAIN))
    status.diagnosis = diagnose(job(), status)
    metrics.observe_job("ml", "diag", status)

    def value() -> float | None:
        return metrics.registry.get_sample_value(
            "finetune_job_diagnosis", {"namespace": "ml", "name": "diag", "code": "Overfitting"}
        )

    assert value() == 1.0
    status.diagnosis = []
    metrics.observe_job("ml", "diag", status)
    assert value() is None
    assert metrics._diagnosis_codes == {}, "a job with no finding holds no codes"
    status.diagnosis = diagnose(job(), status_of(history([0.6, 0.5, 0.55, 0.6, 0.7, 0.8], FALLING_TRAIN)))
    metrics.observe_job("ml", "diag", status)
    metrics.forget_job("ml", "diag")
    assert value() is None


def test_describe_shows_the_diagnosis_the_training_loss_and_the_baseline() -> None:
    status = status_of(history([0.6, 0.5, 0.55, 0.6, 0.7, 0.8], FALLING_TRAIN))
    assert status.best is not None
    status.best.majority_baseline = 0.55
    status.diagnosis = diagnose(job(), status)
    text = describe(parse_job(job_manifest(status=status.to_wire())), NOW)
    assert "Diagnosis:\n  Warning Overfitting: validation loss rose for 4 evaluations" in text
    assert "evidence: validation loss 0.5 at step 20 -> 0.8 at step 60" in text
    assert "TRAIN LOSS" in text and "majority-class baseline accuracy 0.55" in text


def test_overfitting_is_reported_while_the_run_goes_on_and_not_repeated_at_the_end() -> None:
    status = status_of(history([0.4, 0.5, 0.55, 0.6], FALLING_TRAIN[:4]))  # also best at the first evaluation
    running = ObservedJob(active=1, ready=1, start_time=NOW)
    live = decide(job(status), Observed(job=running), NOW)
    assert [d.code for d in live.status.diagnosis] == ["Overfitting"]  # whole-run judgements wait for the end
    assert [e.reason for e in live.events if e.reason == "Overfitting"] == ["Overfitting"]
    done = decide(job(live.status), Observed(job=ObservedJob(succeeded=1, complete=True, completion_time=NOW)), NOW)
    assert [d.code for d in done.status.diagnosis] == ["Overfitting", "BestAtFirstEvaluation"]
    assert [e.reason for e in done.events if e.reason in ("Overfitting", "BestAtFirstEvaluation")] == [
        "BestAtFirstEvaluation"
    ]
