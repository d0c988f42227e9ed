"""Operator metrics that count transitions: each is counted once, a resume is no new start."""

from __future__ import annotations

from finetune_operator.api import FineTuneJobStatus
from finetune_operator.metrics import OperatorMetrics


def _count(metrics: OperatorMetrics) -> float:
    value = metrics.registry.get_sample_value("finetune_time_to_running_seconds_count")
    return value or 0.0


def test_time_to_running_is_observed_once_not_on_every_resume() -> None:
    metrics = OperatorMetrics()
    running = FineTuneJobStatus(phase="Running")
    metrics.record_transitions(["TrainerRunning"], running, 30.0, first_run=True)
    metrics.record_transitions(["TrainerRunning"], running, 3600.0, first_run=False)  # resumed an hour later
    assert _count(metrics) == 1
