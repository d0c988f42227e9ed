"""The generated advice policy on a real API server: each warning appears on `kubectl apply`, none for examples.

The policy is installed cluster-wide by the ``crd`` fixture, as the chart installs it (its warnings never
reject, so the rest of the suite is unaffected).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from finetune_operator.generators.advice_policy import POLICY_NAME
from finetune_testsupport.pytest_plugin import LocalCluster
from finetune_trainer.advice import RULES
from tests.advice_cases import CASES, Case, advice_in_force, apply_dry_run, manifest, warning_lines
from tests.manifests import EXAMPLES, example

pytestmark = pytest.mark.integration

MESSAGES = {rule.reason: rule.message for rule in RULES}


@pytest.fixture(scope="module")
def advised(local_cluster: LocalCluster, crd: Any) -> Iterator[str]:
    """A namespace of its own; returns once the advice policy is in force there."""
    namespace = local_cluster.create_namespace("advice")
    try:
        with advice_in_force(local_cluster, namespace):
            yield namespace
    finally:
        with local_cluster.api_client() as api:
            client.CoreV1Api(api).delete_namespace(namespace)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_warning_appears_on_kubectl_apply(local_cluster: LocalCluster, advised: str, case: Case) -> None:
    code, stderr = apply_dry_run(local_cluster, advised, manifest(case))
    assert code == 0, stderr  # advice never rejects
    warnings = warning_lines(stderr)
    if not case.reason:
        assert warnings == [], stderr
        return
    assert len(warnings) == 1, stderr
    assert warnings[0].endswith(MESSAGES[case.reason]) and POLICY_NAME in warnings[0], stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_apply_without_warnings(local_cluster: LocalCluster, advised: str, path: Any) -> None:
    code, stderr = apply_dry_run(local_cluster, advised, example(path))
    assert code == 0 and warning_lines(stderr) == [], stderr
