"""The whole product: operator + the real trainer, training a tiny model from volumes.

Model, data and output live on PersistentVolumeClaims (the local node backs them with host
directories and mounts them at /mnt/pvc/<claim>, as the operator asks), so the pvc:// path of
a real cluster is the one exercised here.
"""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client

from finetune_operator.reconcile.children import Names
from finetune_trainer.manifest import verify
from tests.e2e.conftest import Jobs, RealNamespace, real_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _exists(jobs: Jobs, name: str) -> bool:
    try:
        jobs.get(name)
    except client.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


OVERFIT = real_job(
    "overfit",
    dataset={"source": "pvc://datasets/noisy"},
    freeze={"strategy": "none", "layers": None},
    hyperparameters={"learningRate": 5e-3, "epochs": 20},
    evaluation={"strategy": "steps", "interval": 4},
    earlyStopping={"metric": "loss", "patience": 2},
)


def _wait_for_log(jobs: Jobs, name: str, text: str, timeout: float) -> None:
    """Until the log of job ``name``'s trainer pod holds ``text``."""
    core = client.CoreV1Api(jobs.api)
    selector = f"batch.kubernetes.io/job-name={Names.of(name).job}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in core.list_namespaced_pod(jobs.namespace, label_selector=selector).items:
            try:
                if text in core.read_namespaced_pod_log(pod.metadata.name, jobs.namespace):
                    return
            except client.ApiException:
                pass  # not started yet
        time.sleep(0.5)
    raise AssertionError(f"the trainer of {name} never logged {text!r}")


@pytest.fixture(scope="module")
def started(real_namespace: RealNamespace) -> RealNamespace:
    """Both jobs of this module, created at once (see ``real_namespace``).

    ``overfit`` meets someone else's Role under its trainer Role's name. Its Job starts anyway (its pods need
    no RBAC) and its real trainer, in its pod, waits for the rights to report; once that Role is gone, the
    operator's resync makes the job's own Role and RoleBinding, and ``overfit``'s test shows that every
    report (evaluations, early stopping, best checkpoint) still arrived."""
    jobs = real_namespace.jobs
    rbac = client.RbacAuthorizationV1Api(jobs.api)
    foreign = Names.of("overfit").role
    rbac.create_namespaced_role(jobs.namespace, {"metadata": {"name": foreign}, "rules": []})
    jobs.create(real_job("tiny"))
    jobs.create(OVERFIT)
    _wait_for_log(jobs, "overfit", "waiting for the rights to report", timeout=180)
    rbac.delete_namespaced_role(foreign, jobs.namespace)
    return real_namespace


def test_real_trainer_reports_progress_and_completes(started: RealNamespace) -> None:
    jobs, volumes = started.jobs, started.volumes
    running = jobs.wait_condition("tiny", "Running", timeout=120)
    assert running["status"]["workload"]["job"] == "tiny-trainer"
    done = jobs.wait_condition("tiny", "Complete", "Succeeded", timeout=300)
    status = done["status"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 16
    assert status["progress"]["percent"] == 100
    assert [e["step"] for e in status["evaluations"]] == [8, 16]
    assert {"loss", "accuracy"} <= set(status["evaluations"][-1]["metrics"])
    assert status["best"]["checkpoint"].startswith("pvc://outputs/tiny/checkpoints/checkpoint-")
    result = json.loads((volumes / "tiny" / "result.json").read_text())
    assert result["reason"] == "Succeeded"
    assert (volumes / "tiny" / "model" / "config.json").exists()
    # What the trainer published, through the API server and the status policy, named by the manifest on disk.
    (artifact,) = status["artifacts"]
    assert (artifact["uri"], artifact["kind"], artifact["dtype"]) == ("pvc://outputs/tiny/model", "model", "fp32")
    assert artifact["sha256"] == verify(volumes / "tiny" / "model").sha256
    assert artifact["baseModel"]["revision"].startswith("sha256:")

    # Re-run from Git: delete, wait for the old children to go, apply the same manifest (same output
    # location, new uid). It must train again, not resume (or instantly "finish") the old run.
    jobs.delete("tiny")
    deadline = time.monotonic() + 120
    while any(jobs.children("tiny").values()) or _exists(jobs, "tiny"):
        assert time.monotonic() < deadline, f"the deleted job's children linger: {jobs.children('tiny')}"
        time.sleep(0.5)
    before = (volumes / "tiny" / "result.json").stat().st_mtime
    jobs.create(real_job("tiny"))
    again = jobs.wait_condition("tiny", "Complete", "Succeeded", timeout=300)["status"]
    assert [e["step"] for e in again["evaluations"]] == [8, 16], "the new job trained and evaluated"
    assert (volumes / "tiny" / "result.json").stat().st_mtime > before
    assert (volumes / "tiny" / "model" / "config.json").exists()


def test_real_trainer_early_stops_with_the_best_checkpoint(started: RealNamespace) -> None:
    jobs, volumes = started.jobs, started.volumes
    done = jobs.wait_condition("overfit", "Complete", "EarlyStopped", timeout=300)
    status = done["status"]
    early = status["earlyStopping"]
    assert early["triggered"] and early["evaluationsWithoutImprovement"] == 2
    assert status["progress"]["step"] < status["progress"]["totalSteps"], "stopped before the planned end"
    best = status["best"]
    assert best["step"] == early["bestStep"]
    checkpoint = volumes / best["checkpoint"].removeprefix("pvc://outputs/")
    assert checkpoint.is_dir(), f"best checkpoint {best['checkpoint']} was not kept"
    assert json.loads((volumes / "overfit" / "result.json").read_text())["reason"] == "EarlyStopped"
