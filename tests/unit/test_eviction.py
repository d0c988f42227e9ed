"""Endless eviction loop: bounded scratch space, and evictions counted (preemptions that saved are not)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from finetune_operator.api.job import quantity_value
from finetune_operator.reconcile import Observed, ObservedJob, Settings, decide
from finetune_operator.reconcile.children import batch_job
from finetune_operator.reconcile.observe import observe_pod
from finetune_trainer import exitcodes
from tests.unit.test_reconcile import NOW, conditions, job


def test_scratch_space_is_bounded_and_requested_only_when_asked_for() -> None:
    """Unset, the pod requests no ephemeral-storage (nor a limit, which the API server would copy to a
    request): a Kueue ClusterQueue covering cpu, memory and GPUs admits it. The scratch volume stays bounded."""
    pod = batch_job(job(), Settings())["spec"]["template"]["spec"]
    resources = pod["containers"][0].get("resources") or {}
    assert "ephemeral-storage" not in resources.get("limits", {})
    assert "ephemeral-storage" not in resources.get("requests", {})
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"] == {"sizeLimit": "20Gi"}, "outgrowing it is still an eviction"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["HF_HOME"].startswith("/tmp/"), "the Hugging Face cache lives in the bounded volume"

    large = batch_job(job(resources={"ephemeralStorage": "50Gi"}), Settings())["spec"]["template"]["spec"]
    assert large["containers"][0]["resources"]["limits"]["ephemeral-storage"] == "50Gi"
    assert large["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "1Gi"
    assert next(v for v in large["volumes"] if v["name"] == "tmp")["emptyDir"] == {"sizeLimit": "50Gi"}
    small = batch_job(job(resources={"ephemeralStorage": "500Mi"}), Settings())["spec"]["template"]["spec"]
    assert small["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "500Mi", "request <= limit"


def test_pod_failure_policy_counts_evictions_but_not_saved_preemptions() -> None:
    rules = batch_job(job(), Settings())["spec"]["podFailurePolicy"]["rules"]
    shapes = [
        (r["action"], r.get("onExitCodes", {}).get("operator"), r.get("onExitCodes", {}).get("values")) for r in rules
    ]
    assert shapes == [
        ("FailJob", "In", sorted(exitcodes.PERMANENT)),
        ("Ignore", "In", [exitcodes.TERMINATED.code]),  # saved on SIGTERM: resumes
        ("Count", "NotIn", [0]),  # killed (an eviction): counted against backoffLimit
        ("Ignore", None, None),  # disrupted before it ran
    ]
    assert rules[-1]["onPodConditions"] == [{"type": "DisruptionTarget"}]


def _evicted_pod(name: str) -> dict[str, object]:
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Failed",
            "reason": "Evicted",
            # The kubelet's words for the scratch volume's sizeLimit (the pod sets no ephemeral-storage limit)
            "message": 'Usage of EmptyDir volume "tmp" exceeds the limit "20Gi". ',
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}},
            ],
        },
    }


def test_repeated_evictions_fail_the_job_saying_so() -> None:
    pods = tuple(observe_pod(_evicted_pod(f"p{i}")) for i in range(3))
    assert pods[0].reason == "Evicted" and 'volume "tmp" exceeds the limit' in pods[0].message
    failed = ObservedJob(failed=3, failed_condition=True, failed_reason="BackoffLimitExceeded")
    decision = decide(job(backoffLimit=2), Observed(job=failed, pods=pods), NOW)
    assert conditions(decision.status)["Failed"] == ("True", "Evicted")
    assert "evicted 3 times" in (decision.status.message or "") and "20Gi" in (decision.status.message or "")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1Gi", Decimal(2**30)),
        ("500Mi", Decimal(500 * 2**20)),
        ("2G", Decimal(2 * 10**9)),
        ("1500m", Decimal("1.5")),
        (3, Decimal(3)),
    ],
)
def test_quantity_value(text: str | int, value: Decimal) -> None:
    assert quantity_value(text) == value
