"""Kubernetes I/O for the operator: the only module that talks to the API server (besides kopf).

Plain dicts in and out (camelCase, as the API serves them); every call runs in a worker
thread so the kopf event loop never blocks. 409 on create means "already there" and 404 on
delete means "already gone": both are success, which makes every reconcile idempotent.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.crd import build_crd

Manifest = dict[str, Any]


class Kube:
    """Typed-API calls for the kinds a FineTuneJob owns."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @classmethod
    def from_environment(cls, pool_size: int = 32) -> Kube:
        """In-cluster credentials when running in a pod, else KUBECONFIG / ~/.kube/config."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        return cls(client.ApiClient(configuration))

    async def create(self, manifest: Manifest) -> Manifest | None:
        """Create a child and return it as stored; None when it already existed."""
        try:
            response = await asyncio.to_thread(self._create, manifest)
        except ApiException as error:
            if error.status == 409 or (error.status == 403 and "being terminated" in str(error.body)):
                return None  # exists already / its namespace is going away with everything in it
            raise
        return cast(Manifest, json.loads(response.data))

    def _create(self, manifest: Manifest) -> Any:
        namespace = manifest["metadata"]["namespace"]
        kind = manifest["kind"]
        creators = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Service": self.core.create_namespaced_service,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
        }
        return creators[kind](namespace, manifest, _preload_content=False)

    async def read_job(self, namespace: str, name: str) -> Manifest | None:
        return await self._read(lambda: self.batch.read_namespaced_job(name, namespace, _preload_content=False))

    async def list_pods(self, namespace: str, selector: str) -> list[Manifest]:
        response = await asyncio.to_thread(
            self.core.list_namespaced_pod, namespace, label_selector=selector, _preload_content=False
        )
        return cast(list[Manifest], json.loads(response.data)["items"])

    async def patch_job(self, namespace: str, name: str, patch: Manifest) -> None:
        await asyncio.to_thread(self.batch.patch_namespaced_job, name, namespace, patch, _preload_content=False)

    async def delete_job(self, namespace: str, name: str) -> None:
        try:
            await asyncio.to_thread(
                self.batch.delete_namespaced_job,
                name,
                namespace,
                propagation_policy="Background",
                _preload_content=False,
            )
        except ApiException as error:
            if error.status != 404:
                raise

    async def patch_status(self, namespace: str, name: str, status: Manifest) -> str | None:
        """JSON merge patch of the FineTuneJob status; only the keys given are touched.

        Returns the new resourceVersion, or None when the object is gone."""
        try:
            response = await asyncio.to_thread(
                self.custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status},
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return cast(str, json.loads(response.data)["metadata"]["resourceVersion"])

    async def post_event(self, involved: Manifest, type_: str, reason: str, message: str, now: datetime) -> None:
        """A core/v1 Event on the FineTuneJob, so `kubectl describe ftj` tells its story."""
        metadata = involved["metadata"]
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{metadata['name']}.", "namespace": metadata["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": involved.get("kind", "FineTuneJob"),
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": "finetune-operator"},
            "reportingComponent": "finetune.dev/operator",
            "reportingInstance": "finetune-operator",
        }
        await asyncio.to_thread(self.core.create_namespaced_event, metadata["namespace"], event, _preload_content=False)

    async def read_finetunejob(self, namespace: str, name: str) -> Manifest | None:
        return await self._read(
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
            )
        )

    async def _read(self, call: Any) -> Manifest | None:
        try:
            response = await asyncio.to_thread(call)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return cast(Manifest, json.loads(response.data))


def install_crd(api_client: client.ApiClient, timeout: float = 30.0) -> None:
    """Create or update the FineTuneJob CRD and wait until it is Established (demo, tests, dev)."""
    extensions = client.ApiextensionsV1Api(api_client)
    manifest = build_crd()
    name = manifest["metadata"]["name"]
    try:
        extensions.create_custom_resource_definition(manifest)
    except ApiException as error:
        if error.status != 409:
            raise
        manifest["metadata"]["resourceVersion"] = extensions.read_custom_resource_definition(
            name
        ).metadata.resource_version
        extensions.replace_custom_resource_definition(name, manifest)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conditions = extensions.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} not Established after {timeout:.0f}s")
