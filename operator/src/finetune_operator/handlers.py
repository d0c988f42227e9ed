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
from typing import Any, cast

import kopf
from pydantic import ValidationError

from finetune_operator.api import GROUP, PLURAL, VERSION, FineTuneJob, FineTuneJobStatus
from finetune_operator.clients import ApiError, ConflictError, Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile import Observed, Settings, decide, desired_children, invalid_spec
from finetune_operator.reconcile.children import JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL, Names, batch_job
from finetune_operator.reconcile.observe import (
    finetunejob_essentials,
    observe_job,
    observe_pod,
    spec_hash_of,
    status_patch,
    workload_essentials,
)
from finetune_operator.reconcile.status import Decision, Event, is_finished

log = logging.getLogger("finetune_operator")
Manifest = dict[str, Any]
Key = tuple[str, str]
"""(namespace, name) of a FineTuneJob."""
CONFLICT_RETRIES = 5
CREATION_WAVE = {"RoleBinding": 1, "Job": 2}
"""Children are created in waves, all of one wave at once; kinds not named here are in wave 0."""
OWNED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY},{JOB_LABEL}"
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
    """Owns the per-job locks, the caches, the API client, the metrics and the settings.

    The caches hold the newest FineTuneJob and trainer Job the watches (and our own writes)
    delivered, so a reconcile costs no reads; they keep only the parts a reconcile reads. A cache
    may lag the API server for a moment; that is safe because every status write is conditional
    on the resourceVersion it was decided on: a stale decision is refused (``ConflictError``),
    and the job is read afresh and decided again.
    """

    def __init__(
        self, kube: Kube, settings: Settings, metrics: OperatorMetrics, max_concurrent_reconciles: int = 64
    ) -> None:
        """Reconciles beyond ``max_concurrent_reconciles`` wait, in arrival order, before building
        anything: a burst of a thousand new jobs would otherwise hold a thousand sets of child
        manifests and API answers at once (the process's memory never shrinks back from such a
        peak), while the API connections are the bottleneck anyway."""
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.known: set[Key] = set()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(max_concurrent_reconciles)
        self._bodies: dict[Key, Manifest] = {}
        self._workloads: dict[Key, Manifest] = {}
        self._written: dict[Key, str] = {}
        """resourceVersion of our own last status write, per job: its watch event needs no reconcile."""
        self._desired_hashes: dict[Key, tuple[tuple[str | None, int | None], str | None]] = {}
        """((uid, generation), spec hash) of the Job a job's spec asks for: the spec changes only with
        the generation, and rendering the Job to hash it was a third of a reconcile's CPU."""
        self.resync_task: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def _locked(self, key: Key) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            yield

    def saw_finetunejob(self, body: Manifest) -> bool:
        """Cache a FineTuneJob from its watch event; False when it is our own write coming back."""
        metadata = body["metadata"]
        key = (metadata["namespace"], metadata["name"])
        self.known.add(key)
        self._bodies[key] = finetunejob_essentials(body)
        version = metadata.get("resourceVersion")
        return version is None or self._written.get(key) != version

    def saw_workload(self, key: Key, body: Manifest | None) -> None:
        """Cache the trainer Job from its watch event (None: it was deleted)."""
        if body is None:
            self._workloads.pop(key, None)
        else:
            self._workloads[key] = workload_essentials(body)

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self.known.discard(key)
        for cache in (self._bodies, self._workloads, self._written, self._locks, self._desired_hashes):
            cache.pop(key, None)
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
        key = (namespace, name)
        async with self._locked(key), self._slots:
            started = time.perf_counter()
            try:
                for attempt in range(CONFLICT_RETRIES):
                    body = self._bodies.get(key)
                    if body is None:
                        read = await self.kube.read_finetunejob(namespace, name)
                        body = None if read is None else finetunejob_essentials(read)
                    if body is None or body["metadata"].get("deletionTimestamp"):
                        self.forget(namespace, name)
                        return
                    self._bodies[key] = body
                    try:
                        await self._reconcile(body, ensure_children)
                        return
                    except ConflictError:
                        self._bodies.pop(key, None)  # decided on a stale copy: read it afresh
                        if attempt == CONFLICT_RETRIES - 1:
                            raise
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
            job = FineTuneJob.model_validate({**body, "status": {}})  # the status is parsed once, above
            job.status = current  # decide() works on a copy
        except ValidationError as error:
            decision = invalid_spec(current, _describe_validation(error), metadata.get("generation"), now)
            await self._write(body, current, decision, now)
            return

        names = Names.of(name)
        workload = self._workloads.get((namespace, name))
        if workload is None and current.workload is not None:
            workload = await self.kube.read_job(namespace, names.job)  # not watched yet (e.g. just restarted)
        if not is_finished(current) and (ensure_children or workload is None or current.workload is None):
            workload = await self._create_children(job) or workload
            if workload is None:  # it existed already
                workload = await self.kube.read_job(namespace, names.job)

        observed_job = observe_job(workload) if workload is not None else None
        pods: tuple[Any, ...] = ()
        if observed_job is not None and observed_job.failed_condition:
            listed = await self.kube.list_pods(namespace, f"{JOB_LABEL}={name}")
            pods = tuple(observe_pod(p) for p in listed)
        decision = decide(job, Observed(job=observed_job, pods=pods), now)

        if workload is not None and observed_job is not None and decision.workload_wanted:
            await self._steer_workload(job, workload, observed_job.suspended, decision)
        await self._write(body, current, decision, now)

    async def _create_children(self, job: FineTuneJob) -> Manifest | None:
        """Create whatever children are missing, in waves. The RoleBinding waits for its Role: the
        API server checks that a binder without ``bind`` holds what the Role grants, and cannot
        while the Role does not exist. The trainer Job is last: its pods need the rest.
        Returns the Job when this call created it."""
        children = desired_children(job, self.settings)
        created: Manifest | None = None
        for wave in range(max(CREATION_WAVE.values()) + 1):
            batch = [c for c in children if CREATION_WAVE.get(c["kind"], 0) == wave]
            for child, stored in zip(batch, await asyncio.gather(*(self.kube.create(c) for c in batch)), strict=True):
                if stored is not None:
                    log.info(
                        "created %s %s/%s", child["kind"], child["metadata"]["namespace"], child["metadata"]["name"]
                    )
                    created = stored if child["kind"] == "Job" else created
        return created

    async def _steer_workload(self, job: FineTuneJob, workload: Manifest, suspended: bool, decision: Decision) -> None:
        """Keep the Job's suspend flag and template in line with the spec (and a stop being enforced)."""
        namespace, name = job.metadata.namespace, Names.of(job.metadata.name).job
        want_suspended = decision.halt_workload or (job.spec.suspend and decision.status.stop_request is None)
        if suspended and not decision.halt_workload and spec_hash_of(workload) != self._desired_hash(job):
            # Edited while suspended (the only time the CRD allows it): replace the Job; it resumes
            # from the last checkpoint. The Job's DELETED event brings us back to recreate it.
            log.info("spec changed while suspended: replacing Job %s/%s", namespace, name)
            await self.kube.delete_job(namespace, name)
            return
        if suspended != want_suspended:
            await self.kube.patch_job(namespace, name, {"spec": {"suspend": want_suspended}})

    def _desired_hash(self, job: FineTuneJob) -> str | None:
        key, version = (job.metadata.namespace, job.metadata.name), (job.metadata.uid, job.metadata.generation)
        cached = self._desired_hashes.get(key)
        if cached is not None and cached[0] == version and job.metadata.generation is not None:
            return cached[1]
        spec_hash = spec_hash_of(batch_job(job, self.settings))  # suspend is not part of the hash
        self._desired_hashes[key] = (version, spec_hash)
        return spec_hash

    async def _write(self, body: Manifest, current: FineTuneJobStatus, decision: Decision, now: datetime) -> None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        patch = status_patch(current, decision.status)
        if patch:
            stored = await self.kube.patch_status(namespace, name, patch, metadata.get("resourceVersion"))
            if stored is None:
                self.forget(namespace, name)  # deleted meanwhile: nothing to record
                return
            self._bodies[(namespace, name)] = finetunejob_essentials(stored)
            self._written[(namespace, name)] = stored["metadata"]["resourceVersion"]
        await asyncio.gather(*(self._post(body, event, now) for event in decision.events))
        created = datetime.fromisoformat(metadata.get("creationTimestamp", now.isoformat()).replace("Z", "+00:00"))
        self.metrics.record_transitions(
            [e.reason for e in decision.events], decision.status, (now - created).total_seconds()
        )
        self.metrics.observe_job(namespace, name, decision.status)

    async def _post(self, body: Manifest, event: Event, now: datetime) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
        try:
            await self.kube.post_event(body, event.type, event.reason, event.message, now)
        except ApiError as error:  # an event is best effort; the status already says it
            log.warning("could not post event %s on %s/%s: %s", event.reason, namespace, name, error.reason)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base is for on.create/on.update handlers; ours are all on.event, level-based.

    The default storage deep-copies every object on every event to build one anyway, which at a
    thousand jobs is a tenth of the operator's CPU."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, resync_seconds: float) -> None:
    """Attach the handlers to a kopf registry (one per operator instance, so tests can run several)."""

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def finetunejob_event(type: str, body: kopf.Body, **_: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if type == "DELETED" or body["metadata"].get("deletionTimestamp"):
            reconciler.forget(namespace, name)
        elif reconciler.saw_finetunejob(dict(body)):  # else the echo of our own status write
            await reconciler.reconcile(namespace, name)

    @kopf.on.startup(registry=registry)
    async def skip_diff_base(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.diffbase_storage = NoDiffBase()

    @kopf.on.startup(registry=registry)
    async def watch_only_our_children(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Server-side: the label filters on the handlers below are applied by kopf after the
        # fact, so without this every ConfigMap, ServiceAccount, Role ... in the cluster would
        # be sent to the operator and remembered by kopf.
        for group, _version, plural in (("batch", "v1", "jobs"), *CHILD_KINDS):
            settings.watching.label_selectors[group, plural] = OWNED_SELECTOR

    @kopf.on.startup(registry=registry)
    async def start_resync(**_: Any) -> None:
        # One loop for all jobs instead of a kopf timer per job: timers need a finalizer on
        # every FineTuneJob, and ownerReferences already make deletion clean without one.
        reconciler.resync_task = asyncio.create_task(reconciler.resync_forever(resync_seconds))

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(**_: Any) -> None:
        if reconciler.resync_task is not None:
            reconciler.resync_task.cancel()

    owned: dict[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY, JOB_LABEL: kopf.PRESENT}

    @kopf.on.event("batch", "v1", "jobs", labels=owned, registry=registry)
    async def job_event(type: str, body: kopf.Body, **_: Any) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["labels"][JOB_LABEL])
        reconciler.saw_workload(key, None if type == "DELETED" else dict(body))
        await reconciler.reconcile(*key, ensure_children=type == "DELETED")

    for group, version, plural in CHILD_KINDS:

        @kopf.on.event(group, version, plural, labels=owned, registry=registry)
        async def child_event(type: str, body: kopf.Body, **_: Any) -> None:
            if type == "DELETED":
                await reconciler.reconcile(
                    body["metadata"]["namespace"], body["metadata"]["labels"][JOB_LABEL], ensure_children=True
                )
