"""A trainer that exits 6 (Diverged) fails the FineTuneJob with reason Diverged, its message, and no retry."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from finetune_operator.api.job import FineTuneJob
from finetune_operator.reconcile import Observed, ObservedJob, ObservedPod, Settings, decide, desired_children
from finetune_operator.reconcile.observe import observe_pod
from finetune_trainer import exitcodes
from tests.manifests import baseline

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LINE = "training diverged at step 30 (learning rate 3.96): the training loss is nan; lower hyperparameters.learningRate"


def _job() -> FineTuneJob:
    manifest = baseline("diverging")
    manifest["metadata"].update({"namespace": "ml", "uid": "uid-1", "generation": 1})
    return FineTuneJob.model_validate(manifest)


def test_exit_6_is_failed_diverged_with_the_trainers_line() -> None:
    pods = (
        ObservedPod("p1", "Failed", exit_code=exitcodes.DIVERGED.code, reason="Error", message=LINE, finished_at=NOW),
    )
    failed = ObservedJob(failed=1, failed_condition=True, failed_reason="PodFailurePolicy")
    decision = decide(_job(), Observed(job=failed, pods=pods), NOW)
    failed_condition = next(c for c in decision.status.conditions if c.type == "Failed")
    assert (failed_condition.status, failed_condition.reason) == ("True", "Diverged")
    assert "step 30" in failed_condition.message and "learning rate 3.96" in failed_condition.message
    assert decision.status.phase == "Failed"
    assert [e.reason for e in decision.events if e.type == "Warning"] == ["Diverged"]


def test_the_job_fails_at_once_on_exit_6() -> None:
    job = next(c for c in desired_children(_job(), Settings()) if c["kind"] == "Job")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail_job = [r for r in rules if r["action"] == "FailJob"]
    assert any(exitcodes.DIVERGED.code in r["onExitCodes"]["values"] for r in fail_job)


def _pod_with_termination_message(message: str) -> dict[str, object]:
    terminated = {"exitCode": 6, "reason": "Error", "message": message, "finishedAt": "2026-11-23T12:00:00Z"}
    return {
        "metadata": {"name": "p1"},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]},
    }


def test_the_message_is_the_trainers_line_not_its_log_tail() -> None:
    """FallbackToLogsOnError hands over the log's last lines (progress JSON, stderr); status shows the one line."""
    tail = "\n".join(
        [
            json.dumps({"event": "evaluation", "step": 28, "metrics": {"loss": 11.7}}),
            json.dumps({"event": "diverged", "step": 30, "learningRate": 3.96, "message": "the training loss is nan"}),
            f"finetune-trainer: error: {LINE}",
            json.dumps({"event": "error", "reason": "Diverged", "message": LINE, "exitCode": 6}),
        ]
    )
    pod = observe_pod(_pod_with_termination_message(tail))
    assert pod.message == LINE
    failed = ObservedJob(failed=1, failed_condition=True, failed_reason="PodFailurePolicy")
    decision = decide(_job(), Observed(job=failed, pods=(pod,)), NOW)
    assert decision.status.message == LINE


def test_a_tail_without_the_trainers_line_is_kept() -> None:
    """A crash before the trainer could say why (or a runtime's own words): the last 2000 characters."""
    tail = "Traceback (most recent call last):\n" + "x" * 3000 + "\nRuntimeError: boom {not json"
    assert observe_pod(_pod_with_termination_message(tail)).message == tail[-2000:]
