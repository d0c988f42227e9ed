"""The kopf shell of FineTuneSweeps: read the sweep and its trials, call the pure core, write.

Level-based like the FineTuneJob handlers: an event of the sweep, an event of any of its trials
(label-filtered) and a periodic resync all lead to ``SweepReconciler.reconcile``, which lists the
trials afresh from the API server (a quorum read, so a trial just created is never missed and
parallelism holds), decides, and carries out the decision. Trials have deterministic names, so a
create answered 409 means "already created": an operator killed half-way and restarted makes the
same decision again and duplicates nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from finetune_operator.api import GROUP, KIND, PLURAL, VERSION
from finetune_operator.clients import CONFLICT_RETRIES, ApiError, ConflictError, Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile.children import controller_of, job_label_value
from finetune_operator.reconcile.status import Event, describe_validation
from finetune_operator.reconcile.sweep import (
    FINISHED_ANNOTATIONS,
    PRUNE_ANNOTATIONS,
    SweepDecision,
    decide_sweep,
    invalid_sweep,
)
from finetune_operator.reconcile.trials import observe_trial
from finetune_operator.sweep_api import (
    RUNGS_ANNOTATION,
    SWEEP_KIND,
    SWEEP_LABEL,
    SWEEP_PLURAL,
    FineTuneSweep,
    FineTuneSweepStatus,
)

log = logging.getLogger("finetune_operator.sweeps")
Manifest = dict[str, Any]
Key = tuple[str, str]


class SweepReconciler:
    """Per-sweep locks and a dirty flag: a burst of trial events costs one or two reconciles, not one each."""

    def __init__(self, kube: Kube, metrics: OperatorMetrics) -> None:
        self.kube = kube
        self.metrics = metrics
        self.known: set[Key] = set()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._dirty: set[Key] = set()
        self.resync_task: asyncio.Task[None] | None = None

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        if lock.locked():
            self._dirty.add(key)  # the reconcile in flight goes round once more
            return
        async with lock:
            self._dirty.add(key)
            while key in self._dirty:
                self._dirty.discard(key)
                await self._reconcile_with_retries(namespace, name)

    async def _reconcile_with_retries(self, namespace: str, name: str) -> None:
        started = asyncio.get_running_loop().time()
        try:
            for attempt in range(CONFLICT_RETRIES):
                try:
                    await self._reconcile(namespace, name)
                    return
                except ConflictError:
                    if attempt == CONFLICT_RETRIES - 1:
                        raise
        except Exception:
            self.metrics.reconcile_errors.inc()
            raise
        finally:
            self.metrics.reconcile_seconds.observe(asyncio.get_running_loop().time() - started)

    def forget(self, namespace: str, name: str) -> None:
        self.known.discard((namespace, name))
        self.metrics.forget_sweep(namespace, name)

    async def _reconcile(self, namespace: str, name: str) -> None:
        now = datetime.now(UTC)
        body = await self.kube.read(SWEEP_KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return
        self.known.add((namespace, name))
        metadata = body["metadata"]
        current = FineTuneSweepStatus.model_validate(body.get("status") or {})
        try:
            sweep = FineTuneSweep.model_validate({**body, "status": {}})
        except ValidationError as error:
            decision = invalid_sweep(current, describe_validation(error), metadata.get("generation"), now)
            await self._write(body, current, decision, now)
            return
        sweep.status = current
        listed = await self.kube.list_in(KIND, namespace, f"{SWEEP_LABEL}={job_label_value(name)}")
        trials = []
        for item in listed:
            owner = controller_of(item)
            if owner is None or owner.get("kind") != SWEEP_KIND or owner.get("uid") != metadata.get("uid"):
                continue  # a namesake's trial, or a FineTuneJob someone labelled by hand
            trial = observe_trial(sweep, item)
            if trial is not None:
                trials.append(trial)
        decision = decide_sweep(sweep, trials, now)
        for trial_name in sorted({*decision.prune, *decision.rungs}):
            # A rung verdict is recorded on its trial in the same patch as the prune it may lead to.
            annotations = dict(PRUNE_ANNOTATIONS) if trial_name in decision.prune else {}
            if trial_name in decision.rungs:
                annotations[RUNGS_ANNOTATION] = json.dumps(decision.rungs[trial_name], sort_keys=True)
            if trial_name in decision.prune:
                log.info("%s/%s: pruning trial %s", namespace, name, trial_name)
            await self.kube.annotate(KIND, namespace, trial_name, annotations)
        for trial_name in decision.stop:
            log.info("%s/%s: the sweep has finished: stopping trial %s", namespace, name, trial_name)
            await self.kube.annotate(KIND, namespace, trial_name, FINISHED_ANNOTATIONS)
        for manifest in decision.create:  # in index order: a failure leaves no gap behind it
            try:
                created = await self.kube.create(manifest)
            except ApiError as error:
                message = f"creating trial {manifest['metadata']['name']} failed: {error.status} {error.body[:512]}"
                decision.events.append(Event("Warning", "CreateFailed", message))
                break
            if created is not None:
                log.info("%s/%s: created trial %s", namespace, name, manifest["metadata"]["name"])
        await self._write(body, current, decision, now)

    async def _write(
        self, body: Manifest, current: FineTuneSweepStatus, decision: SweepDecision, now: datetime
    ) -> None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        if decision.status.to_wire() != current.to_wire():
            wire = decision.status.to_wire()
            # A merge patch leaves out what is None: say so explicitly for what went away.
            patch = {key: wire.get(key) for key in {*wire, *current.to_wire()}}
            stored = await self.kube.patch_status(
                namespace, name, patch, metadata.get("resourceVersion"), kind=SWEEP_KIND
            )
            if stored is None:
                self.forget(namespace, name)
                return
        for event in decision.events:
            log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
            try:
                await self.kube.post_event(body, event.type, event.reason, event.message, now)
            except ApiError as error:
                log.warning("could not post event %s on %s/%s: %s", event.reason, namespace, name, error.reason)
        metric = ((body.get("spec") or {}).get("objective") or {}).get("metric")
        self.metrics.observe_sweep(namespace, name, metric if isinstance(metric, str) else None, decision.status)

    async def resync_forever(self, interval: float) -> None:
        """Drift repair: nothing stays wrong longer than one round (a missed event, a restart)."""
        while True:
            await asyncio.sleep(interval)
            for namespace, name in sorted(self.known):
                try:
                    await self.reconcile(namespace, name)
                except Exception:
                    log.exception("resync of sweep %s/%s failed; retrying next round", namespace, name)


def register(registry: kopf.OperatorRegistry, reconciler: SweepReconciler, resync_seconds: float) -> None:
    """Attach the sweep handlers to a kopf registry."""

    @kopf.on.event(GROUP, VERSION, SWEEP_PLURAL, registry=registry)
    async def sweep_event(type: str, body: kopf.Body, **_: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if type == "DELETED":
            reconciler.forget(namespace, name)
        else:
            await reconciler.reconcile(namespace, name)

    @kopf.on.event(GROUP, VERSION, PLURAL, labels={SWEEP_LABEL: kopf.PRESENT}, registry=registry)
    async def trial_event(body: kopf.Body, **_: Any) -> None:
        owner = controller_of(dict(body))
        if owner is not None and owner.get("kind") == SWEEP_KIND:
            await reconciler.reconcile(body["metadata"]["namespace"], str(owner["name"]))

    @kopf.on.startup(registry=registry)
    async def start_sweep_resync(**_: Any) -> None:
        reconciler.resync_task = asyncio.create_task(reconciler.resync_forever(resync_seconds))

    @kopf.on.cleanup(registry=registry)
    async def stop_sweep_resync(**_: Any) -> None:
        if reconciler.resync_task is not None:
            reconciler.resync_task.cancel()
