"""The kopf shell: read, call the pure core, write. Level-based.

Every event of a FineTuneJob, of a child it owns (label-filtered), and a periodic timer all
lead to the same ``Reconciler.reconcile``; it looks at the world as it is now, so a missed,
repeated or reordered event cannot leave things wrong for longer than one resync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from finetune_operator.api import (
    GROUP,
    KIND,
    KUEUE_GROUP,
    KUEUE_VERSION,
    KUEUE_WORKLOADS,
    PLURAL,
    VERSION,
    FineTuneJob,
    FineTuneJobStatus,
    read_stored,
)
from finetune_operator.clients import CONFLICT_RETRIES, ApiError, ConflictError, Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile import Observed, Settings, decide, desired_children, invalid_spec
from finetune_operator.reconcile.children import (
    JOB_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Names,
    batch_job,
    controller_of,
    finished_job_patch,
    job_label_value,
    owned_by,
    owner_name,
)
from finetune_operator.reconcile.observe import (
    finetunejob_essentials,
    observe_admission,
    observe_job,
    observe_pod,
    spec_hash_of,
    status_patch,
    workload_essentials,
)
from finetune_operator.reconcile.status import Decision, Event, describe_validation, is_finished, not_understood

log = logging.getLogger("finetune_operator")
Manifest = dict[str, Any]
Key = tuple[str, str]
"""(namespace, name) of a FineTuneJob."""
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
CONTENT_FREE = frozenset({"ServiceAccount"})
"""Children with nothing to drift: never rewritten (the operator may not update them)."""
DELETED_MARK = "finetune.dev/deleted"
"""Key on a cached Job that is gone: its final state (Complete, say) is kept until recorded."""


def _key_of_child(body: Manifest) -> Key | None:
    """The FineTuneJob a child belongs to: its controller's name (the label may be a hash)."""
    name = owner_name(body)
    return None if name is None else (body["metadata"]["namespace"], name)


def _api_message(error: ApiError) -> str:
    try:
        return str(json.loads(error.body).get("message") or error.body)
    except (ValueError, AttributeError):
        return error.body or str(error)


def _expected_children(body: Manifest) -> list[tuple[str, str]]:
    """(kind, name) of the children a FineTuneJob's spec asks for, read without parsing it."""
    metadata, resources = body["metadata"], (body.get("spec") or {}).get("resources") or {}
    multi_node = int(resources.get("nodes") or 1) > 1
    names = Names.of(metadata["name"], multi_node=multi_node)
    expected = [("ConfigMap", names.config_map), ("Role", names.role), ("RoleBinding", names.role)]
    if not resources.get("serviceAccountName"):
        expected.append(("ServiceAccount", names.service_account))
    if multi_node:
        expected.append(("Service", names.service))
    return expected


class Reconciler:
    """Owns the per-job locks, the caches, the API client, the metrics and the settings.

    The caches hold the newest FineTuneJob and trainer Job the watches (and our own writes)
    delivered, so a reconcile costs no reads; they keep only the parts a reconcile reads. A cache
    may lag the API server for a moment; that is safe because every status write is conditional
    on the resourceVersion it was decided on: a stale decision is refused (``ConflictError``),
    and the job is read afresh and decided again.
    """

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        metrics: OperatorMetrics,
        max_concurrent_reconciles: int = 64,
        namespaces: tuple[str, ...] = (),
    ) -> None:
        """Reconciles beyond ``max_concurrent_reconciles`` wait, in arrival order, before building
        anything: a burst of a thousand new jobs would otherwise hold a thousand sets of child
        manifests and API answers at once (the process's memory never shrinks back from such a
        peak), while the API connections are the bottleneck anyway."""
        self.kube = kube
        self.namespaces = frozenset(namespaces)
        """The namespaces watched (empty: all of them)."""
        self.settings = settings
        self.metrics = metrics
        self.known: set[Key] = set()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(max_concurrent_reconciles)
        self._bodies: dict[Key, Manifest] = {}
        self._workloads: dict[Key, Manifest] = {}
        self._owners: dict[Key, Key] = {}
        """The job each trainer Job (namespace, name) belongs to, as the Jobs' watch events told."""
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

    def saw_workload(self, key: Key, body: Manifest, deleted: bool = False) -> None:
        """Cache the trainer Job from its watch event. A deleted Job that had finished (its TTL, say)
        is kept with a mark: its final state is the job's result and must be recorded, not re-run."""
        essentials = workload_essentials(body)
        observed = observe_job(essentials)
        trainer_job = (essentials["metadata"]["namespace"], essentials["metadata"]["name"])
        if not deleted:
            self._workloads[key] = essentials
            self._owners[trainer_job] = key
        elif (observed.complete or observed.failed_condition) and key in self.known:
            self._workloads[key] = {**essentials, DELETED_MARK: True}
        else:
            self._workloads.pop(key, None)
            self._owners.pop(trainer_job, None)

    def owner_of(self, namespace: str, trainer_job: str) -> Key | None:
        """The job whose trainer Job this is (None before the Job's first watch event)."""
        return self._owners.get((namespace, trainer_job))

    def forget(self, namespace: str, name: str) -> None:
        """Drop everything about a job; call with its lock held (``drop`` takes it)."""
        key = (namespace, name)
        self.known.discard(key)
        trainer_job = self._workloads.get(key)
        if trainer_job is not None:
            self._owners.pop((namespace, trainer_job["metadata"]["name"]), None)
        for cache in (self._bodies, self._workloads, self._written, self._desired_hashes):
            cache.pop(key, None)
        self.metrics.forget_job(namespace, name)

    async def drop(self, namespace: str, name: str) -> None:
        """Forget a deleted job after any reconcile of it in flight: one finishing after ``forget``
        would put its caches and metrics series back."""
        key = (namespace, name)
        async with self._locked(key):
            self.forget(namespace, name)
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            self._locks.pop(key, None)

    async def verify_caches(self) -> set[Key]:
        """Check the watches' caches against the API server; return the jobs missing a child.

        After a watch relist (410 Gone) kopf sends no DELETED for what vanished in the gap, and
        children deleted while the operator was down send nothing at all: FineTuneJobs no longer
        there are dropped (with their metrics series), Jobs no longer there leave the cache, and a
        job missing any child is reconciled with its children ensured. Seven LISTs per round,
        whatever the number of jobs (metadata only, except for the trainer Jobs' status)."""
        known_before = set(self.known)  # one seen while the list was under way is not a ghost
        listed = await self.kube.list_everywhere(KIND, metadata_only=True)
        present = {
            (o["metadata"]["namespace"], o["metadata"]["name"])
            for o in listed
            if not self.namespaces or o["metadata"]["namespace"] in self.namespaces
        }
        for namespace, name in sorted(known_before - present):
            log.info("%s/%s is gone (missed while the watch relisted): forgetting it", namespace, name)
            await self.drop(namespace, name)
        self.known |= present
        jobs: dict[Key, Manifest] = {}
        for trainer in await self.kube.list_everywhere("Job", OWNED_SELECTOR):
            key = _key_of_child(trainer)
            if key is not None:
                jobs[key] = trainer
        for key in present:
            cached = self._workloads.get(key)
            if key in jobs and cached is None:
                self.saw_workload(key, jobs[key])
            elif key not in jobs and cached is not None and not cached.get(DELETED_MARK):
                self._workloads.pop(key, None)  # deleted during the gap
        children: set[tuple[str, str, str]] = set()
        for kind in ("ConfigMap", "ServiceAccount", "Service", "Role", "RoleBinding"):
            for item in await self.kube.list_everywhere(kind, OWNED_SELECTOR, metadata_only=True):
                children.add((kind, item["metadata"]["namespace"], item["metadata"]["name"]))
        missing: set[Key] = set()
        for key in present:
            body = self._bodies.get(key)
            if body is not None and any(
                (kind, key[0], name) not in children for kind, name in _expected_children(body)
            ):
                missing.add(key)
        return missing

    async def resync_forever(self, interval: float, concurrency: int = 16) -> None:
        """Stall detection, stop enforcement after the grace period, and drift repair for every job:
        nothing stays wrong longer than one round."""
        limit = asyncio.Semaphore(concurrency)

        async def one(namespace: str, name: str, ensure: bool) -> None:
            async with limit:
                try:
                    await self.reconcile(namespace, name, ensure_children=ensure)
                except Exception:
                    log.exception("resync of %s/%s failed; retrying next round", namespace, name)

        while True:
            await asyncio.sleep(interval)
            try:
                missing = await self.verify_caches()
            except Exception:
                log.exception("checking the caches failed; retrying next round")
                missing = set()
            await asyncio.gather(*(one(ns, name, (ns, name) in missing) for ns, name in sorted(self.known)))

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
        key = (namespace, name)
        current = FineTuneJobStatus.model_validate(body.get("status") or {})
        try:
            job = read_stored({**body, "status": {}})  # the status is parsed once, above
            job.status = current  # decide() works on a copy
        except ValidationError as error:
            if is_finished(current):
                return  # a finished job stays finished, whatever this version makes of its spec
            message = describe_validation(error)
            if current.workload is not None:  # started under another version: never abandoned
                await self._write(body, current, not_understood(current, message, now), now)
            else:
                await self._write(body, current, invalid_spec(current, message, metadata.get("generation"), now), now)
            return

        names = Names.for_job(job)
        workload = self._workloads.get(key)
        if workload is None and current.workload is not None:
            workload = await self.kube.read_job(namespace, names.job)  # not watched yet (e.g. just restarted)
            if workload is not None:
                self.saw_workload(key, workload)
        conflicts: list[str] = []
        if workload is not None and not owned_by(workload, job):
            if workload.get(DELETED_MARK):
                self._workloads.pop(key, None)  # the final state of a namesake's Job: not ours
            else:
                conflicts.append(_conflict("Job", names.job, workload))
            workload = None
        observed_job = observe_job(workload) if workload is not None else None
        errors: list[str] = []
        ended = observed_job is not None and (observed_job.complete or observed_job.failed_condition)
        wanted = ensure_children or workload is None or current.workload is None
        if wanted and not is_finished(current) and not conflicts and not ended:
            stored, conflicts, errors = await self._create_children(job)
            workload = stored or workload
            observed_job = observe_job(workload) if workload is not None else None

        pods: tuple[Any, ...] = ()
        if observed_job is not None and (
            observed_job.failed_condition or (observed_job.active > observed_job.ready and not observed_job.suspended)
        ):  # why it failed, or why it is not running yet
            listed = await self.kube.list_pods(namespace, f"{JOB_LABEL}={job_label_value(name)}")
            pods = tuple(observe_pod(p) for p in listed)
        queued: list[Manifest] = []  # Kueue's Workload, read only while Kueue holds the Job
        stopping = job.spec.suspend or current.stop_request is not None
        if job.queue_name is not None and workload is not None and observed_job is not None:
            held = observed_job.suspended or stopping
            uid = workload["metadata"].get("uid")
            queued = await self.kube.list_workloads(namespace, uid) if held and uid and not ended else []
        observed = Observed(
            job=observed_job,
            pods=pods,
            conflicts=tuple(conflicts),
            create_errors=tuple(errors),
            admission=observe_admission(queued),
        )
        decision = decide(job, observed, now)

        for pod in decision.stuck_pods:
            await self.kube.force_delete_pod(namespace, pod)
        live = workload is not None and observed_job is not None and not workload.get(DELETED_MARK)
        if live and workload is not None and observed_job is not None and decision.workload_wanted:
            await self._steer_workload(job, workload, observed_job.suspended, decision)
            await self._steer_admission(job, queued, decision)
        await self._write(body, current, decision, now)
        ttl = (
            finished_job_patch(job, workload)
            if live and workload is not None and is_finished(decision.status)
            else None
        )
        if ttl is not None:  # only now that the result is recorded may the Job controller delete the Job
            await self.kube.patch_job(namespace, names.job, ttl)

    async def _create_children(self, job: FineTuneJob) -> tuple[Manifest | None, list[str], list[str]]:
        """Create whatever children are missing, in waves, and bring drifted ones back to the spec.
        The RoleBinding waits for its Role: the API server checks that a binder without ``bind``
        holds what the Role grants, and cannot while the Role does not exist. The trainer Job is
        last: its pods need the rest. A wave with a conflict or a refusal stops the next ones.

        Returns (the trainer Job as stored, ownership conflicts, refusals)."""
        children = desired_children(job, self.settings)
        created: Manifest | None = None
        conflicts: list[str] = []
        errors: list[str] = []
        for wave in range(max(CREATION_WAVE.values()) + 1):
            batch = [c for c in children if CREATION_WAVE.get(c["kind"], 0) == wave]
            results = await asyncio.gather(*(self._ensure(c, job) for c in batch))
            for child, (stored, conflict, error) in zip(batch, results, strict=True):
                created = stored if child["kind"] == "Job" and stored is not None else created
                conflicts += [conflict] if conflict else []
                errors += [error] if error else []
            if conflicts or errors:
                break
        return created, conflicts, errors

    async def _ensure(self, child: Manifest, job: FineTuneJob) -> tuple[Manifest | None, str | None, str | None]:
        """One child: (the object as stored, for the Job; a conflict; the API server's refusal)."""
        kind, namespace, name = child["kind"], child["metadata"]["namespace"], child["metadata"]["name"]
        try:
            stored = await self.kube.create(child)
            if stored is not None:
                log.info("created %s %s/%s", kind, namespace, name)
                return stored, None, None
            existing = await self.kube.read(kind, namespace, name)
            if existing is None:
                return None, None, None  # gone again meanwhile: the next round creates it
            if not owned_by(existing, job):
                return None, _conflict(kind, name, existing), None
            if kind == "Job":
                return existing, None, None  # drift of the Job itself is _steer_workload's
            if kind not in CONTENT_FREE and spec_hash_of(existing) != spec_hash_of(child):
                log.info("%s %s/%s drifted from the spec: replacing its content", kind, namespace, name)
                await self.kube.replace(child, existing["metadata"]["resourceVersion"])
            return None, None, None
        except ConflictError:
            return None, None, None  # changed while we looked: the next round looks again
        except ApiError as error:
            log.warning("could not create %s %s/%s: %s", kind, namespace, name, error)
            return None, None, f"{kind} {name}: {_api_message(error)}"

    async def _steer_workload(self, job: FineTuneJob, workload: Manifest, suspended: bool, decision: Decision) -> None:
        """Keep the Job's suspend flag and template in line with the spec (and a stop being enforced)."""
        namespace, name = job.metadata.namespace, Names.for_job(job).job
        want_suspended = decision.halt_workload or (job.spec.suspend and decision.status.stop_request is None)
        if suspended and not decision.halt_workload and spec_hash_of(workload) != self._desired_hash(job):
            # Edited while suspended (the only time the CRD allows it): replace the Job; it resumes
            # from the last checkpoint. The Job's DELETED event brings us back to recreate it.
            log.info("spec changed while suspended: replacing Job %s/%s", namespace, name)
            await self.kube.delete_job(namespace, name)
            return
        if suspended != want_suspended and not (job.queue_name is not None and not want_suspended):
            # A queued Job is unsuspended by Kueue alone, when it admits it.
            await self.kube.patch_job(namespace, name, {"spec": {"suspend": want_suspended}})

    async def _steer_admission(self, job: FineTuneJob, workloads: list[Manifest], decision: Decision) -> None:
        """Kueue unsuspends any Job it has admitted: to keep a queued job suspended (the user's
        spec.suspend, or a stop being enforced) its Workload is deactivated, and activated again after."""
        want_active = not (decision.halt_workload or (job.spec.suspend and decision.status.stop_request is None))
        for found in workloads:
            if bool((found.get("spec") or {}).get("active", True)) != want_active:
                metadata = found["metadata"]
                log.info("Kueue Workload %s/%s: active=%s", metadata["namespace"], metadata["name"], want_active)
                await self.kube.set_workload_active(metadata["namespace"], metadata["name"], want_active)

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
            [e.reason for e in decision.events],
            decision.status,
            (now - created).total_seconds(),
            first_run=current.start_time is None,
        )
        self.metrics.observe_job(namespace, name, decision.status)

    async def _post(self, body: Manifest, event: Event, now: datetime) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
        try:
            await self.kube.post_event(body, event.type, event.reason, event.message, now)
        except ApiError as error:  # an event is best effort; the status already says it
            log.warning("could not post event %s on %s/%s: %s", event.reason, namespace, name, error.reason)


def _conflict(kind: str, name: str, existing: Manifest) -> str:
    owner = controller_of(existing)
    holder = f"{owner.get('kind')} {owner.get('name')} (uid {owner.get('uid')})" if owner else "no controller"
    return f"{kind} {name} exists and is controlled by {holder}, not by this FineTuneJob; waiting for it to go"


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
            await reconciler.drop(namespace, name)
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
        key = _key_of_child(dict(body))
        if key is None:
            return
        reconciler.saw_workload(key, dict(body), deleted=type == "DELETED")
        await reconciler.reconcile(*key, ensure_children=type == "DELETED")

    @kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, KUEUE_WORKLOADS, registry=registry)
    async def kueue_workload_event(body: kopf.Body, **_: Any) -> None:
        # Kueue writes its verdict on a queued job (waiting and why, inadmissible, admitted, evicted) on the
        # Workload; the trainer Job changes only when admitted or suspended. Where Kueue is not installed, kopf
        # warns that it cannot serve this handler, and serves it once Kueue's CRDs appear (it watches CRDs).
        references = body["metadata"].get("ownerReferences") or []
        owner = next((r for r in references if r.get("kind") == "Job" and r.get("apiVersion") == "batch/v1"), None)
        key = reconciler.owner_of(body["metadata"]["namespace"], owner["name"]) if owner else None
        if key is not None:
            await reconciler.reconcile(*key)

    for group, version, plural in CHILD_KINDS:

        @kopf.on.event(group, version, plural, labels=owned, registry=registry)
        async def child_event(type: str, body: kopf.Body, **_: Any) -> None:
            key = _key_of_child(dict(body))
            if type == "DELETED" and key is not None and key in reconciler.known:
                await reconciler.reconcile(*key, ensure_children=True)
