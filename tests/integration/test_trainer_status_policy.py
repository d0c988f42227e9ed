"""The trainer's real token on a real API server: it may report progress, evaluations and its best
result, and nothing else (finetune_operator.generators.admission, installed with the CRD by the ``crd`` fixture)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_operator.api.job import GROUP, MAX_EVALUATIONS, PLURAL, VERSION, FineTuneJob
from finetune_operator.generators import admission
from finetune_operator.reconcile.children import Names, Settings, desired_children
from finetune_testsupport.pytest_plugin import LocalCluster
from finetune_trainer.contract import Progress, TrainerStatus
from finetune_trainer.reporting import JsonLines, StatusReporter
from tests.manifests import baseline, trainer_status_at_the_bounds

pytestmark = pytest.mark.integration

NAME = "guarded"
OUTPUT = "file:///out/guarded"
NOW = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _evaluation(step: int, accuracy: float = 0.7) -> dict[str, Any]:
    return {"step": step, "epoch": step / 10, "metrics": {"loss": 1 - accuracy, "accuracy": accuracy}, "time": NOW}


OPERATOR_STATUS = {
    "phase": "Running",
    "conditions": [
        {"type": "Running", "status": "True", "reason": "Training", "message": "", "lastTransitionTime": NOW}
    ],
    "stopRequest": {"reason": "EarlyStopped", "message": "patience exhausted", "requestedTime": NOW},
    "earlyStopping": {
        "metric": "accuracy",
        "mode": "max",
        "patience": 2,
        "evaluationsWithoutImprovement": 0,
        "triggered": True,
    },
    "restarts": 1,
    # the identity the operator records; only that ServiceAccount may write the status
    "workload": {"serviceAccount": Names.of(NAME).service_account},
}


def token_client(local_cluster: LocalCluster, namespace: str, account: str) -> client.ApiClient:
    """An API client holding a fresh token of ``account``: the identity the trainer pod runs as."""
    with local_cluster.api_client() as api:
        token = (
            client.CoreV1Api(api)
            .create_namespaced_service_account_token(account, namespace, {"spec": {"expirationSeconds": 3600}})
            .status.token
        )
    cluster = yaml.safe_load(local_cluster.kubeconfig.read_text())["clusters"][0]["cluster"]
    config = client.Configuration()
    config.host = cluster["server"]
    config.ssl_ca_cert = cluster["certificate-authority"]
    config.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(config)


def _job_with_identity(api: client.ApiClient, namespace: str, name: str, kinds: set[str]) -> None:
    """FineTuneJob ``name`` (suspended: no trainer pod) with the operator's status, and the children of
    ``kinds`` among the ServiceAccount, Role and RoleBinding the operator renders for it."""
    manifest = baseline(name)
    manifest["spec"]["output"]["location"] = OUTPUT
    manifest["spec"]["suspend"] = True
    custom = client.CustomObjectsApi(api)
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, {**manifest, "metadata": {"name": name, "namespace": namespace}}
    )
    workload = {"serviceAccount": Names.of(name).service_account}
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": {**OPERATOR_STATUS, "workload": workload}}
    )
    job = FineTuneJob.model_validate(created)
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    create = {
        "ServiceAccount": lambda m: core.create_namespaced_service_account(namespace, m),
        "Role": lambda m: rbac.create_namespaced_role(namespace, m),
        "RoleBinding": lambda m: rbac.create_namespaced_role_binding(namespace, m),
    }
    for child in desired_children(job, Settings()):
        if child["kind"] in kinds:
            try:
                create[child["kind"]](child)
            except client.ApiException as error:  # an operator running in this session made it first
                if error.status != 409:
                    raise


@pytest.fixture
def trainer(local_cluster: LocalCluster, crd: Any, namespace: str) -> Iterator[client.CustomObjectsApi]:
    """A FineTuneJob with the operator's status and the per-job ServiceAccount, Role and RoleBinding
    the operator renders; yields the CustomObjectsApi of that ServiceAccount."""
    with local_cluster.api_client() as api:
        _job_with_identity(api, namespace, NAME, {"ServiceAccount", "Role", "RoleBinding"})
    with token_client(local_cluster, namespace, Names.of(NAME).service_account) as api:
        yield client.CustomObjectsApi(api)


def _patch(custom: client.CustomObjectsApi, namespace: str, status: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, NAME, {"status": status}
    )
    return result


def _rejected(custom: client.CustomObjectsApi, namespace: str, status: dict[str, Any]) -> str:
    with pytest.raises(client.ApiException) as error:
        _patch(custom, namespace, status)
    assert error.value.status in (403, 422), error.value.body
    message: str = json.loads(error.value.body)["message"]
    return message


def _wait_enforced(custom: client.CustomObjectsApi, namespace: str) -> None:
    """A new policy reaches the API server's admission chain a moment after it is type-checked."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            _patch(custom, namespace, {"phase": "Succeeded"})
        except client.ApiException as error:
            if error.status == 403:
                return
            raise
        time.sleep(0.2)
    raise AssertionError("the trainer status policy is not enforced")


def test_policy_type_checks_cleanly(local_cluster: LocalCluster, crd: Any) -> None:
    with local_cluster.api_client() as api:
        policy = client.AdmissionregistrationV1Api(api).read_validating_admission_policy(admission.POLICY_NAME)
    checking = policy.status.type_checking
    warnings = checking.expression_warnings if checking is not None else None
    assert not warnings, warnings


def test_trainer_reports_progress_evaluations_and_best(trainer: client.CustomObjectsApi, namespace: str) -> None:
    _wait_enforced(trainer, namespace)
    best = {"metric": "accuracy", "value": 0.7, "step": 20, "checkpoint": f"{OUTPUT}/checkpoints/checkpoint-20"}
    progress = {"step": 20, "totalSteps": 100, "percent": 20.0, "lastHeartbeatTime": NOW}
    status = _patch(
        trainer, namespace, {"progress": progress, "evaluations": [_evaluation(10), _evaluation(20)], "best": best}
    )["status"]
    assert status["best"] == best
    assert len(status["evaluations"]) == 2
    assert {k: status[k] for k in OPERATOR_STATUS} == OPERATOR_STATUS, "the operator's keys are untouched"


def test_the_largest_status_the_contract_allows_is_accepted(trainer: client.CustomObjectsApi, namespace: str) -> None:
    """The contract's bounds are the API server's: what the trainer's models let it write, the CRD and the
    policy accept (nulls included: the trainer's merge patches delete with them)."""
    _wait_enforced(trainer, namespace)
    status = _patch(trainer, namespace, trainer_status_at_the_bounds(OUTPUT).to_patch())["status"]
    assert len(status["evaluations"]) == MAX_EVALUATIONS


@pytest.mark.parametrize(
    ("forged", "named"),
    [
        (
            {
                "conditions": [
                    {
                        "type": "Complete",
                        "status": "True",
                        "reason": "Succeeded",
                        "message": "",
                        "lastTransitionTime": NOW,
                    }
                ]
            },
            "status.conditions",
        ),
        ({"phase": "Succeeded"}, "status.phase"),
        ({"stopRequest": None}, "status.stopRequest"),
        (
            {"earlyStopping": {"metric": "accuracy", "mode": "max", "patience": 1000, "triggered": False}},
            "status.earlyStopping",
        ),
        ({"restarts": 0}, "status.restarts"),
        ({"message": "all good"}, "status.message"),
        ({"completionTime": NOW}, "status.completionTime"),
        ({"workload": {"job": "elsewhere"}}, "status.workload"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_trainer_cannot_touch_the_operators_keys(
    trainer: client.CustomObjectsApi, namespace: str, forged: dict[str, Any], named: str
) -> None:
    _wait_enforced(trainer, namespace)
    message = _rejected(trainer, namespace, {"progress": {"step": 1}, **forged})
    assert f"{named} is the operator's" in message, message


@pytest.mark.parametrize(
    ("status", "named"),
    [
        ({"evaluations": [_evaluation(step) for step in range(MAX_EVALUATIONS + 1)]}, "evaluations"),
        ({"evaluations": [{"step": 1, "metrics": {f"m{i}": 0.5 for i in range(100)}}]}, "status.evaluations[].metrics"),
        ({"evaluations": [{"step": 1, "metrics": {"x" * 500: 0.5}}]}, "status.evaluations[].metrics"),
        (
            {"best": {"metric": "accuracy", "value": 1.0, "step": 1, "checkpoint": "file:///etc/shadow"}},
            "status.best.checkpoint",
        ),
        (
            {"best": {"metric": "accuracy", "value": 1.0, "step": 1, "checkpoint": "file:///out/guarded-other/x"}},
            "status.best.checkpoint",
        ),
        (
            {"best": {"metric": "accuracy", "value": 1.0, "step": 1, "checkpoint": f"{OUTPUT}/../elsewhere"}},
            "status.best.checkpoint",
        ),
        ({"best": {"metric": "a" * 500, "value": 1.0, "step": 1}}, "status.best.metric"),
        (
            {"artifacts": [{"uri": "file:///etc", "kind": "model", "sizeBytes": 1, "sha256": "0" * 64}]},
            "status.artifacts",
        ),
        (
            {"artifacts": [{"uri": f"{OUTPUT}/../x", "kind": "model", "sizeBytes": 1, "sha256": "0" * 64}]},
            "status.artifacts",
        ),
    ],
    ids=[
        "too-many-evaluations",
        "too-many-metrics",
        "long-metric-name",
        "checkpoint-elsewhere",
        "checkpoint-sibling",
        "checkpoint-dotdot",
        "long-best-metric",
        "artifact-elsewhere",
        "artifact-dotdot",
    ],
)
def test_trainer_keys_are_bounded(
    trainer: client.CustomObjectsApi, namespace: str, status: dict[str, Any], named: str
) -> None:
    _wait_enforced(trainer, namespace)
    message = _rejected(trainer, namespace, status)
    assert named in message, message


def test_the_operator_and_users_are_not_held_to_the_trainers_rules(
    local_cluster: LocalCluster, trainer: client.CustomObjectsApi, namespace: str
) -> None:
    _wait_enforced(trainer, namespace)
    with local_cluster.api_client() as api:
        status = _patch(client.CustomObjectsApi(api), namespace, {"phase": "Succeeded", "stopRequest": None})["status"]
    assert status["phase"] == "Succeeded"
    assert "stopRequest" not in status


def test_a_report_sent_before_the_trainers_rights_exist_lands_once_they_do(
    local_cluster: LocalCluster, crd: Any, namespace: str
) -> None:
    """The operator creates the trainer Job without waiting for its Role and RoleBinding, so a pod may report
    before they exist: that report was refused (403, not retried) and lost."""
    name = "late"
    account = Names.of(name).service_account
    with local_cluster.api_client() as api:
        client.CoreV1Api(api).create_namespaced_service_account(namespace, {"metadata": {"name": account}})
        lines = io.StringIO()
        with token_client(local_cluster, namespace, account) as trainer_api:
            reporter = StatusReporter(
                client.CustomObjectsApi(trainer_api), name, namespace, 0, JsonLines(lines), backoff=0.1
            )
            reporter.update(TrainerStatus(progress=Progress(step=3, total_steps=10)), urgent=True)
            deadline = time.monotonic() + 30
            while "waiting for the rights to report" not in lines.getvalue() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "waiting for the rights to report" in lines.getvalue(), "refused: no job, Role or RoleBinding yet"
            _job_with_identity(api, namespace, name, {"Role", "RoleBinding"})
            assert reporter.wait_for_access(), lines.getvalue()
            reporter.close()
        progress = (
            client.CustomObjectsApi(api)
            .get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["status"]
            .get("progress", {})
        )
    assert progress.get("step") == 3, lines.getvalue()
