"""Kubernetes objects (as dicts) -> the ``Observed`` snapshot ``decide`` works on. Pure."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from finetune_operator.api.job import (
    EVICTED,
    KUEUE_QUEUE_LABEL,
    OPERATOR_STATUS_KEYS,
    SHARED_STATUS_KEYS,
    FineTuneJobStatus,
)
from finetune_operator.reconcile.children import SPEC_HASH_ANNOTATION, TRAINER_CONTAINER
from finetune_operator.reconcile.redact import redact, redacted_tail
from finetune_operator.reconcile.status import KueueWorkload, ObservedAdmission, ObservedJob, ObservedPod

MESSAGE_TAIL = 2000
"""Characters of a pod's termination message kept for status and Events."""

Manifest = dict[str, Any]

OPERATOR_WRITES = (*OPERATOR_STATUS_KEYS, *SHARED_STATUS_KEYS)
"""Status keys the operator writes: its own and ``best``, which it fills only until the trainer
reports one with its checkpoint. progress and evaluations are the trainer's alone."""


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


DELETED_MARK = "finetune.dev/deleted"
"""Key on a cached trainer Job that is gone: its final state (Complete, say) is kept until recorded."""


def observe_job(job: Manifest) -> ObservedJob:
    """The trainer's batch/v1 Job as ``decide`` sees it (from the Job or its cached essentials)."""
    status, spec = job.get("status") or {}, job.get("spec") or {}
    metadata = job.get("metadata") or {}
    ttl = spec.get("ttlSecondsAfterFinished")
    conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
    failed = conditions.get("Failed") or conditions.get("FailureTarget") or {}
    return ObservedJob(
        suspended=bool(spec.get("suspend")),
        active=int(status.get("active", 0)),
        terminating=int(status.get("terminating") or 0),
        ready=int(status.get("ready", 0)),
        succeeded=int(status.get("succeeded", 0)),
        failed=int(status.get("failed", 0)),
        complete="Complete" in conditions or "SuccessCriteriaMet" in conditions,
        failed_condition=bool(failed),
        failed_reason=str(failed.get("reason", "")),
        failed_message=str(failed.get("message", "")),
        start_time=_time(status.get("startTime")),
        completion_time=_time(status.get("completionTime")),
        spec_hash=spec_hash_of(job),
        queue_label=(metadata.get("labels") or {}).get(KUEUE_QUEUE_LABEL),
        ttl_seconds_after_finished=None if ttl is None else int(ttl),
        gone=bool(job.get(DELETED_MARK)),
    )


def observe_kueue_workloads(workloads: list[Manifest]) -> tuple[KueueWorkload, ...]:
    """Kueue's Workloads of the trainer Job, as the operator may switch them."""
    return tuple(
        KueueWorkload(
            namespace=w["metadata"]["namespace"],
            name=w["metadata"]["name"],
            active=bool((w.get("spec") or {}).get("active", True)),
        )
        for w in workloads
    )


def observe_admission(workloads: list[Manifest]) -> ObservedAdmission | None:
    """What Kueue's Workload for the trainer Job says; None while there is none."""
    if not workloads:
        return None
    conditions = {c["type"]: c for c in (workloads[0].get("status") or {}).get("conditions", [])}
    reserved, evicted = conditions.get("QuotaReserved") or {}, conditions.get("Evicted") or {}
    evicted_now = evicted.get("status") == "True"
    return ObservedAdmission(
        admitted=(conditions.get("Admitted") or {}).get("status") == "True",
        reason=str(reserved.get("reason", "")) if reserved.get("status") == "False" else "",
        message=str(reserved.get("message", ""))[:1000] if reserved.get("status") == "False" else "",
        evicted_reason=str(evicted.get("reason", "")) if evicted_now else "",
        evicted_message=str(evicted.get("message", ""))[:1000] if evicted_now else "",
    )


def observe_pod(pod: Manifest) -> ObservedPod:
    status = pod.get("status") or {}
    exit_code: int | None = None
    reason = message = ""
    finished: datetime | None = None
    for container in status.get("containerStatuses", []):
        if container.get("name") != TRAINER_CONTAINER:
            continue
        terminated = (container.get("state") or {}).get("terminated") or (container.get("lastState") or {}).get(
            "terminated"
        )
        if terminated:
            exit_code = int(terminated.get("exitCode", 0))
            reason = str(terminated.get("reason", ""))
            message = trainer_error(str(terminated.get("message", "")))
            finished = _time(terminated.get("finishedAt"))
    if status.get("reason") == EVICTED:  # the kubelet's words (which limit, which pressure) beat the exit code's
        reason, message = EVICTED, redacted_tail(str(status.get("message", "")), MESSAGE_TAIL)
    waiting_reason, waiting_message = _waiting(status)
    return ObservedPod(
        name=pod["metadata"]["name"],
        phase=str(status.get("phase", "Unknown")),
        exit_code=exit_code,
        reason=reason,
        message=message,
        finished_at=finished,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        terminating=bool(pod["metadata"].get("deletionTimestamp")),
        deletion_deadline=_time(pod["metadata"].get("deletionTimestamp")),
    )


def trainer_error(termination_message: str) -> str:
    """The trainer's own one-line error, when the termination message is a log tail that has one.

    ``terminationMessagePolicy: FallbackToLogsOnError`` hands over the last lines of the log: progress
    JSON, the error line on stderr, the ``{"event": "error", "message": ...}`` JSON line the trainer
    emits before exiting. Status shows that message alone; anything else (a crash without one, a
    runtime's own words) keeps its last 2000 characters. Either is redacted (``finetune_operator.reconcile.redact``):
    it goes to status and Events, which more people read than the pod's log."""
    for line in reversed(termination_message.splitlines()):
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "error" and isinstance(event.get("message"), str):
            return redact(str(event["message"])).strip()
    return redacted_tail(termination_message, MESSAGE_TAIL)


def _waiting(status: Manifest) -> tuple[str, str]:
    """Why a pod is not running yet, in the pod's own words: the scheduler's Unschedulable, or the
    trainer container's waiting reason (ImagePullBackOff, CreateContainerConfigError, ...)."""
    for condition in status.get("conditions", []):
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("reason") or "Unschedulable"), str(condition.get("message", ""))[:1000]
    for container in status.get("containerStatuses", []):
        waiting = (container.get("state") or {}).get("waiting")
        if container.get("name") == TRAINER_CONTAINER and waiting and waiting.get("reason"):
            return str(waiting["reason"]), str(waiting.get("message", ""))[:1000]
    return "", ""


LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


def finetunejob_essentials(body: Manifest) -> Manifest:
    """A FineTuneJob without what a reconcile never reads: ``managedFields`` and kubectl's copy of
    the last applied manifest, together often larger than the rest. The operator caches one
    FineTuneJob per job, so this is most of its memory at a thousand jobs."""
    metadata = {key: value for key, value in body["metadata"].items() if key != "managedFields"}
    annotations = metadata.get("annotations")
    if annotations and LAST_APPLIED_ANNOTATION in annotations:
        metadata["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED_ANNOTATION}
    return {**body, "metadata": metadata}


def trainer_job_essentials(job: Manifest) -> Manifest:
    """What ``observe_job`` reads of a trainer Job (its pod template, the bulk of it, is not: the spec
    hash stands for it)."""
    metadata = job["metadata"]
    spec_hash = spec_hash_of(job)
    queue = (metadata.get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    return {
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata.get("uid"),
            "labels": {KUEUE_QUEUE_LABEL: queue} if queue is not None else {},
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash} if spec_hash is not None else {},
            "ownerReferences": metadata.get("ownerReferences") or [],
        },
        "spec": {
            "suspend": bool((job.get("spec") or {}).get("suspend")),
            "ttlSecondsAfterFinished": (job.get("spec") or {}).get("ttlSecondsAfterFinished"),
        },
        "status": job.get("status") or {},
    }


def spec_hash_of(manifest: Manifest) -> str | None:
    return ((manifest.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)


def status_patch(before: FineTuneJobStatus, after: FineTuneJobStatus) -> Manifest:
    """The merge patch that takes the operator-owned status keys from ``before`` to ``after``."""
    old, new = before.to_wire(), after.to_wire()
    return {key: new.get(key) for key in OPERATOR_WRITES if old.get(key) != new.get(key)}
