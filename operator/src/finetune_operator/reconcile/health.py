"""Ready / Reconciling / Stalled: the job's health as kstatus, Flux and Argo CD read it. Pure.

kstatus (behind Flux's health checks and kubectl tooling) ignores our own condition types: it
checks ``observedGeneration``, then the abnormal-true ``Reconciling`` and ``Stalled``, then
falls back to ``Ready``. Without these three a running job, and even a failed one, computes
as *Current* (healthy). They are derived here, after ``status.decide`` has settled the job's
own conditions, so the two layers change independently:

    pending, running, queued     Reconciling=True                 -> InProgress (preempted by Kueue too)
    suspended by the user        Ready=True (reason Suspended)    -> Current
    stalled (any reason)         Stalled=True, Reconciling=False  -> Failed (NoProgress ends with a pause)
    complete                     Ready=True                       -> Current
    failed                       Stalled=True, same reason        -> Failed
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from finetune_operator.api.job import KUEUE_HOLDS, Condition, ConditionType, FineTuneJob, FineTuneJobStatus
from finetune_operator.reconcile import status as core
from finetune_operator.reconcile.status import Decision, Observed, set_condition

NO_PROGRESS = "NoProgress"


class Health(Protocol):
    """A status with conditions and a message: a FineTuneJob's or a FineTuneSweep's."""

    conditions: list[Condition]
    message: str | None


def _true(status: Health, type_: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_ and c.status == "True"), None)


def _find(status: Health, type_: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def derive_health(
    status: Health, generation: int | None, now: datetime, paused: bool | None = None, progressing: str = "Pending"
) -> None:
    """Set Ready, Reconciling and Stalled in ``status`` from its other conditions (in place).

    ``paused``: whether a Suspended=True status is at rest (Ready) rather than in progress; by default a
    user's suspend is, Kueue's hold is not (a sweep says: suspended with no trial still running).
    ``progressing``: the reason in progress when neither Suspended nor Running says one."""

    def put(type_: ConditionType, value: bool, reason: str, message: str) -> None:
        # A message explains a True condition; False ones keep just the reason, so that
        # `kubectl describe` does not repeat a failure's message five times.
        set_condition(status, type_, value, reason, message if value else "", now, generation)

    failed, complete = _true(status, "Failed"), _true(status, "Complete")
    stalled, suspended = _true(status, "Stalled"), _true(status, "Suspended")
    # a user's pause, not Kueue's hold: it ends a missing-heartbeat stall
    if paused is None:
        paused = suspended is not None and suspended.reason not in KUEUE_HOLDS
    if failed is not None:
        put("Stalled", True, failed.reason, failed.message)
        put("Reconciling", False, failed.reason, failed.message)
        put("Ready", False, failed.reason, failed.message)
    elif complete is not None:
        put("Ready", True, complete.reason, complete.message)
        put("Reconciling", False, complete.reason, complete.message)
        put("Stalled", False, complete.reason, complete.message)
    elif stalled is not None and not (paused and stalled.reason == NO_PROGRESS):
        put("Reconciling", False, stalled.reason, stalled.message)
        put("Ready", False, stalled.reason, stalled.message)
    elif suspended is not None and paused:
        message = status.message or suspended.message
        put("Ready", True, suspended.reason, message)
        put("Reconciling", False, suspended.reason, message)
        put("Stalled", False, suspended.reason, message)
    else:
        running = _find(status, "Running")
        reason = suspended.reason if suspended is not None else running.reason if running is not None else progressing
        message = status.message or ""
        put("Reconciling", True, reason, message)
        put("Ready", False, reason, message)
        if _find(status, "Stalled") is None:
            put("Stalled", False, reason, message)


def decide(job: FineTuneJob, observed: Observed, now: datetime) -> Decision:
    """``status.decide`` with the health conditions derived from its result."""
    decision = core.decide(job, observed, now)
    derive_health(decision.status, job.metadata.generation, now)
    return decision


def invalid_spec(
    job_status: FineTuneJobStatus, message: str, generation: int | None, now: datetime, reason: str = "InvalidSpec"
) -> Decision:
    """``status.invalid_spec`` with the health conditions derived from its result."""
    decision = core.invalid_spec(job_status, message, generation, now, reason)
    derive_health(decision.status, generation, now)
    return decision
