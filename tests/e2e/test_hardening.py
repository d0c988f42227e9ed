"""The operator keeps its promises under edits, races, foreign objects and restarts (issue #12).

Real operator process, real control plane, scripted trainers; each test is a few seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_operator.reconcile.children import CONFIG_HASH_ANNOTATION, JOB_LABEL, job_label_value
from tests.e2e.conftest import Jobs, Operator, fake_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def _config(jobs: Jobs, name: str) -> dict[str, Any]:
    data = client.CoreV1Api(jobs.api).read_namespaced_config_map(f"{name}-config", jobs.namespace).data
    loaded: dict[str, Any] = yaml.safe_load(data["config.yaml"])
    return loaded


def test_edits_while_suspended_reach_the_trainer(jobs: Jobs, tmp_path: Path) -> None:
    jobs.create(fake_job("editable", "finetune-test/steady:1", tmp_path, suspend=True))
    jobs.wait_condition("editable", "Suspended", timeout=60)
    assert _config(jobs, "editable")["hyperparameters"]["learningRate"] != 1e-3
    jobs.patch("editable", {"spec": {"hyperparameters": {"learningRate": 1e-3}, "backoffLimit": 1}})
    jobs.patch("editable", {"spec": {"suspend": False}})
    jobs.wait_condition("editable", "Running", timeout=60)
    assert _config(jobs, "editable")["hyperparameters"]["learningRate"] == 1e-3, "the ConfigMap follows the spec"
    trainer = client.BatchV1Api(jobs.api).read_namespaced_job("editable-trainer", jobs.namespace)
    assert trainer.spec.backoff_limit == 1
    assert trainer.spec.template.metadata.annotations[CONFIG_HASH_ANNOTATION]

    # Running: only suspend and ttlSecondsAfterFinished may change.
    jobs.patch("editable", {"spec": {"ttlSecondsAfterFinished": 60}})
    with pytest.raises(client.ApiException) as refused:
        jobs.patch("editable", {"spec": {"backoffLimit": 2}})
    message = json.loads(refused.value.body)["message"]
    assert "spec.backoffLimit" in message and "immutable" in message, message
    jobs.delete("editable")


def test_an_edit_while_suspended_replaces_the_job_only_once_its_old_pod_has_saved(jobs: Jobs, tmp_path: Path) -> None:
    """Issue 23 item 10: the Job was replaced while its old pod still saved its checkpoint, so a quick resume
    started a new trainer beside it (whose start-up cleanup deletes a checkpoint being written)."""
    batch, trainer = client.BatchV1Api(jobs.api), "saver-trainer"
    jobs.create(fake_job("saver", "finetune-test/stubborn:1", tmp_path))  # saves for 4 s on SIGTERM
    jobs.wait("saver", "a report (its SIGTERM handler is set)", lambda b: bool((b.get("status") or {}).get("progress")))
    old = batch.read_namespaced_job(trainer, jobs.namespace).metadata.uid
    jobs.patch("saver", {"spec": {"suspend": True}})
    jobs.patch("saver", {"spec": {"backoffLimit": 1}})
    jobs.patch("saver", {"spec": {"suspend": False}})
    saved = tmp_path / "saver" / "saved-on-sigterm"
    deadline, current = time.monotonic() + 60, old
    while time.monotonic() < deadline:
        try:
            current = batch.read_namespaced_job(trainer, jobs.namespace).metadata.uid
        except client.ApiException as error:
            assert error.status == 404, error
            current = None
        if current != old:
            assert saved.is_file(), "the Job was replaced while its old pod was still saving"
        if current not in (old, None):
            break
        time.sleep(0.2)
    assert current not in (old, None), "the Job was never replaced"
    assert batch.read_namespaced_job(trainer, jobs.namespace).spec.backoff_limit == 1
    jobs.wait_condition("saver", "Running", timeout=60)
    jobs.delete("saver")


def test_a_foreign_child_is_never_adopted_and_the_job_waits(jobs: Jobs, tmp_path: Path) -> None:
    core = client.CoreV1Api(jobs.api)
    foreign = {"metadata": {"name": "foreign-config"}, "data": {"config.yaml": "not ours"}}
    core.create_namespaced_config_map(jobs.namespace, foreign)
    jobs.create(fake_job("foreign", "finetune-test/steady:1", tmp_path, suspend=True))
    stalled = jobs.wait(
        "foreign", "Stalled=OwnershipConflict", lambda b: _condition(b, "Stalled").get("reason") == "OwnershipConflict"
    )
    assert "ConfigMap foreign-config" in _condition(stalled, "Stalled")["message"]
    jobs.wait_event("foreign", "OwnershipConflict")
    assert core.read_namespaced_config_map("foreign-config", jobs.namespace).data == {"config.yaml": "not ours"}
    assert jobs.children("foreign")["Job"] == 0, "no Job mounts a config that is not ours"
    core.delete_namespaced_config_map("foreign-config", jobs.namespace)
    resumed = jobs.wait_condition("foreign", "Suspended", timeout=30)  # within a resync: no event tells us
    assert _condition(resumed, "Stalled").get("status") == "False"
    assert jobs.children("foreign")["Job"] == 1


def test_a_recreated_job_never_takes_over_its_namesakes_job(jobs: Jobs, tmp_path: Path) -> None:
    """`kubectl delete ftj x && kubectl apply -f x.yaml` while the old Job is still there."""
    batch = client.BatchV1Api(jobs.api)
    jobs.create(fake_job("again", "finetune-test/steady:1", tmp_path, suspend=True))
    jobs.wait_condition("again", "Suspended", timeout=60)
    old = batch.read_namespaced_job("again-trainer", jobs.namespace)
    # Orphan the old children (as a slow garbage collector would leave them for a while).
    jobs.custom.delete_namespaced_custom_object(
        GROUP, VERSION, jobs.namespace, PLURAL, "again", body=client.V1DeleteOptions(propagation_policy="Orphan")
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            jobs.get("again")
            time.sleep(0.3)
        except client.ApiException:
            break
    jobs.create(fake_job("again", "finetune-test/steady:1", tmp_path))
    stalled = jobs.wait(
        "again", "Stalled=OwnershipConflict", lambda b: _condition(b, "Stalled").get("reason") == "OwnershipConflict"
    )
    assert _condition(stalled, "Complete") == {}
    assert batch.read_namespaced_job("again-trainer", jobs.namespace).metadata.uid == old.metadata.uid, "not deleted"
    batch.delete_namespaced_job("again-trainer", jobs.namespace, propagation_policy="Background")
    for kind, delete in (
        ("config_map", client.CoreV1Api(jobs.api).delete_namespaced_config_map),
        ("service_account", client.CoreV1Api(jobs.api).delete_namespaced_service_account),
        ("role", client.RbacAuthorizationV1Api(jobs.api).delete_namespaced_role),
        ("role_binding", client.RbacAuthorizationV1Api(jobs.api).delete_namespaced_role_binding),
    ):
        name = "again-config" if kind == "config_map" else "again-trainer"
        try:
            delete(name, jobs.namespace)
        except client.ApiException as error:
            assert error.status == 404, error
    jobs.wait_condition("again", "Running", timeout=60)
    assert batch.read_namespaced_job("again-trainer", jobs.namespace).metadata.uid != old.metadata.uid
    jobs.delete("again")


def test_a_long_name_gets_valid_children(jobs: Jobs, tmp_path: Path) -> None:
    name = "a-very-long-fine-tune-job-name-" + "x" * 40
    assert len(name) > 63
    jobs.create(fake_job(name, "finetune-test/steady:1", tmp_path, suspend=True))
    jobs.wait_condition(name, "Suspended", timeout=60)
    selector = f"{JOB_LABEL}={job_label_value(name)}"
    assert len(client.BatchV1Api(jobs.api).list_namespaced_job(jobs.namespace, label_selector=selector).items) == 1
    core = client.CoreV1Api(jobs.api)
    core.delete_namespaced_config_map(next(iter(_names(jobs, selector))), jobs.namespace)
    jobs.wait(name, "ConfigMap recreated", lambda _: len(_names(jobs, selector)) == 1, timeout=30)
    jobs.delete(name)


def _names(jobs: Jobs, selector: str) -> list[str]:
    listed = client.CoreV1Api(jobs.api).list_namespaced_config_map(jobs.namespace, label_selector=selector)
    return [item.metadata.name for item in listed.items]


def test_a_refused_child_is_a_condition_and_a_warning(jobs: Jobs, tmp_path: Path) -> None:
    core = client.CoreV1Api(jobs.api)
    quota = {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}
    core.create_namespaced_resource_quota(jobs.namespace, quota)
    # The local control plane runs no quota controller: state the usage it would have computed.
    usage = {"status": {"hard": {"count/jobs.batch": "0"}, "used": {"count/jobs.batch": "0"}}}
    core.patch_namespaced_resource_quota_status("no-jobs", jobs.namespace, usage)
    try:
        jobs.create(fake_job("refused", "finetune-test/steady:1", tmp_path, suspend=True))
        stalled = jobs.wait(
            "refused", "Stalled=CreateFailed", lambda b: _condition(b, "Stalled").get("reason") == "CreateFailed"
        )
        assert "Job refused-trainer" in stalled["status"]["message"]
        assert "quota" in stalled["status"]["message"], stalled["status"]["message"]
        jobs.wait_event("refused", "CreateFailed")
    finally:
        core.delete_namespaced_resource_quota("no-jobs", jobs.namespace)
    jobs.wait_condition("refused", "Suspended", timeout=30)
    jobs.delete("refused")


def test_an_unschedulable_pod_is_pending_not_running(jobs: Jobs, tmp_path: Path) -> None:
    resources = {"image": "finetune-test/steady:1", "gpusPerNode": 1, "nodeSelector": {"no-such-label": "x"}}
    jobs.create(fake_job("unplaceable", "finetune-test/steady:1", tmp_path, resources=resources))
    body = jobs.wait(
        "unplaceable",
        "Running=False/Unschedulable",
        lambda b: _condition(b, "Running").get("reason") == "Unschedulable",
    )
    assert body["status"]["phase"] == "Pending"
    assert _condition(body, "Running")["status"] == "False"
    # A stop request on a job that never ran completes at once (nothing to save).
    jobs.patch("unplaceable", {"metadata": {"annotations": {"finetune.dev/stop-requested": "true"}}})
    jobs.wait_condition("unplaceable", "Complete", "Stopped", timeout=30)
    jobs.delete("unplaceable")


def test_children_deleted_while_the_operator_is_down_come_back(jobs: Jobs, operator: Operator, tmp_path: Path) -> None:
    jobs.create(fake_job("restored", "finetune-test/steady:1", tmp_path, suspend=True))
    jobs.wait_condition("restored", "Suspended", timeout=60)
    operator.kill()
    try:
        client.CoreV1Api(jobs.api).delete_namespaced_config_map("restored-config", jobs.namespace)
        client.RbacAuthorizationV1Api(jobs.api).delete_namespaced_role("restored-trainer", jobs.namespace)
    finally:
        operator.start()
    jobs.wait(
        "restored",
        "children back within a resync",
        lambda _: jobs.children("restored")["ConfigMap"] == 1 and jobs.children("restored")["Role"] == 1,
        timeout=20,
    )
    jobs.delete("restored")


def test_a_result_is_recorded_before_the_ttl_removes_the_job(jobs: Jobs, operator: Operator, tmp_path: Path) -> None:
    batch = client.BatchV1Api(jobs.api)

    def trainer_jobs() -> list[client.V1Job]:
        return list(batch.list_namespaced_job(jobs.namespace, label_selector=f"{JOB_LABEL}=shortlived").items)

    jobs.create(fake_job("shortlived", "finetune-test/steady:1", tmp_path, ttlSecondsAfterFinished=0))
    jobs.wait_condition("shortlived", "Running", timeout=60)
    first = trainer_jobs()[0].metadata.uid
    operator.kill()
    try:  # the trainer finishes while nobody watches
        stop = {"reason": "UserRequested", "message": "test", "requestedTime": "2026-01-01T00:00:00Z"}
        jobs.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, jobs.namespace, PLURAL, "shortlived", {"status": {"stopRequest": stop}}
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = trainer_jobs()
            if not listed or any(c.type == "Complete" for c in listed[0].status.conditions or []):
                break
            time.sleep(0.5)
        time.sleep(2)  # time for the TTL controller, had the Job a TTL
    finally:
        operator.start()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        listed = trainer_jobs()
        assert all(j.metadata.uid == first for j in listed), "the training ran again in a new Job"
        if not listed and _condition(jobs.get("shortlived"), "Complete").get("status") == "True":
            break
        time.sleep(0.3)
    assert _condition(jobs.get("shortlived"), "Complete")["reason"] == "Stopped"
    time.sleep(3)  # a resync or two: nothing is run again
    assert trainer_jobs() == []
    jobs.delete("shortlived")


def test_a_finished_job_stays_finished(jobs: Jobs, tmp_path: Path) -> None:
    """A spec the operator's models reject (here a regex; in life an older or newer CRD) used to
    turn a Complete job into Complete=True and Failed=True."""
    jobs.create(fake_job("finished", "finetune-test/steady:1", tmp_path))
    jobs.wait_condition("finished", "Running", timeout=60)
    jobs.patch("finished", {"metadata": {"annotations": {"finetune.dev/stop-requested": "true"}}})
    jobs.wait_condition("finished", "Complete", "Stopped", timeout=60)
    jobs.patch("finished", {"spec": {"suspend": True}})
    jobs.patch("finished", {"spec": {"freeze": {"strategy": "modules", "frozenModules": ["(embeddings"]}}})
    time.sleep(5)  # two resyncs
    body = jobs.get("finished")
    assert _condition(body, "Failed").get("status") != "True", body["status"]["conditions"]
    assert _condition(body, "Complete")["status"] == "True"
    assert body["status"]["phase"] == "Succeeded"
    jobs.delete("finished")


def test_a_dotted_multi_node_job_gets_valid_children(jobs: Jobs, tmp_path: Path) -> None:
    resources = {"image": "finetune-test/steady:1", "gpusPerNode": 1, "nodes": 2}
    jobs.create(fake_job("team.multi", "finetune-test/steady:1", tmp_path, resources=resources, suspend=True))
    body = jobs.wait_condition("team.multi", "Suspended", timeout=60)
    workload = body["status"]["workload"]
    assert "." not in workload["service"] and "." not in workload["job"], workload
    client.CoreV1Api(jobs.api).read_namespaced_service(workload["service"], jobs.namespace)
    trainer = client.BatchV1Api(jobs.api).read_namespaced_job(workload["job"], jobs.namespace)
    assert trainer.spec.template.spec.subdomain == workload["service"]
    jobs.delete("team.multi")
