"""Shared fixtures. The local control plane (`local_cluster`) comes from the dev package; the
FineTuneJob CRD and per-test namespaces are added here for integration and end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client

from finetune_localcluster.kubeconfig import install_admission_policy, install_crd
from finetune_operator import admission
from finetune_operator.crd import build_crd, build_sweep_crd

pytest_plugins = ["finetune_localcluster.pytest_plugin"]

if TYPE_CHECKING:
    from finetune_localcluster.pytest_plugin import LocalCluster


@pytest.fixture(scope="session")
def crd(local_cluster: LocalCluster) -> dict[str, Any]:
    """The generated CRD applied to the API server and Established, with the admission policy that
    keeps trainers to their own status keys (as the chart installs them together)."""
    with local_cluster.api_client() as api:
        install_crd(api, build_crd())
        install_crd(api, build_sweep_crd())  # with it, as the chart installs them: the operator watches both
        install_admission_policy(api, admission.manifests())
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
