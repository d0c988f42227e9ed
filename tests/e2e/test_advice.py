"""Advice end to end with the real operator: a diverged trainer fails the job at once as Diverged, and a finished
job gets its diagnosis in status, as Events and in `kubectl finetune describe`; first with scripted trainers, then
with the real trainer diverging and overfitting a tiny model on purpose."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_testsupport.pytest_plugin import LocalCluster
from tests.cli.plugin import kubectl_finetune
from tests.e2e.conftest import Jobs, RealNamespace, fake_job, real_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _status(body: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = body.get("status") or {}
    return status


def test_diverged_trainer_fails_the_job_as_diverged_without_retries(jobs: Jobs, tmp_path: Path) -> None:
    jobs.create(fake_job("diverging", "finetune-test/exit-6", tmp_path, backoffLimit=3))
    failed = jobs.wait_condition("diverging", "Failed", "Diverged", timeout=90)
    status = _status(failed)
    assert status["phase"] == "Failed" and "exit code 6" in status["message"]
    jobs.wait_event("diverging", "Diverged")
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


@pytest.fixture(scope="module")
def started(real_namespace: RealNamespace) -> RealNamespace:
    """Both real-trainer jobs of this module, created at once (see ``real_namespace``)."""
    # The example, tiny: full fine-tuning at learning rate 10 explodes. Short (64 rows, batch 16, 2 epochs:
    # 8 steps, the training loss logged at step 1 only): judged on the loss of every step and of the first evaluation.
    absurd = real_job(
        "absurd",
        freeze={"strategy": "none", "layers": None},
        hyperparameters={"learningRate": 10, "batchSize": 16, "epochs": 2, "seed": 0},
        backoffLimit=3,
    )
    # 16 randomly labelled texts, 8 epochs at a constant high learning rate, seeded: the training loss falls
    # while the validation loss (on a disjoint split) rises.
    memorise = real_job(
        "memorise",
        dataset={"source": "pvc://datasets/memorise"},
        freeze={"strategy": "none", "layers": None},
        hyperparameters={"learningRate": 5e-3, "scheduler": "constant", "batchSize": 4, "epochs": 8, "seed": 0},
        output={"keepCheckpoints": 1},
    )
    for manifest in (absurd, memorise):
        real_namespace.jobs.create(manifest)
    return real_namespace


def test_real_trainer_at_an_absurd_learning_rate_fails_diverged_once(started: RealNamespace) -> None:
    """Learning rate 10 explodes: the job fails Diverged by its first evaluation (step 4), with one pod, no retry,
    one line naming the step and the rate."""
    jobs, volumes = started.jobs, started.volumes
    failed = jobs.wait_condition("absurd", "Failed", "Diverged", timeout=300)
    message = _status(failed)["message"]
    assert "\n" not in message, message
    rate = r"\(learning rate [\d.e-]+ on the schedule from hyperparameters.learningRate 10\)"
    assert re.fullmatch(rf"training diverged at step 4 {rate}: .+; lower hyperparameters.learningRate", message), (
        message
    )
    pods = client.CoreV1Api(jobs.api).list_namespaced_pod(jobs.namespace, label_selector="finetune.dev/job=absurd")
    assert len(pods.items) == 1, "a diverged run is not retried"
    job = client.BatchV1Api(jobs.api).read_namespaced_job("absurd-trainer", jobs.namespace)
    assert (job.status.failed or 0) == 1
    assert not (volumes / "absurd" / "model").exists(), "a diverged model is never published"


def test_real_trainer_memorising_noise_is_diagnosed_overfitting(
    local_cluster: LocalCluster, started: RealNamespace
) -> None:
    """Memorising noise: `kubectl finetune describe` tells the user the run overfitted."""
    jobs = started.jobs
    done = jobs.wait_condition("memorise", "Complete", "Succeeded", timeout=300)
    status = _status(done)
    curve = [(e["metrics"]["loss"], e.get("trainLoss")) for e in status["evaluations"]]
    assert "Overfitting" in [d["code"] for d in status.get("diagnosis", [])], curve
    jobs.wait("memorise", "the diagnosis event", lambda _: "Overfitting" in jobs.events("memorise"), timeout=30)

    described = kubectl_finetune(local_cluster, "describe", "memorise", "-n", jobs.namespace)
    assert described.returncode == 0, described.stderr
    diagnosis = described.stdout.split("Diagnosis:\n", 1)[-1]
    assert "Warning Overfitting: validation loss rose" in diagnosis, described.stdout
