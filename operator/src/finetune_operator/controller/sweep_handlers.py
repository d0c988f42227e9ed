"""The kopf shell of FineTuneSweeps: read the sweep and its trials, call the pure core, write.

Level-based like the FineTuneJob handlers: an event of the sweep, an event of any of its trials
(label-filtered) and a periodic resync all lead to ``SweepReconciler.reconcile``, which lists the
trials afresh from the API server (a quorum read, so a trial just created is never missed and
parallelism holds), decides, and carries out the decision. Trials have deterministic names, so a
create answered 409 means "already created": an operator killed half-way and restarted makes the
same decision again and duplicates nothing.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from finetune_operator.api.job import GROUP, KIND, PLURAL, VERSION
from finetune_operator.api.sweep import (
    RUNGS_ANNOTATION,
    SWEEP_KIND,
    SWEEP_LABEL,
    SWEEP_PLURAL,
    FineTuneSweep,
    FineTuneSweepStatus,
)
from finetune_operator.controller.clients import ApiError, Kube
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.shell import Key, Manifest, ObjectLoop, register_kind
from finetune_operator.reconcile.children import controller_of, job_label_value
from finetune_operator.reconcile.status import Event, describe_validation
from finetune_operator.reconcile.sweep import (
    FINISHED_ANNOTATIONS,
    PRUNE_ANNOTATIONS,
    SweepDecision,
    decide_sweep,
    invalid_sweep,
    refused_sweep,
)
from finetune_operator.reconcile.trials import ObservedTrial, observe_trial

log = logging.getLogger("finetune_operator.sweeps")


class SweepReconciler(ObjectLoop):
    """A FineTuneSweep's observe, decide and execute, in the shared shell. Reconciles coalesce: a burst of
    trial events costs one or two reconciles, not one each (each reads the sweep and its trials afresh)."""

    def __init__(self, kube: Kube, metrics: OperatorMetrics, operator_namespace: str | None = None) -> None:
        super().__init__(kube, metrics, kind=SWEEP_KIND, log=log, coalesce=True, resync_concurrency=1)
        self.operator_namespace = operator_namespace
        """The operator's own namespace: sweeps there are refused."""

    async def reconcile(self, namespace: str, name: str) -> None:
        await self.serially((namespace, name), lambda: self._reconcile(namespace, name))

    async def reconcile_key(self, key: Key, flagged: bool) -> None:
        await self.reconcile(*key)

    def forget_key(self, key: Key) -> None:
        self.metrics.forget_sweep(*key)

    async def _reconcile(self, namespace: str, name: str) -> None:
        """Read the sweep and its trials, call the pure core once, carry out its decision."""
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
        refused = refused_sweep(current, namespace, self.operator_namespace, metadata.get("generation"), now)
        if refused is not None:
            await self._write(body, current, refused, now)
            return
        decision = decide_sweep(sweep, await self._trials(sweep, body), now)
        await self._execute(namespace, name, decision)
        await self._write(body, current, decision, now)

    async def _trials(self, sweep: FineTuneSweep, body: Manifest) -> list[ObservedTrial]:
        """The sweep's own trials, listed afresh (a quorum read: a trial just created is never missed)."""
        namespace, name, uid = body["metadata"]["namespace"], body["metadata"]["name"], body["metadata"].get("uid")
        trials = []
        for item in await self.kube.list_in(KIND, namespace, f"{SWEEP_LABEL}={job_label_value(name)}"):
            owner = controller_of(item)
            if owner is None or owner.get("kind") != SWEEP_KIND or owner.get("uid") != uid:
                continue  # a namesake's trial, or a FineTuneJob someone labelled by hand
            trial = observe_trial(sweep, item)
            if trial is not None:
                trials.append(trial)
        return trials

    async def _execute(self, namespace: str, name: str, decision: SweepDecision) -> None:
        """Carry out the decision on the trials; a refused create becomes an event on the decision."""
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

    async def _write(
        self, body: Manifest, current: FineTuneSweepStatus, decision: SweepDecision, now: datetime
    ) -> None:
        wire, before = decision.status.to_wire(), current.to_wire()
        # A merge patch leaves out what is None: say so explicitly for what went away.
        patch = {key: wire.get(key) for key in {*wire, *before}} if wire != before else {}
        if await self.record(body, patch, decision.events, now) is None:
            return
        metric = ((body.get("spec") or {}).get("objective") or {}).get("metric")
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        self.metrics.observe_sweep(namespace, name, metric if isinstance(metric, str) else None, decision.status)


def register(registry: kopf.OperatorRegistry, reconciler: SweepReconciler, resync_seconds: float) -> None:
    """Attach the sweep handlers to a kopf registry."""

    register_kind(registry, reconciler, GROUP, VERSION, SWEEP_PLURAL, resync_seconds)

    @kopf.on.event(GROUP, VERSION, PLURAL, labels={SWEEP_LABEL: kopf.PRESENT}, registry=registry)
    async def trial_event(body: kopf.Body, **_: Any) -> None:
        owner = controller_of(dict(body))
        if owner is not None and owner.get("kind") == SWEEP_KIND:
            await reconciler.reconcile(body["metadata"]["namespace"], str(owner["name"]))
