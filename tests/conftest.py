"""Shared fixtures. The local control plane (`local_cluster`) comes from the dev package; the
FineTuneJob CRD and per-test namespaces are added here for integration and end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client

from finetune_localcluster.kubeconfig import install_objects
from finetune_operator.generators.crd import build_crd, build_sweep_crd, chart_api_objects

pytest_plugins = ["finetune_testsupport.pytest_plugin"]

if TYPE_CHECKING:
    from finetune_testsupport.pytest_plugin import LocalCluster


@pytest.fixture(scope="session")
def crd(local_cluster: LocalCluster) -> dict[str, Any]:
    """The generated CRDs applied to the API server and Established, with every admission policy the chart
    installs (trainers' own status keys, apply-time advice), in force."""
    with local_cluster.api_client() as api:
        install_objects(api, chart_api_objects())
    return build_crd()


@pytest.fixture(scope="session")
def sweep_crd(crd: dict[str, Any]) -> dict[str, Any]:
    """The generated FineTuneSweep CRD, applied with the FineTuneJob's."""
    return build_sweep_crd()


@pytest.fixture
def namespace(local_cluster: LocalCluster) -> Iterator[str]:
    name = local_cluster.create_namespace("ftj")
    yield name
    with local_cluster.api_client() as api:
        client.CoreV1Api(api).delete_namespace(name)
