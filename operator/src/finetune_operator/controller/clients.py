"""Kubernetes I/O for the operator: the only module that talks to the API server (besides kopf).

Plain dicts in and out (camelCase, as the API serves them), over one aiohttp session on kopf's
event loop: kept-alive connections, no thread and no TLS handshake per call. Credentials come
from the same loaders kopf's own watches log in with (``login``), so the two can never disagree
about what the operator can reach. No generated client library: in a profile at 1000 jobs
kubernetes_asyncio's API classes and aiohttp's per-request netrc and proxy lookups were about a
quarter of the operator's CPU, and importing its models alone costs about 30 MB of memory.

409 on create means "already there" and 404 on delete means "already gone": both are success,
which makes every reconcile idempotent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import kopf

from finetune_operator.api.job import GROUP, KIND, KUEUE_GROUP, KUEUE_VERSION, KUEUE_WORKLOADS, PLURAL, VERSION
from finetune_operator.api.sweep import SWEEP_KIND, SWEEP_PLURAL
from finetune_operator.controller.allocator import decode_json
from finetune_operator.reconcile.kinds import CHILD_KINDS

Manifest = dict[str, Any]

_COLLECTIONS = {
    **{child.kind: child.collection for child in CHILD_KINDS},
    "Event": "/api/v1/namespaces/{}/events",
    "Pod": "/api/v1/namespaces/{}/pods",
    KIND: f"/apis/{GROUP}/{VERSION}/namespaces/{{}}/{PLURAL}",
    SWEEP_KIND: f"/apis/{GROUP}/{VERSION}/namespaces/{{}}/{SWEEP_PLURAL}",
    "Workload": f"/apis/{KUEUE_GROUP}/{KUEUE_VERSION}/namespaces/{{}}/{KUEUE_WORKLOADS}",
}
MERGE_PATCH = "application/merge-patch+json"
PARTIAL_METADATA = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
THROTTLE_RETRIES = 5
"""429 Too Many Requests (API priority and fairness): wait as told by Retry-After, this many times."""
MAX_RETRY_AFTER = 30.0


def _retry_after(value: str | None) -> float:
    """Seconds to wait from a Retry-After header (the API server sends whole seconds)."""
    try:
        return min(max(float(value or 1), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return 1.0


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}: {body[:500]}")
        self.status, self.reason, self.body = status, reason, body


class ConflictError(ApiError):
    """The object changed since it was read: read it again and decide again."""


CONFLICT_RETRIES = 5
"""How often a reconcile decides afresh after a ConflictError before it gives up (kopf retries it later)."""


def login(settings: kopf.OperatorSettings | None = None) -> kopf.ConnectionInfo:
    """In-cluster service account when running in a pod, else KUBECONFIG / ~/.kube/config.

    kopf's minimal loaders: tokens, client certificates and basic auth; no exec plugins."""
    settings = settings or kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig (KUBECONFIG or ~/.kube/config)")
    return info


class Kube:
    """The calls a reconcile makes, for the kinds a FineTuneJob owns."""

    def __init__(
        self,
        credentials: Callable[[], kopf.ConnectionInfo] = login,
        pool_size: int = 32,
        timeout: float = 60.0,
        on_response: Callable[[str, str, int], None] | None = None,
    ) -> None:
        """``credentials`` is asked again when the server answers 401 (a rotated service account
        token); ``on_response(verb, kind, status code)`` is told of every answer (request metrics).

        Must be built on the event loop that will use it (the aiohttp session binds to it)."""
        info = credentials()
        self._credentials = credentials
        self._on_response = on_response
        self._host = info.server.rstrip("/")
        self._auth = info.as_http_headers()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size, ssl=info.as_ssl_context()), trust_env=False
        )

    async def close(self) -> None:
        await self._session.close()

    async def _request(
        self,
        method: str,
        kind: str,
        namespace: str,
        name: str = "",
        *,
        subresource: str = "",
        body: Manifest | None = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Manifest:
        if namespace:
            path = _COLLECTIONS[kind].format(quote(namespace, safe=""))
        else:  # across all namespaces
            path = _COLLECTIONS[kind].replace("/namespaces/{}", "")
        path += "".join(f"/{quote(part, safe='')}" for part in (name, subresource) if part)
        reauthenticated = False
        for throttled in range(THROTTLE_RETRIES + 1):
            async with self._session.request(
                method,
                self._host + path,
                data=None if body is None else json.dumps(body),
                params=params,
                headers={"Accept": accept, "Content-Type": content_type, **self._auth},
                timeout=self._timeout,
            ) as response:
                data = await response.read()
                retry_after = response.headers.get("Retry-After")
            if self._on_response is not None:
                self._on_response(method, kind, response.status)
            if response.status == 401 and not reauthenticated:
                reauthenticated = True
                self._auth = self._credentials().as_http_headers()  # the token was rotated: read it again
            elif response.status == 429 and throttled < THROTTLE_RETRIES:
                await asyncio.sleep(_retry_after(retry_after))
            else:
                break
        if response.status >= 400:
            error = ConflictError if response.status == 409 else ApiError
            raise error(response.status, response.reason or "", data.decode("utf-8", "replace"))
        return cast(Manifest, decode_json(data))

    async def _unless_gone(self, method: str, kind: str, namespace: str, name: str, **kwargs: Any) -> Manifest | None:
        try:
            return await self._request(method, kind, namespace, name, **kwargs)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def create(self, manifest: Manifest) -> Manifest | None:
        """Create a child and return it as stored; None when it already existed."""
        try:
            return await self._request("POST", manifest["kind"], manifest["metadata"]["namespace"], body=manifest)
        except ApiError as error:
            if error.status == 409 or (error.status == 403 and "being terminated" in error.body):
                return None  # exists already / its namespace is going away with everything in it
            raise

    async def read_job(self, namespace: str, name: str) -> Manifest | None:
        return await self._unless_gone("GET", "Job", namespace, name)

    async def read(self, kind: str, namespace: str, name: str) -> Manifest | None:
        return await self._unless_gone("GET", kind, namespace, name)

    async def replace(self, manifest: Manifest, resource_version: str) -> None:
        """Bring a drifted child to what we generate (PUT, conditional on the version we read)."""
        metadata = manifest["metadata"]
        body = {**manifest, "metadata": {**metadata, "resourceVersion": resource_version}}
        await self._request("PUT", manifest["kind"], metadata["namespace"], metadata["name"], body=body)

    async def list_watched(
        self,
        kind: str,
        namespaces: Collection[str] = (),
        selector: str | None = None,
        *,
        metadata_only: bool = False,
    ) -> list[Manifest]:
        """Every object of a kind in the watched ``namespaces`` (empty: all of them, one cluster-wide
        LIST; otherwise one LIST per namespace, all that namespaced RBAC allows): the resync's check of
        the watches' caches. ``metadata_only``: names, labels and owners, not the (large) rest."""
        params = {"labelSelector": selector} if selector else None
        accept = PARTIAL_METADATA if metadata_only else "application/json"
        items: list[Manifest] = []
        for namespace in sorted(namespaces) or [""]:
            listed = await self._request("GET", kind, namespace, params=params, accept=accept)
            items += listed.get("items") or []  # a metadata list of nothing has "items": null
        return items

    async def list_in(self, kind: str, namespace: str, selector: str) -> list[Manifest]:
        """Every object of a kind in one namespace that the label selector matches (a fresh, quorum read)."""
        listed = await self._request("GET", kind, namespace, params={"labelSelector": selector})
        return cast(list[Manifest], listed.get("items") or [])

    async def annotate(self, kind: str, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Merge annotations into an object (a sweep pruning its trial); nothing when it is gone."""
        patch = {"metadata": {"annotations": annotations}}
        await self._unless_gone("PATCH", kind, namespace, name, body=patch, content_type=MERGE_PATCH)

    async def list_pods(self, namespace: str, selector: str) -> list[Manifest]:
        listed = await self._request("GET", "Pod", namespace, params={"labelSelector": selector})
        return cast(list[Manifest], listed["items"])

    async def list_kueue_workloads(self, namespace: str, job_uid: str) -> list[Manifest]:
        """Kueue's Workloads of one batch Job (by the label Kueue puts on them); none where Kueue is not installed."""
        try:
            listed = await self._request(
                "GET", "Workload", namespace, params={"labelSelector": f"kueue.x-k8s.io/job-uid={job_uid}"}
            )
        except ApiError as error:
            if error.status == 404:
                return []
            raise
        return cast(list[Manifest], listed.get("items") or [])

    async def set_kueue_workload_active(self, namespace: str, name: str, active: bool) -> None:
        """Kueue's off switch for a queued job: an inactive Workload is evicted and never admitted."""
        await self._unless_gone(
            "PATCH", "Workload", namespace, name, body={"spec": {"active": active}}, content_type=MERGE_PATCH
        )

    async def patch_job(self, namespace: str, name: str, patch: Manifest) -> None:
        await self._request("PATCH", "Job", namespace, name, body=patch, content_type=MERGE_PATCH)

    async def force_delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod without waiting for its node to confirm (a lost node never does)."""
        await self._unless_gone("DELETE", "Pod", namespace, name, params={"gracePeriodSeconds": "0"})

    async def delete_job(self, namespace: str, name: str, uid: str | None = None) -> None:
        """Delete a Job and, in the background, its pods; with ``uid`` only that very Job (else ``ConflictError``)."""
        options: Manifest = {"propagationPolicy": "Background"}
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        await self._unless_gone("DELETE", "Job", namespace, name, body=options)

    async def read_finetunejob(self, namespace: str, name: str) -> Manifest | None:
        return await self._unless_gone("GET", KIND, namespace, name)

    async def patch_status(
        self, namespace: str, name: str, status: Manifest, resource_version: str | None = None, kind: str = KIND
    ) -> Manifest | None:
        """JSON merge patch of the FineTuneJob status; only the keys given are touched.

        With ``resource_version`` the patch applies only to that version of the object (else
        ``ConflictError``), so a decision made on a stale read is never written. Returns the
        object as stored, or None when it is gone."""
        patch: Manifest = {"status": status}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        return await self._unless_gone(
            "PATCH", kind, namespace, name, subresource="status", body=patch, content_type=MERGE_PATCH
        )

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
                "kind": involved.get("kind", KIND),
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
        await self._request("POST", "Event", metadata["namespace"], body=event)
