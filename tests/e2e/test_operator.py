"""The operator (a real kopf process) on the real local control plane, with scripted trainers.

The fake trainers (fake_trainer.py) speak only the status contract, like a third-party
trainer image, so these tests pin down what the operator guarantees on its own: early
stopping enforced on a trainer that ignores it, permanent errors not retried, crashes
retried, nothing lost or duplicated across an operator kill -9, cascading deletion, metrics.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_testsupport.pytest_plugin import LocalCluster
from tests.e2e.conftest import Jobs, Operator, fake_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _status(body: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = body.get("status") or {}
    return status


def _job(jobs: Jobs, name: str) -> client.V1Job:
    return client.BatchV1Api(jobs.api).read_namespaced_job(f"{name}-trainer", jobs.namespace)


@dataclass
class Started:
    """The module's slow scripted jobs, created at once in one namespace: each mostly waits (an
    evaluation schedule, the Job controller's 10 s backoff before a retry), so they wait together."""

    jobs: Jobs
    tmp: Path


@pytest.fixture(scope="module")
def started(
    local_cluster: LocalCluster, operator: Operator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Started]:
    tmp, namespace = tmp_path_factory.mktemp("started"), local_cluster.create_namespace("started")
    with local_cluster.api_client() as api:
        jobs = Jobs(api, namespace, operator)
        jobs.create(
            fake_job("stubborn", "finetune-test/stubborn:1", tmp, earlyStopping={"metric": "accuracy", "patience": 2})
        )
        jobs.create(fake_job("crashy", "finetune-test/crash-once:1", tmp, backoffLimit=2))
        jobs.create(fake_job("always-crash", "finetune-test/exit-1", tmp, backoffLimit=1))
        yield Started(jobs, tmp)
        client.CoreV1Api(api).delete_namespace(namespace)


def test_stubborn_trainer_is_early_stopped_by_the_operator(started: Started) -> None:
    jobs, tmp_path = started.jobs, started.tmp
    done = jobs.wait_condition("stubborn", "Complete", "StopEnforced", timeout=90)
    assert (tmp_path / "stubborn" / "saved-on-sigterm").is_file(), "the end was declared while the trainer still saved"
    status = _status(done)
    assert status["phase"] == "EarlyStopped"
    early = status["earlyStopping"]
    assert early["triggered"] is True
    assert early["bestStep"] == 20
    assert early["bestValue"] == 0.6
    assert early["evaluationsWithoutImprovement"] == 2
    assert status["stopRequest"]["reason"] == "EarlyStopped"
    assert status["best"]["step"] == 20
    assert "best 0.6 at step 20" in status["message"]
    assert _job(jobs, "stubborn").spec.suspend is True, "the operator halted the workload itself"
    jobs.wait_event("stubborn", "EarlyStopped")
    jobs.wait_event("stubborn", "StopEnforced")
    jobs.wait("stubborn", "trainer pods gone", lambda _: jobs.children("stubborn")["Pod"] == 0, timeout=60)


def test_permanent_trainer_error_fails_at_once_with_its_reason(jobs: Jobs, tmp_path: Path) -> None:
    jobs.create(fake_job("bad-data", "finetune-test/exit-3", tmp_path, backoffLimit=3))
    failed = jobs.wait_condition("bad-data", "Failed", "DataError", timeout=90)
    assert "scripted failure with exit code 3" in _status(failed)["message"]
    assert _job(jobs, "bad-data").status.failed == 1, "configuration/data errors are not retried"
    jobs.wait_event("bad-data", "DataError")


def test_crashing_trainer_is_retried_and_resumes(started: Started) -> None:
    jobs, tmp_path = started.jobs, started.tmp
    done = jobs.wait_condition("crashy", "Complete", "Succeeded", timeout=120)
    assert _status(done)["restarts"] == 1
    assert (tmp_path / "crashy" / "resumed-from").read_text() == "5"


def test_crash_beyond_backoff_limit_fails_with_last_exit(started: Started) -> None:
    jobs = started.jobs
    failed = jobs.wait_condition("always-crash", "Failed", "BackoffLimitExceeded", timeout=120)
    message = _status(failed)["message"]
    assert "exit code 1" in message and "scripted failure" in message


def test_invalid_spec_fails_without_workload(jobs: Jobs, tmp_path: Path) -> None:
    # The API server cannot check that a regex compiles; the operator's models can.
    body = fake_job(
        "bad-regex",
        "finetune-test/steady:1",
        tmp_path,
        freeze={"strategy": "modules", "frozenModules": ["(embeddings"]},
    )
    jobs.create(body)
    failed = jobs.wait_condition("bad-regex", "Failed", "InvalidSpec", timeout=60)
    message = _status(failed)["message"]
    assert "spec.freeze.frozenModules.0" in message and "regular expression" in message, message
    assert jobs.children("bad-regex")["Job"] == 0
    jobs.wait_event("bad-regex", "InvalidSpec")


def test_operator_kill9_loses_nothing_and_duplicates_nothing(
    jobs: Jobs, operator: Operator, local_cluster: LocalCluster, tmp_path: Path
) -> None:
    jobs.create(fake_job("survivor", "finetune-test/steady:1", tmp_path))
    jobs.wait_condition("survivor", "Running", timeout=60)
    operator.kill()
    time.sleep(2)
    operator.start()
    jobs.patch("survivor", {"metadata": {"annotations": {"finetune.dev/stop-requested": "true"}}})
    done = jobs.wait_condition("survivor", "Complete", "Stopped", timeout=90)
    assert _status(done)["phase"] == "Succeeded"
    children = jobs.children("survivor")
    assert {k: v for k, v in children.items() if k != "Pod"} == {
        "Job": 1,
        "ConfigMap": 1,
        "ServiceAccount": 1,
        "Role": 1,
        "RoleBinding": 1,
    }
    local_cluster.kubectl("wait", "-n", jobs.namespace, "--for=condition=Complete", "ftj/survivor", "--timeout=10s")


def test_deleted_child_is_recreated_and_deletion_cascades(jobs: Jobs, tmp_path: Path) -> None:
    jobs.create(fake_job("owner", "finetune-test/steady:1", tmp_path, suspend=True))
    suspended = jobs.wait_condition("owner", "Suspended", timeout=60)
    assert not suspended["metadata"].get("finalizers"), "ownerReferences cascade; no finalizer is needed"
    core = client.CoreV1Api(jobs.api)
    core.delete_namespaced_config_map("owner-config", jobs.namespace)
    jobs.wait("owner", "ConfigMap recreated", lambda _: jobs.children("owner")["ConfigMap"] == 1, timeout=30)
    jobs.delete("owner")
    deadline = time.monotonic() + 60
    while any(jobs.children("owner").values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(jobs.children("owner").values()), jobs.children("owner")


def test_suspend_then_resume(jobs: Jobs, tmp_path: Path) -> None:
    jobs.create(fake_job("pausable", "finetune-test/steady:1", tmp_path, suspend=True))
    suspended = jobs.wait_condition("pausable", "Suspended", timeout=60)
    assert _status(suspended)["phase"] == "Suspended"
    assert _job(jobs, "pausable").spec.suspend is True
    assert jobs.children("pausable")["Pod"] == 0
    jobs.patch("pausable", {"spec": {"suspend": False}})
    jobs.wait_condition("pausable", "Running", timeout=60)
    assert _job(jobs, "pausable").spec.suspend is False


def _sample(metrics: str, series: str, **labels: str) -> float | None:
    for line in metrics.splitlines():
        if not line.startswith(series + "{") and not line.startswith(series + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_follow_the_jobs(jobs: Jobs, operator: Operator, tmp_path: Path) -> None:
    jobs.create(fake_job("metered", "finetune-test/steady:1", tmp_path))
    jobs.wait(
        "metered", "progress reported", lambda b: (_status(b).get("progress") or {}).get("step", 0) >= 2, timeout=60
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = operator.metrics()
        if _sample(text, "finetune_job_progress_ratio", namespace=jobs.namespace, name="metered"):
            break
        time.sleep(0.5)
    assert (_sample(text, "finetune_job_progress_ratio", namespace=jobs.namespace, name="metered") or 0) > 0
    assert _sample(text, "finetune_job_samples_per_second", namespace=jobs.namespace, name="metered") == 12.5
    assert (_sample(text, "finetune_jobs", phase="Running") or 0) >= 1
    assert re.search(r"^finetune_reconcile_duration_seconds_count \d+", text, re.M)
    assert _sample(text, "finetune_time_to_running_seconds_count") is not None
    assert (_sample(text, "finetune_operator_api_requests_total", verb="POST", kind="Job", code="201") or 0) >= 1
    # With only the chart's permissions, a RoleBinding sent before its Role exists is refused.
    assert _sample(text, "finetune_operator_api_requests_total", verb="POST", kind="RoleBinding", code="404") is None
    jobs.delete("metered")
    deadline = time.monotonic() + 30
    while (
        _sample(operator.metrics(), "finetune_job_progress_ratio", namespace=jobs.namespace, name="metered") is not None
    ):
        assert time.monotonic() < deadline, "per-job series must disappear with the job"
        time.sleep(0.5)


def test_a_trainer_cannot_forge_the_operators_status(jobs: Jobs, tmp_path: Path) -> None:
    """The pod's own service-account token, against the admission policy the tests install with the CRD."""
    jobs.create(fake_job("forger", "finetune-test/forger:1", tmp_path, stopGracePeriodSeconds=120))
    jobs.wait_condition("forger", "Running", timeout=60)  # a stop on a pending job needs no trainer to end it
    jobs.patch("forger", {"metadata": {"annotations": {"finetune.dev/stop-requested": "true"}}})
    done = jobs.wait_condition("forger", "Complete", "Stopped", timeout=120)
    answers = json.loads((tmp_path / "forger" / "forgery.json").read_text())
    assert answers["progress"]["code"] == answers["evaluations"]["code"] == 200, answers
    for forged, key in (
        ("complete", "conditions"),
        ("stopRequest", "stopRequest"),
        ("earlyStopping", "earlyStopping"),
        ("bestElsewhere", "best.checkpoint"),
    ):
        assert answers[forged]["code"] == 403 and f"status.{key}" in answers[forged]["message"], answers[forged]
    status = _status(done)
    assert status["stopRequest"]["reason"] == "UserRequested"
    assert "best" not in status or not status["best"].get("checkpoint", "").startswith("file:///etc")


def test_two_trainers_on_one_node_each_serve_metrics_at_their_own_pod_ip(jobs: Jobs, tmp_path: Path) -> None:
    """Pods on the local node share its network, but each has its own IP, as in a cluster: two
    trainers on the same /metrics port do not collide, and each scrape reaches its own trainer."""
    names = ("left", "right")
    for name in names:
        jobs.create(fake_job(name, "finetune-test/paced:1", tmp_path))
    core = client.CoreV1Api(jobs.api)
    seen: dict[str, str] = {}
    for name in names:
        jobs.wait(name, "progress", lambda j: (_status(j).get("progress") or {}).get("step", 0) >= 1)
        (pod,) = core.list_namespaced_pod(jobs.namespace, label_selector=f"finetune.dev/job={name}").items
        port = next(p.container_port for p in pod.spec.containers[0].ports if p.name == "metrics")
        with urllib.request.urlopen(f"http://{pod.status.pod_ip}:{port}/metrics", timeout=5) as response:
            assert b"fake_trainer_step" in response.read()
        seen[name] = pod.status.pod_ip
        assert pod.status.pod_ip != "127.0.0.1" and ipaddress.ip_address(pod.status.pod_ip).is_loopback
    assert len(set(seen.values())) == 2, seen
    for name in names:
        jobs.delete(name)
