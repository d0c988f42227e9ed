"""Shared fixtures. The local control plane (`local_cluster`) comes from the dev package; the
FineTuneJob CRD and per-test namespaces are added here for integration and end-to-end tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client

from finetune_operator.crd import build_crd

pytest_plugins = ["finetune_localcluster.pytest_plugin"]

if TYPE_CHECKING:
    from finetune_localcluster.pytest_plugin import LocalCluster


@pytest.fixture(scope="session")
def crd(local_cluster: LocalCluster) -> dict[str, Any]:
    """The generated CRD applied to the API server and Established."""
    manifest = build_crd()
    with local_cluster.api_client() as api:
        extensions = client.ApiextensionsV1Api(api)
        try:
            extensions.create_custom_resource_definition(manifest)
        except client.ApiException as error:
            if error.status != 409:
                raise
            current = extensions.read_custom_resource_definition(manifest["metadata"]["name"])
            manifest["metadata"]["resourceVersion"] = current.metadata.resource_version
            extensions.replace_custom_resource_definition(manifest["metadata"]["name"], manifest)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = extensions.read_custom_resource_definition(manifest["metadata"]["name"]).status
            if any(c.type == "Established" and c.status == "True" for c in (status.conditions or [])):
                return manifest
            time.sleep(0.1)
    raise AssertionError("the FineTuneJob CRD never became Established")


@pytest.fixture
def namespace(local_cluster: LocalCluster) -> Iterator[str]:
    name = local_cluster.create_namespace("ftj")
    yield name
    with local_cluster.api_client() as api:
        client.CoreV1Api(api).delete_namespace(name)
