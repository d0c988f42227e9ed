"""The generated advice policy on a real API server: each warning appears on `kubectl apply`, none for examples.

The policy is bound to this module's namespace only (a namespaceSelector), so the rest of the suite,
sharing the control plane, never sees it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_localcluster.pytest_plugin import LocalCluster
from finetune_operator.advice_policy import POLICY_NAME, build_policy
from finetune_trainer.advice import RULES
from tests.advice_cases import CASES, Case, manifest
from tests.manifests import EXAMPLES, Manifest, example

pytestmark = pytest.mark.integration

MESSAGES = {rule.reason: rule.message for rule in RULES}


def _apply(cluster: LocalCluster, namespace: str, m: Manifest) -> tuple[int, str]:
    m = {**m, "metadata": {**m["metadata"], "namespace": namespace}}
    res = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(m), check=False)
    return res.returncode, res.stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Warning:")]


@pytest.fixture(scope="module")
def advised(local_cluster: LocalCluster, crd: Any) -> Iterator[str]:
    """A namespace with the advice policy bound to it alone; returns once the policy is in force."""
    namespace = local_cluster.create_namespace("advice")
    policy, binding = copy.deepcopy(build_policy())
    name = f"{POLICY_NAME}-{namespace}"
    policy["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = name
    binding["spec"]["matchResources"] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    }
    local_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([policy, binding]))
    probe = manifest(next(c for c in CASES if c.reason == "HighLearningRate"))
    deadline = time.monotonic() + 60
    while not _warnings(_apply(local_cluster, namespace, probe)[1]):
        assert time.monotonic() < deadline, "the advice policy never took effect"
        time.sleep(0.5)
    try:
        yield namespace
    finally:
        local_cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, check=False)
        with local_cluster.api_client() as api:
            client.CoreV1Api(api).delete_namespace(namespace)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_warning_appears_on_kubectl_apply(local_cluster: LocalCluster, advised: str, case: Case) -> None:
    code, stderr = _apply(local_cluster, advised, manifest(case))
    assert code == 0, stderr  # advice never rejects
    warnings = _warnings(stderr)
    if not case.reason:
        assert warnings == [], stderr
        return
    assert len(warnings) == 1, stderr
    assert warnings[0].endswith(MESSAGES[case.reason]) and POLICY_NAME in warnings[0], stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_apply_without_warnings(local_cluster: LocalCluster, advised: str, path: Any) -> None:
    code, stderr = _apply(local_cluster, advised, example(path))
    assert code == 0 and _warnings(stderr) == [], stderr
