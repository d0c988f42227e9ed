"""The kopf shell: read, call the pure core, write. Level-based.

Every event of a FineTuneJob, of a child it owns (label-filtered), and a periodic timer all
lead to the same ``Reconciler.reconcile``; it looks at the world as it is now, so a missed,
repeated or reordered event cannot leave things wrong for longer than one resync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from finetune_operator.api import GROUP, PLURAL, VERSION, FineTuneJob, FineTuneJobStatus
from finetune_operator.clients import Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile import Observed, Settings, decide, desired_children, invalid_spec
from finetune_operator.reconcile.children import JOB_LABEL, MANAGED_BY, Names, batch_job
from finetune_operator.reconcile.observe import observe_job, observe_pod, spec_hash_of, status_patch
from finetune_operator.reconcile.status import Decision, is_finished

log = logging.getLogger("finetune_operator")
Manifest = dict[str, Any]
CHILD_KINDS = (
    ("", "v1", "configmaps"),
    ("", "v1", "serviceaccounts"),
    ("", "v1", "services"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
)


def _describe_validation(error: ValidationError) -> str:
    """One line per problem, each naming the field as users wrote it (spec.a.b)."""
    parts = []
    for problem in error.errors():
        location = ".".join(str(p) for p in problem["loc"])
        parts.append(f"{location}: {problem['msg']}")
    return "invalid spec: " + "; ".join(parts)


class Reconciler:
    """Owns the per-job locks, the API client, the metrics and the settings."""

    def __init__(self, kube: Kube, settings: Settings, metrics: OperatorMetrics) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.known: set[tuple[str, str]] = set()
        self._written: dict[tuple[str, str], str] = {}
        """resourceVersion of our own last status write, per job: its watch event needs no reconcile."""
        self.resync_task: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def _locked(self, namespace: str, name: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            yield

    def is_own_write(self, namespace: str, name: str, resource_version: str | None) -> bool:
        return resource_version is not None and self._written.get((namespace, name)) == resource_version

    def forget(self, namespace: str, name: str) -> None:
        self.known.discard((namespace, name))
        self._written.pop((namespace, name), None)
        self._locks.pop((namespace, name), None)
        self.metrics.forget_job(namespace, name)

    async def resync_forever(self, interval: float, concurrency: int = 16) -> None:
        """Stall detection, stop enforcement after the grace period, and drift repair for every job."""
        limit = asyncio.Semaphore(concurrency)

        async def one(namespace: str, name: str) -> None:
            async with limit:
                try:
                    await self.reconcile(namespace, name)
                except Exception:
                    log.exception("resync of %s/%s failed; retrying next round", namespace, name)

        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(one(ns, name) for ns, name in sorted(self.known)))

    async def reconcile(self, namespace: str, name: str, *, ensure_children: bool = False) -> None:
        """Bring one FineTuneJob and its children in line with the world as it is now."""
        async with self._locked(namespace, name):
            started = time.perf_counter()
            try:
                # Read under the lock: an event's body may predate a status we just wrote.
                body = await self.kube.read_finetunejob(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    self.forget(namespace, name)
                    return
                await self._reconcile(body, ensure_children)
            except Exception:
                self.metrics.reconcile_errors.inc()
                raise
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    async def _reconcile(self, body: Manifest, ensure_children: bool) -> None:
        now = datetime.now(UTC)
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        current = FineTuneJobStatus.model_validate(body.get("status") or {})
        try:
            job = FineTuneJob.model_validate(body)
        except ValidationError as error:
            decision = invalid_spec(current, _describe_validation(error), metadata.get("generation"), now)
            await self._write(body, current, decision, now)
            return

        names = Names.of(name)
        workload = await self.kube.read_job(namespace, names.job)
        if not is_finished(current) and (ensure_children or workload is None or current.workload is None):
            for child in desired_children(job, self.settings):
                created = await self.kube.create(child)
                if created is not None:
                    log.info("created %s %s/%s", child["kind"], namespace, child["metadata"]["name"])
                    if child["kind"] == "Job":
                        workload = created

        observed_job = observe_job(workload) if workload is not None else None
        pods: tuple[Any, ...] = ()
        if observed_job is not None and observed_job.failed_condition:
            listed = await self.kube.list_pods(namespace, f"{JOB_LABEL}={name}")
            pods = tuple(observe_pod(p) for p in listed)
        decision = decide(job, Observed(job=observed_job, pods=pods), now)

        if workload is not None and observed_job is not None and decision.workload_wanted:
            await self._steer_workload(job, workload, observed_job.suspended, decision)
        await self._write(body, current, decision, now)

    async def _steer_workload(self, job: FineTuneJob, workload: Manifest, suspended: bool, decision: Decision) -> None:
        """Keep the Job's suspend flag and template in line with the spec (and a stop being enforced)."""
        namespace, name = job.metadata.namespace, Names.of(job.metadata.name).job
        want_suspended = decision.halt_workload or (job.spec.suspend and decision.status.stop_request is None)
        desired = batch_job(job, self.settings, suspend=want_suspended)
        if spec_hash_of(workload) != spec_hash_of(desired) and suspended and not decision.halt_workload:
            # Edited while suspended (the only time the CRD allows it): replace the Job; it resumes
            # from the last checkpoint. The Job's DELETED event brings us back to recreate it.
            log.info("spec changed while suspended: replacing Job %s/%s", namespace, name)
            await self.kube.delete_job(namespace, name)
            return
        if suspended != want_suspended:
            await self.kube.patch_job(namespace, name, {"spec": {"suspend": want_suspended}})

    async def _write(self, body: Manifest, current: FineTuneJobStatus, decision: Decision, now: datetime) -> None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        patch = status_patch(current, decision.status)
        if patch:
            version = await self.kube.patch_status(namespace, name, patch)
            if version is None:
                self.forget(namespace, name)  # deleted meanwhile: nothing to record
                return
            self._written[(namespace, name)] = version
        for event in decision.events:
            log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
            try:
                await self.kube.post_event(body, event.type, event.reason, event.message, now)
            except ApiException as error:  # an event is best effort; the status already says it
                log.warning("could not post event %s on %s/%s: %s", event.reason, namespace, name, error.reason)
        created = datetime.fromisoformat(metadata.get("creationTimestamp", now.isoformat()).replace("Z", "+00:00"))
        self.metrics.record_transitions(
            [e.reason for e in decision.events], decision.status, (now - created).total_seconds()
        )
        self.metrics.observe_job(namespace, name, decision.status)


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, resync_seconds: float) -> None:
    """Attach the handlers to a kopf registry (one per operator instance, so tests can run several)."""

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def finetunejob_event(type: str, body: kopf.Body, **_: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if type == "DELETED" or body["metadata"].get("deletionTimestamp"):
            reconciler.forget(namespace, name)
            return
        reconciler.known.add((namespace, name))
        if reconciler.is_own_write(namespace, name, body["metadata"].get("resourceVersion")):
            return  # the echo of our own status patch: nothing new to look at
        await reconciler.reconcile(namespace, name)

    @kopf.on.startup(registry=registry)
    async def start_resync(**_: Any) -> None:
        # One loop for all jobs instead of a kopf timer per job: timers need a finalizer on
        # every FineTuneJob, and ownerReferences already make deletion clean without one.
        reconciler.resync_task = asyncio.create_task(reconciler.resync_forever(resync_seconds))

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(**_: Any) -> None:
        if reconciler.resync_task is not None:
            reconciler.resync_task.cancel()

    owned: dict[str, Any] = {"app.kubernetes.io/managed-by": MANAGED_BY, JOB_LABEL: kopf.PRESENT}

    @kopf.on.event("batch", "v1", "jobs", labels=owned, registry=registry)
    async def job_event(type: str, body: kopf.Body, **_: Any) -> None:
        await reconciler.reconcile(
            body["metadata"]["namespace"],
            body["metadata"]["labels"][JOB_LABEL],
            ensure_children=type == "DELETED",
        )

    for group, version, plural in CHILD_KINDS:

        @kopf.on.event(group, version, plural, labels=owned, registry=registry)
        async def child_event(type: str, body: kopf.Body, **_: Any) -> None:
            if type == "DELETED":
                await reconciler.reconcile(
                    body["metadata"]["namespace"], body["metadata"]["labels"][JOB_LABEL], ensure_children=True
                )
