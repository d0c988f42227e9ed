"""Advice end to end with the real operator and scripted trainers: a diverged trainer fails the job at once
as Diverged, and a finished job gets its diagnosis in status and as Events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.e2e.conftest import Jobs, fake_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _status(body: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = body.get("status") or {}
    return status


def test_diverged_trainer_fails_the_job_as_diverged_without_retries(jobs: Jobs, tmp_path: Path) -> None:
    jobs.create(fake_job("diverging", "finetune-test/exit-6", tmp_path, backoffLimit=3))
    failed = jobs.wait_condition("diverging", "Failed", "Diverged", timeout=90)
    status = _status(failed)
    assert status["phase"] == "Failed" and "exit code 6" in status["message"]
    assert "Diverged" in jobs.events("diverging")
    job = client.BatchV1Api(jobs.api).read_namespaced_job("diverging-trainer", jobs.namespace)
    assert (job.status.failed or 0) == 1, "a diverged run is not retried"


def test_early_stopped_job_gets_its_diagnosis(jobs: Jobs, tmp_path: Path) -> None:
    """The plateau trainer's best is at step 20 of 1000 planned: early stopping kept a very early best."""
    jobs.create(
        fake_job("diagnosed", "finetune-test/plateau:1", tmp_path, earlyStopping={"metric": "accuracy", "patience": 2})
    )
    done = jobs.wait_condition("diagnosed", "Complete", "EarlyStopped", timeout=90)
    diagnosis = _status(done)["diagnosis"]
    assert [d["code"] for d in diagnosis] == ["EarlyStoppedEarly"]
    assert "best at step 20 of 1000 planned" in diagnosis[0]["evidence"]
    jobs.wait("diagnosed", "the diagnosis event", lambda _: "EarlyStoppedEarly" in jobs.events("diagnosed"), timeout=30)
    assert jobs.events("diagnosed").count("EarlyStoppedEarly") == 1
