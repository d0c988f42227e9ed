"""The kopf shell: read, call the pure core, write. Level-based.

Every event of a FineTuneJob, of a child it owns (label-filtered), and a periodic timer all
lead to the same ``Reconciler.reconcile``; it looks at the world as it is now, so a missed,
repeated or reordered event cannot leave things wrong for longer than one resync.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from kopf._core.reactor.inventory import ResourceMemories, ResourceMemory
from pydantic import ValidationError

from finetune_operator.api.job import (
    GROUP,
    KIND,
    KUEUE_GROUP,
    KUEUE_VERSION,
    KUEUE_WORKLOADS,
    PLURAL,
    VERSION,
    FineTuneJob,
    FineTuneJobStatus,
    ObjectMeta,
    read_stored,
)
from finetune_operator.controller.clients import ApiError, ConflictError, Kube
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.shell import Key, Manifest, ObjectLoop, register_kind
from finetune_operator.reconcile import Observed, Settings, decide
from finetune_operator.reconcile.children import (
    JOB_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Names,
    batch_job,
    child_refs,
    content_hash,
    content_hashes,
    desired_children,
    job_label_value,
    owned_by,
    owner_name,
)
from finetune_operator.reconcile.kinds import BY_KIND, CHILD_KINDS, SUPPORTING_KINDS, TRAINER_JOB
from finetune_operator.reconcile.observe import (
    DELETED_MARK,
    finetunejob_essentials,
    observe_admission,
    observe_job,
    observe_kueue_workloads,
    observe_pod,
    spec_hash_of,
    status_patch,
    trainer_job_essentials,
)
from finetune_operator.reconcile.status import Decision, describe_validation
from finetune_operator.reconcile.steer import (
    children_wanted,
    conflict,
    content_drifted,
    desired_hash_wanted,
    kueue_wanted,
    pods_wanted,
    refused_in_operator_namespace,
    repair,
    trainer_job_patch,
    trainer_job_to_read,
    unreadable_spec,
)

log = logging.getLogger("finetune_operator")

Ensured = tuple[Manifest | None, str | None, str | None]
"""One child ensured: (the object as stored, kept for the trainer Job; a conflict; the API server's refusal)."""
OWNED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY},{JOB_LABEL}"


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
    """(kind, name) of the children beside the trainer Job that a FineTuneJob's spec asks for, read without
    parsing it."""
    resources = (body.get("spec") or {}).get("resources") or {}
    nodes, account = int(resources.get("nodes") or 1), resources.get("serviceAccountName") or None
    refs = child_refs(body["metadata"]["name"], nodes=nodes, service_account_name=account)
    return [(kind, name) for kind, name in refs if kind != TRAINER_JOB.kind]


PARSED_JOBS = 512
"""Jobs whose parsed spec the reconciler keeps (``Reconciler._parse``)."""
_PARSED_METADATA = tuple(field.alias or name for name, field in ObjectMeta.model_fields.items())
"""The metadata a parsed FineTuneJob keeps."""


def _as_reconciled(trainer_job: Manifest) -> tuple[Any, ...]:
    """What a reconcile reads of a cached trainer Job: its identity, owner and observation."""
    metadata = trainer_job["metadata"]
    return metadata.get("uid"), metadata.get("ownerReferences"), observe_job(trainer_job)


class PackedCache:
    """Manifests by job, each kept as compact JSON and decoded when read. As dicts, every key and value
    is an object of its own: a cached FineTuneJob took ~13.6 KB so and takes ~2.4 KB packed, its trainer
    Job's essentials ~4.3 KB and ~0.7 KB; one of each is kept per job. Decoding one costs ~20 us, a
    reconcile ~20 ms."""

    def __init__(self) -> None:
        self.packed: dict[Key, str] = {}

    def get(self, key: Key) -> Manifest | None:
        packed = self.packed.get(key)
        return None if packed is None else cast(Manifest, json.loads(packed))

    def __setitem__(self, key: Key, manifest: Manifest) -> None:
        self.packed[key] = json.dumps(manifest, separators=(",", ":"))

    def pop(self, key: Key, default: None = None) -> None:
        self.packed.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self.packed


class Reconciler(ObjectLoop):
    """A FineTuneJob's observe, decide and execute, in the shared shell (locks, retries, resync).

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
        super().__init__(kube, metrics, kind=KIND, log=log, max_concurrent=max_concurrent_reconciles)
        self.namespaces = frozenset(namespaces)
        """The namespaces watched (empty: all of them)."""
        self.settings = settings
        self._bodies = PackedCache()
        self._trainer_jobs = PackedCache()
        self._owners: dict[Key, Key] = {}
        """The job each trainer Job (namespace, name) belongs to, as the Jobs' watch events told."""
        self._written: dict[Key, str] = {}
        """resourceVersion of our own last status write, per job: its watch event needs no reconcile."""
        self._desired_hashes: dict[Key, tuple[tuple[str | None, int | None], str | None]] = {}
        """((uid, generation), spec hash) of the Job a job's spec asks for: the spec changes only with
        the generation, and rendering the Job to hash it was a third of a reconcile's CPU."""
        self._parsed: dict[Key, tuple[tuple[Any, ...], FineTuneJob]] = {}
        """The FineTuneJob parsed from a job's body (status aside), with what it was parsed from: a
        progress report changes the status alone, and parsing the spec afresh was a tenth of its CPU.
        Least recently used first, at most ``PARSED_JOBS``: a parsed job is ~10 KB, and only the jobs
        whose trainers report (running ones) come back often."""
        self._desired_contents: dict[Key, tuple[tuple[str | None, int | None], dict[tuple[str, str], str]]] = {}
        """((uid, generation), content hash by (kind, name)) of the children beside the trainer Job that the
        spec asks for, rendered once per generation: a child's event is checked against it."""
        self._held_contents: dict[Key, dict[tuple[str, str], str]] = {}
        """Content hash by (kind, name) of each child as its last watch event showed it."""
        self._ensured_since_check: set[Key] | None = None
        """Jobs whose children were all ensured after the running resync round began listing them (None
        between rounds): that round's flag on such a job is stale. A burst's jobs still queued for their first
        reconcile have no children in the round's lists, and flagged they were ensured twice: every child
        POSTed again to come back AlreadyExists, the Role and RoleBinding paying the API server's RBAC check."""

    def saw(self, body: Manifest) -> bool:
        """Cache a FineTuneJob from its watch event; False when it is our own write coming back."""
        metadata = body["metadata"]
        key = (metadata["namespace"], metadata["name"])
        self.known.add(key)
        self._bodies[key] = finetunejob_essentials(body)
        version = metadata.get("resourceVersion")
        return version is None or self._written.get(key) != version

    def saw_trainer_job(self, key: Key, body: Manifest, deleted: bool = False) -> bool:
        """Cache the trainer Job from its watch event. A deleted Job that had finished (its TTL, say)
        is kept with a mark: its final state is the job's result and must be recorded, not re-run.

        Returns False when a reconcile would see nothing new: the Job as cached already looked the same
        to it (the Job we just created coming back as ADDED, a status change it does not read)."""
        essentials = trainer_job_essentials(body)
        trainer_job = (essentials["metadata"]["namespace"], essentials["metadata"]["name"])
        before = self._trainer_jobs.get(key)
        if not deleted:
            self._trainer_jobs[key] = essentials
            self._owners[trainer_job] = key
        elif observe_job(essentials).ended and key in self.known:
            self._trainer_jobs[key] = {**essentials, DELETED_MARK: True}
        else:
            self._trainer_jobs.pop(key, None)
            self._owners.pop(trainer_job, None)
        after = self._trainer_jobs.get(key)
        return before is None or after is None or _as_reconciled(before) != _as_reconciled(after)

    def owner_of(self, namespace: str, trainer_job: str) -> Key | None:
        """The job whose trainer Job this is (None before the Job's first watch event)."""
        return self._owners.get((namespace, trainer_job))

    def forget_key(self, key: Key) -> None:
        namespace = key[0]
        trainer_job = self._trainer_jobs.get(key)
        if trainer_job is not None:
            self._owners.pop((namespace, trainer_job["metadata"]["name"]), None)
        caches = (self._bodies, self._trainer_jobs, self._written, self._desired_hashes, self._parsed)
        for cache in (*caches, self._desired_contents, self._held_contents):
            cache.pop(key, None)
        if self._ensured_since_check is not None:
            self._ensured_since_check.discard(key)
        self.metrics.forget_job(*key)

    def saw_child(self, key: Key, body: Manifest, deleted: bool = False) -> bool:
        """Note a child's content from its watch event; True when it differs from what the spec asks for
        (an edit: its children are to be ensured, which replaces it)."""
        ref = (body["kind"], body["metadata"]["name"])
        value = None if deleted else content_hash(body)
        if value is None:
            self._held_contents.get(key, {}).pop(ref, None)
            return False
        self._held_contents.setdefault(key, {})[ref] = value
        desired = self._desired_content(key)
        return desired is not None and content_drifted({ref: value}, desired)

    def _desired_content(self, key: Key) -> dict[tuple[str, str], str] | None:
        """The content hashes of the children the cached spec asks for (None before the job is seen, or
        while its spec does not parse: its reconcile says why)."""
        body = self._bodies.get(key)
        if body is None:
            return None
        metadata = body["metadata"]
        version = (metadata.get("uid"), metadata.get("generation"))
        cached = self._desired_contents.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            job = read_stored({**body, "status": {}})
        except ValidationError:
            return None
        desired = content_hashes(desired_children(job, self.settings, trainer_job=False))
        self._desired_contents[key] = (version, desired)
        return desired

    async def before_resync(self) -> set[Key]:
        return await self.verify_caches()

    def after_resync(self) -> None:
        self._ensured_since_check = None

    async def reconcile_key(self, key: Key, flagged: bool) -> None:
        await self.reconcile(*key, ensure_children=flagged, resync=True)

    async def verify_caches(self) -> set[Key]:
        """Check the watches' caches against the API server; return the jobs missing a child.

        After a watch relist (410 Gone) kopf sends no DELETED for what vanished in the gap, and
        children deleted while the operator was down send nothing at all: FineTuneJobs no longer
        there are dropped (with their metrics series), Jobs no longer there leave the cache, and a
        job missing any child is reconciled with its children ensured. Seven LISTs per round,
        whatever the number of jobs, each of metadata only (a thousand trainer Jobs in full were 8 MB every
        round, which the API server serialised while new jobs waited on it), in each watched namespace when
        there is a list of them: namespaced RBAC allows no cluster-wide LIST."""
        known_before = set(self.known)  # one seen while the list was under way is not a ghost
        self._ensured_since_check = set()
        listed = await self.kube.list_watched(KIND, self.namespaces, metadata_only=True)
        present = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in listed}
        for namespace, name in sorted(known_before - present):
            log.info("%s/%s is gone (missed while the watch relisted): forgetting it", namespace, name)
            await self.drop(namespace, name)
        self.known |= present
        for gone in set(self._held_contents) - self.known:
            del self._held_contents[gone]  # children of a job already gone (their events outlive it)
        jobs: dict[Key, str] = {}
        for trainer in await self.kube.list_watched(
            TRAINER_JOB.kind, self.namespaces, OWNED_SELECTOR, metadata_only=True
        ):
            key = _key_of_child(trainer)
            if key is not None:
                jobs[key] = trainer["metadata"]["name"]
        for key in present:
            cached = self._trainer_jobs.get(key)
            if key in jobs and cached is None:
                read = await self.kube.read_job(key[0], jobs[key])  # created during the gap: rare
                if read is not None:
                    self.saw_trainer_job(key, read)
            elif key not in jobs and cached is not None and not cached.get(DELETED_MARK):
                self._trainer_jobs.pop(key, None)  # deleted during the gap
        children: set[tuple[str, str, str]] = set()
        for child_kind in SUPPORTING_KINDS:
            kind = child_kind.kind
            for item in await self.kube.list_watched(kind, self.namespaces, OWNED_SELECTOR, metadata_only=True):
                children.add((kind, item["metadata"]["namespace"], item["metadata"]["name"]))
        missing: set[Key] = set()
        for key in present:
            body = self._bodies.get(key)
            if body is not None and any(
                (kind, key[0], name) not in children for kind, name in _expected_children(body)
            ):
                missing.add(key)
            held = self._held_contents.get(key)
            desired = self._desired_content(key) if held else None
            if held and desired is not None and content_drifted(held, desired):
                missing.add(key)  # edited while we were not looking (e.g. before its job's first event)
        return missing

    async def reconcile(
        self, namespace: str, name: str, *, ensure_children: bool = False, resync: bool = False
    ) -> None:
        """Bring one FineTuneJob and its children in line with the world as it is now.

        ``resync``: a resync round's reconcile. Its ``ensure_children`` comes from the round's lists, and a
        reconcile that ensured them since those lists began (under this lock) saw them newer. A child deleted
        between that ensure and its list sends a DELETED event, which ensures them again; only a missed one waits
        a round. And a spec it parses is not kept (``_parse``)."""
        key = (namespace, name)

        async def attempt() -> None:
            body = cached = self._bodies.get(key)
            if body is None:
                read = await self.kube.read_finetunejob(namespace, name)
                body = None if read is None else finetunejob_essentials(read)
            if body is None or body["metadata"].get("deletionTimestamp"):
                self.forget(namespace, name)
                return
            if cached is None:
                self._bodies[key] = body  # one read afresh (packing one from the cache again costs a dump)
            ensured = self._ensured_since_check
            stale_flag = resync and ensured is not None and key in ensured
            await self._reconcile(body, ensure_children and not stale_flag, keep_parsed=not resync)

        def stale() -> None:
            self._bodies.pop(key, None)  # decided on a stale copy: read it afresh

        await self.serially(key, attempt, stale)

    async def _reconcile(self, body: Manifest, ensure_children: bool, keep_parsed: bool) -> None:
        """Gather one observation, call the pure core once, carry out its ``Decision``."""
        now = datetime.now(UTC)
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        key = (namespace, name)
        current = FineTuneJobStatus.model_validate(body.get("status") or {})
        try:
            job = self._parse(key, body, keep_parsed).model_copy(update={"status": current})  # decide() works on a copy
        except ValidationError as error:
            unreadable = unreadable_spec(current, describe_validation(error), metadata.get("generation"), now)
            if unreadable is not None:
                await self._write(body, current, unreadable, now)
            return

        refused = refused_in_operator_namespace(
            current, namespace, self.settings.operator_namespace, metadata.get("generation"), now
        )
        if refused is not None:
            await self._write(body, current, refused, now)
            return
        names = Names.for_job(job)
        trainer = self._trainer_jobs.get(key)
        if trainer_job_to_read(trainer, current):
            trainer = await self.kube.read_job(namespace, names.job)  # not watched yet (e.g. just restarted)
            if trainer is not None:
                self.saw_trainer_job(key, trainer)
        conflicts: list[str] = []
        if trainer is not None and not owned_by(trainer, job):
            if trainer.get(DELETED_MARK):
                self._trainer_jobs.pop(key, None)  # the final state of a namesake's Job: not ours
            else:
                conflicts.append(conflict(TRAINER_JOB.kind, names.job, trainer))
            trainer = None
        observed_job = observe_job(trainer) if trainer is not None else None
        errors: list[str] = []
        stored: Manifest | None = None
        if children_wanted(current, observed_job, ensure_children, conflicts):
            stored, conflicts, errors = await self._create_children(job)
            trainer = stored or trainer
            observed_job = observe_job(trainer) if trainer is not None else None

        desired_hash = self._desired_hash(job) if desired_hash_wanted(observed_job) else None
        pods: tuple[Any, ...] = ()
        if pods_wanted(observed_job, desired_hash):
            listed = await self.kube.list_pods(namespace, f"{JOB_LABEL}={job_label_value(name)}")
            pods = tuple(observe_pod(p) for p in listed)
        queued: list[Manifest] = []
        uid = trainer["metadata"].get("uid") if trainer is not None else None
        if uid and kueue_wanted(job, current, observed_job):
            queued = await self.kube.list_kueue_workloads(namespace, uid)
        observed = Observed(
            job=observed_job,
            pods=pods,
            conflicts=tuple(conflicts),
            create_errors=tuple(errors),
            admission=observe_admission(queued),
            kueue_workloads=observe_kueue_workloads(queued),
            desired_hash=desired_hash,
        )
        decision = decide(job, observed, now)
        await self._execute(job, body, current, decision, now, uid)
        deleted = decision.replace_trainer_job or decision.delete_trainer_job
        if stored is not None and key not in self._trainer_jobs and not deleted:
            # The Job just created, cached once its decision is carried out: its ADDED event then brings
            # nothing new (a failed reconcile leaves it uncached, so that event still reconciles again).
            self.saw_trainer_job(key, stored)

    def _parse(self, key: Key, body: Manifest, keep: bool) -> FineTuneJob:
        """The FineTuneJob (status aside: the caller parses it) read from ``body``, parsed again only when
        what ``read_stored`` reads of it changed. Raises ``ValidationError`` for a spec that is wrong.

        ``keep``: keep a spec parsed afresh, as the most recently used. A resync round's are not kept: its walk over
        every job evicted the ones it had still to come to, and the running jobs whose reports come back every
        few seconds; with more jobs than ``PARSED_JOBS`` every round parsed every spec again, 120 us each."""
        metadata = body["metadata"]
        source = (body.get("apiVersion"), body.get("kind"), body.get("spec"), *map(metadata.get, _PARSED_METADATA))
        cached = self._parsed.pop(key, None)
        if cached is not None and cached[0] == source:
            self._parsed[key] = cached
            return cached[1]
        job = read_stored({**body, "status": {}})
        if keep:
            self._parsed[key] = (source, job)
            if len(self._parsed) > PARSED_JOBS:
                del self._parsed[next(iter(self._parsed))]
        return job

    async def _execute(
        self,
        job: FineTuneJob,
        body: Manifest,
        current: FineTuneJobStatus,
        decision: Decision,
        now: datetime,
        trainer_uid: str | None,
    ) -> None:
        """Carry out a decision in the order ``Decision`` gives; nothing here chooses. A deletion names the
        uid of the Job it was decided on: a newer namesake is never deleted on a stale decision."""
        namespace, trainer = job.metadata.namespace, Names.for_job(job).job
        for pod in decision.stuck_pods:
            await self.kube.force_delete_pod(namespace, pod)
        if decision.replace_trainer_job:
            # Its DELETED event brings us back to create it again from the spec.
            log.info("spec changed while suspended: replacing Job %s/%s", namespace, trainer)
            await self.kube.delete_job(namespace, trainer, trainer_uid)
        # Kueue unsuspends any Job whose Workload it admitted while that Workload is active: switched off only after
        # the Job's suspend, Kueue undid the user's suspend in between (the e2e test read the Job unsuspended again).
        await self._switch_workloads(decision, active=False)
        patch = trainer_job_patch(decision)
        if patch is not None:
            await self.kube.patch_job(namespace, trainer, patch)
        await self._switch_workloads(decision, active=True)
        await self._write(body, current, decision, now)
        # Only now that the result is recorded may the trainer Job go.
        if decision.ttl_seconds_after_finished is not None:
            await self.kube.patch_job(
                namespace, trainer, {"spec": {"ttlSecondsAfterFinished": decision.ttl_seconds_after_finished}}
            )
        if decision.delete_trainer_job:
            log.info(
                "%s/%s finished while Kueue could still start its Job: deleting Job %s",
                namespace,
                job.metadata.name,
                trainer,
            )
            await self.kube.delete_job(namespace, trainer, trainer_uid)
            # Forgotten at once, not at its DELETED event: reconciles meanwhile would delete it again.
            self.saw_trainer_job(
                (namespace, job.metadata.name), {"metadata": {"name": trainer, "namespace": namespace}}, deleted=True
            )

    async def _switch_workloads(self, decision: Decision, active: bool) -> None:
        """Switch ``spec.active`` to ``active`` on the Workloads the decision switches so."""
        for workload, wanted in decision.kueue_active:
            if wanted is active:
                log.info("Kueue Workload %s/%s: active=%s", workload.namespace, workload.name, active)
                await self.kube.set_kueue_workload_active(workload.namespace, workload.name, active)

    async def _create_children(self, job: FineTuneJob) -> tuple[Manifest | None, list[str], list[str]]:
        """Create whatever children are missing, each as soon as those it comes after are ours
        (``kinds.ChildKind.after``), and bring drifted ones back to the spec. A conflict or a refusal keeps
        the children after it uncreated.

        Returns (the trainer Job as stored, ownership conflicts, refusals)."""
        children = desired_children(job, self.settings)
        self._desired_hash(job, next(c for c in children if c["kind"] == TRAINER_JOB.kind))
        version = (job.metadata.uid, job.metadata.generation)
        self._desired_contents[(job.metadata.namespace, job.metadata.name)] = (version, content_hashes(children))
        ensured: dict[str, asyncio.Task[Ensured | None]] = {}

        async def ensure(child: Manifest) -> Ensured | None:
            # Runs once every task below exists: it finds each child it comes after among them.
            before = [ensured[kind] for kind in BY_KIND[child["kind"]].after if kind in ensured]
            for outcome in await asyncio.gather(*before):
                if outcome is None or outcome[1] or outcome[2]:
                    return None  # not made: what it comes after is not ours (that outcome says why)
            return await self._ensure(child, job)

        for child in children:
            ensured[child["kind"]] = asyncio.ensure_future(ensure(child))
        outcomes = await asyncio.gather(*ensured.values(), return_exceptions=True)
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            raise failure  # only once every create has settled, as ``_ensure`` answers API refusals
        settled = [o for o in outcomes if isinstance(o, tuple)]
        created = ensured[TRAINER_JOB.kind].result()
        conflicts = [conflicted for _, conflicted, _ in settled if conflicted]
        errors = [error for _, _, error in settled if error]
        if not conflicts and not errors and self._ensured_since_check is not None:
            self._ensured_since_check.add((job.metadata.namespace, job.metadata.name))
        return (created[0] if created is not None else None), conflicts, errors

    async def _ensure(self, child: Manifest, job: FineTuneJob) -> Ensured:
        """One child, created or checked against what exists."""
        kind, namespace, name = child["kind"], child["metadata"]["namespace"], child["metadata"]["name"]
        try:
            stored = await self.kube.create(child)
            if stored is not None:
                log.info("created %s %s/%s", kind, namespace, name)
                return stored, None, None
            existing = await self.kube.read(kind, namespace, name)
            if existing is None:
                return None, None, None  # gone again meanwhile: the next round creates it
            verdict = repair(child, existing, job)
            if verdict == "conflict":
                return None, conflict(kind, name, existing), None
            if verdict == "adopt":
                return existing, None, None
            if verdict == "replace":
                log.info("%s %s/%s drifted from the spec: replacing its content", kind, namespace, name)
                await self.kube.replace(child, existing["metadata"]["resourceVersion"])
            return None, None, None
        except ConflictError:
            return None, None, None  # changed while we looked: the next round looks again
        except ApiError as error:
            log.warning("could not create %s %s/%s: %s", kind, namespace, name, error)
            return None, None, f"{kind} {name}: {_api_message(error)}"

    def _desired_hash(self, job: FineTuneJob, rendered: Manifest | None = None) -> str | None:
        """The spec hash of the Job the spec asks for, rendered once per generation (``rendered``: that Job,
        when the caller has just built it)."""
        key, version = (job.metadata.namespace, job.metadata.name), (job.metadata.uid, job.metadata.generation)
        cached = self._desired_hashes.get(key)
        if cached is not None and cached[0] == version and job.metadata.generation is not None:
            return cached[1]
        spec_hash = spec_hash_of(rendered or batch_job(job, self.settings))  # suspend is not part of the hash
        self._desired_hashes[key] = (version, spec_hash)
        return spec_hash

    async def _write(self, body: Manifest, current: FineTuneJobStatus, decision: Decision, now: datetime) -> None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        patch = status_patch(current, decision.status)
        stored = await self.record(body, patch, decision.events, now)
        if stored is None:
            return
        if patch:
            self._bodies[(namespace, name)] = finetunejob_essentials(stored)
            self._written[(namespace, name)] = stored["metadata"]["resourceVersion"]
        created = datetime.fromisoformat(metadata.get("creationTimestamp", now.isoformat()).replace("Z", "+00:00"))
        self.metrics.record_transitions(
            [e.reason for e in decision.events],
            decision.status,
            (now - created).total_seconds(),
            first_run=current.start_time is None,
        )
        self.metrics.observe_job(namespace, name, decision.status)


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


class NoProgress(kopf.ProgressStorage):
    """kopf's handler progress is for on.create/on.update handlers, retried until done; ours are all
    on.event, which kopf never retries. The default storage still deep-copies (and scans) every
    event's essence to clear its own stanza from it."""

    def fetch(self, *, key: str, body: kopf.Body) -> kopf.ProgressRecord | None:
        return None

    def store(self, *, key: str, record: kopf.ProgressRecord, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def purge(self, *, key: str, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return essence


class NoMemories(ResourceMemories):
    """kopf keeps a memory per object it has seen (a memo, an error throttler, daemon and indexing state,
    ~1 KB each), for daemons, timers, indices and on.create/on.resume bookkeeping. Ours are all on.event
    handlers on six kinds, so it kept six per job for nothing: each event gets a fresh memory, dropped
    after it (kopf's own "ephemeral" memory), and kopf holds nothing per object."""

    async def recall(
        self,
        raw_body: kopf.RawBody,
        *,
        memobase: Any = None,
        noticed_by_listing: bool = False,
        ephemeral: bool = False,
    ) -> ResourceMemory:
        return await super().recall(raw_body, memobase=memobase, noticed_by_listing=noticed_by_listing, ephemeral=True)


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, resync_seconds: float) -> None:
    """Attach the handlers to a kopf registry (one per operator instance, so tests can run several)."""

    register_kind(registry, reconciler, GROUP, VERSION, PLURAL, resync_seconds)

    @kopf.on.startup(registry=registry)
    async def skip_diff_base(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.persistence.progress_storage = NoProgress()

    @kopf.on.startup(registry=registry)
    async def watch_only_our_children(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Server-side: the label filters on the handlers below are applied by kopf after the
        # fact, so without this every ConfigMap, ServiceAccount, Role ... in the cluster would
        # be sent to the operator and remembered by kopf.
        for child_kind in CHILD_KINDS:
            settings.watching.label_selectors[child_kind.group, child_kind.plural] = OWNED_SELECTOR

    owned: dict[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY, JOB_LABEL: kopf.PRESENT}

    @kopf.on.event(TRAINER_JOB.group, TRAINER_JOB.version, TRAINER_JOB.plural, labels=owned, registry=registry)
    async def trainer_job_event(type: str, body: kopf.Body, **_: Any) -> None:
        key = _key_of_child(dict(body))
        if key is None:
            return
        if reconciler.saw_trainer_job(key, dict(body), deleted=type == "DELETED") or type == "DELETED":
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

    for child_kind in SUPPORTING_KINDS:

        @kopf.on.event(child_kind.group, child_kind.version, child_kind.plural, labels=owned, registry=registry)
        async def child_event(type: str, body: kopf.Body, **_: Any) -> None:
            key = _key_of_child(dict(body))
            if key is None:
                return
            drifted = reconciler.saw_child(key, dict(body), deleted=type == "DELETED")
            if (type == "DELETED" or drifted) and key in reconciler.known:
                await reconciler.reconcile(*key, ensure_children=True)
