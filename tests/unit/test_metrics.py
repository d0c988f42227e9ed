"""Operator metrics that count transitions: each is counted once, a resume is no new start."""

from __future__ import annotations

from finetune_operator.api.job import FineTuneJobStatus
from finetune_operator.api.sweep import BestTrial, FineTuneSweepStatus, TrialCounts
from finetune_operator.controller.metrics import EVALUATION_METRICS, OperatorMetrics


def _count(metrics: OperatorMetrics) -> float:
    value = metrics.registry.get_sample_value("finetune_time_to_running_seconds_count")
    return value or 0.0


def test_time_to_running_is_observed_once_not_on_every_resume() -> None:
    metrics = OperatorMetrics()
    running = FineTuneJobStatus(phase="Running")
    metrics.record_transitions(["TrainerRunning"], running, 30.0, first_run=True)
    metrics.record_transitions(["TrainerRunning"], running, 3600.0, first_run=False)  # resumed an hour later
    assert _count(metrics) == 1


def test_sweep_series_follow_the_sweep_and_go_with_it() -> None:
    metrics = OperatorMetrics()
    status = FineTuneSweepStatus(
        trial_counts=TrialCounts(total=5, running=1, succeeded=2, pruned=1, failed=1),
        best_trial=BestTrial(name="s-t001", value=0.91),
    )
    metrics.observe_sweep("ns", "s", "accuracy", status)
    sample = metrics.registry.get_sample_value
    assert sample("finetune_sweep_trials", {"namespace": "ns", "name": "s", "state": "pruned"}) == 1
    assert sample("finetune_sweep_trials", {"namespace": "ns", "name": "s", "state": "succeeded"}) == 2
    assert sample("finetune_sweep_best_value", {"namespace": "ns", "name": "s", "metric": "accuracy"}) == 0.91
    metrics.forget_sweep("ns", "s")
    assert sample("finetune_sweep_trials", {"namespace": "ns", "name": "s", "state": "pruned"}) is None
    assert sample("finetune_sweep_best_value", {"namespace": "ns", "name": "s", "metric": "accuracy"}) is None


def test_trainer_written_metric_names_cannot_grow_the_operators_series() -> None:
    """Names in status.evaluations and status.best are the trainer's: only the spec's vocabulary
    becomes a label value, however many writes invent new names (on main: one series per name)."""
    metrics = OperatorMetrics()
    for write in range(200):
        status = FineTuneJobStatus.model_validate(
            {
                "evaluations": [{"step": write, "metrics": {"loss": 0.5, f"invented-{write}": 1.0}}],
                "best": {"metric": f"bogus-{write}", "value": 0.1, "step": write},
            }
        )
        metrics.observe_job("ns", "job", status)
    for family in ("finetune_job_eval_metric", "finetune_job_best_metric"):
        labels = {s.labels["metric"] for f in metrics.registry.collect() if f.name == family for s in f.samples}
        assert labels <= EVALUATION_METRICS, f"{family}: {sorted(labels)[:5]}"
    assert (
        metrics.registry.get_sample_value(
            "finetune_job_eval_metric", {"namespace": "ns", "name": "job", "metric": "loss"}
        )
        == 0.5
    )
