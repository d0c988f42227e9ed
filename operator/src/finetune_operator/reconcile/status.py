"""Observed world -> FineTuneJob status and the actions that follow. Pure: no I/O, no clock.

The shell gathers an ``Observed`` snapshot (the FineTuneJob, its Job, its pods, the time),
calls ``decide`` and carries out the returned ``Decision``: patch the status, record events,
ask the trainer to stop, halt the workload. Terminal states are sticky, so a late or
replayed event never turns a finished job back into a running one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from finetune_operator.api import (
    BestResult,
    Condition,
    ConditionType,
    EarlyStoppingStatus,
    FineTuneJob,
    FineTuneJobStatus,
    Phase,
    StopRequest,
    WorkloadRefs,
)
from finetune_operator.reconcile.children import Names
from finetune_operator.reconcile.diagnosis import diagnose
from finetune_trainer import exitcodes
from finetune_trainer.early_stopping import EarlyStoppingState, Evaluated, explain, observe_all

STOP_ANNOTATION = "finetune.dev/stop-requested"
EARLY_STOPPED = "EarlyStopped"
USER_REQUESTED = "UserRequested"


@dataclass(frozen=True)
class ObservedJob:
    """The parts of a batch/v1 Job the status depends on."""

    suspended: bool = False
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_condition: bool = False
    failed_reason: str = ""
    failed_message: str = ""
    start_time: datetime | None = None
    completion_time: datetime | None = None


@dataclass(frozen=True)
class ObservedPod:
    """A trainer pod's last known state."""

    name: str
    phase: str
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Observed:
    job: ObservedJob | None
    pods: tuple[ObservedPod, ...] = ()


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    status: FineTuneJobStatus
    events: list[Event] = field(default_factory=list)
    halt_workload: bool = False
    """Suspend the Job: the trainer ignored a stop request for longer than the grace period."""
    workload_wanted: bool = True
    """False once the job is finished: a Job removed by its TTL must not be recreated."""


def is_finished(status: FineTuneJobStatus) -> bool:
    return any(c.type in ("Complete", "Failed") and c.status == "True" for c in status.conditions)


def set_condition(
    status: FineTuneJobStatus,
    type_: ConditionType,
    value: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> bool:
    """Upsert one condition; keeps lastTransitionTime unless the status flips. True when it became True."""
    wanted: Literal["True", "False"] = "True" if value else "False"
    for index, existing in enumerate(status.conditions):
        if existing.type == type_:
            flipped = existing.status != wanted
            status.conditions[index] = Condition(
                type=type_,
                status=wanted,
                reason=reason,
                message=message,
                last_transition_time=now if flipped else existing.last_transition_time,
                observed_generation=generation,
            )
            return flipped and value
    status.conditions.append(
        Condition(
            type=type_,
            status=wanted,
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=generation,
        )
    )
    return value


def invalid_spec(job_status: FineTuneJobStatus, message: str, generation: int | None, now: datetime) -> Decision:
    """A spec the API server accepted but the models reject (e.g. an older CRD): fail, create nothing."""
    status = job_status.model_copy(deep=True)
    status.observed_generation = generation
    status.phase = "Failed"
    status.message = message
    became = set_condition(status, "Failed", True, "InvalidSpec", message, now, generation)
    set_condition(status, "Running", False, "InvalidSpec", message, now, generation)
    status.completion_time = status.completion_time or now
    events = [Event("Warning", "InvalidSpec", message)] if became else []
    return Decision(status=status, events=events, workload_wanted=False)


def _early_stopping(job: FineTuneJob, status: FineTuneJobStatus) -> EarlyStoppingStatus | None:
    rule = job.spec.early_stopping
    if rule is None:
        return None
    previous = status.early_stopping
    state = EarlyStoppingState(
        **(previous.model_dump(include=set(EarlyStoppingState.model_fields)) if previous is not None else {})
    )
    evaluations = [Evaluated(e.step, e.metrics[rule.metric]) for e in status.evaluations if rule.metric in e.metrics]
    state = observe_all(rule, state, evaluations)
    return EarlyStoppingStatus(
        metric=rule.metric,
        mode=rule.effective_mode,
        patience=rule.patience,
        reason=explain(rule, state) if state.triggered else None,
        **state.model_dump(),
    )


def _stop_request(job: FineTuneJob, status: FineTuneJobStatus, now: datetime) -> StopRequest | None:
    if status.stop_request is not None:
        return status.stop_request
    if status.early_stopping is not None and status.early_stopping.triggered:
        return StopRequest(reason=EARLY_STOPPED, message=status.early_stopping.reason or "", requested_time=now)
    if job.metadata.annotations.get(STOP_ANNOTATION, "").lower() == "true":
        return StopRequest(reason=USER_REQUESTED, message=f"annotation {STOP_ANNOTATION}=true", requested_time=now)
    return None


def _completion_reason(stop: StopRequest | None) -> tuple[str, str]:
    if stop is None:
        return "Succeeded", "training finished"
    if stop.reason == EARLY_STOPPED:
        return EARLY_STOPPED, stop.message
    return "Stopped", f"stopped on request: {stop.message}"


def _failure(observed: ObservedJob, pods: tuple[ObservedPod, ...]) -> tuple[str, str]:
    """Map the Job's failure to a reason users can act on (the trainer's exit code first)."""
    finished = sorted((p for p in pods if p.exit_code not in (None, 0)), key=lambda p: p.finished_at or datetime.min)
    last = finished[-1] if finished else None
    detail = f"; last trainer exit code {last.exit_code} ({last.reason or 'Error'}): {last.message}" if last else ""
    if last is not None and last.exit_code in exitcodes.PERMANENT:
        return exitcodes.PERMANENT[last.exit_code], (last.message or f"trainer exited with {last.exit_code}").strip()
    if observed.failed_reason == "DeadlineExceeded":
        return "DeadlineExceeded", "activeDeadlineSeconds exceeded" + detail
    if observed.failed_reason == "BackoffLimitExceeded":
        return "BackoffLimitExceeded", f"trainer failed {observed.failed} times" + detail
    return observed.failed_reason or "JobFailed", (observed.failed_message or "the training Job failed") + detail


def _stalled(job: FineTuneJob, status: FineTuneJobStatus, now: datetime) -> bool:
    beat = status.progress.last_heartbeat_time if status.progress is not None else None
    since = beat or status.start_time
    return since is not None and now - since > timedelta(seconds=job.spec.stall_timeout_seconds)


def _summary(status: FineTuneJobStatus) -> str:
    """The running job's message: changes with a new best result, not with every progress report.

    Step, loss and throughput live in ``status.progress`` (the trainer's); echoing them here would
    cost the API server a second status write for every report of every running job."""
    if status.best is not None:
        return f"training; best {status.best.metric} {status.best.value:.4g} at step {status.best.step}"
    return "training; no evaluation yet" if status.progress is not None else "waiting for the trainer to report"


def _diagnose(job: FineTuneJob, status: FineTuneJobStatus, finished: bool = True) -> list[Event]:
    """Write ``status.diagnosis``; an Event for each finding not already there (each is emitted once)."""
    known = {d.code for d in status.diagnosis}
    status.diagnosis = diagnose(job, status, finished)
    return [
        Event("Warning" if d.severity == "Warning" else "Normal", d.code, f"{d.message} ({d.evidence})")
        for d in status.diagnosis
        if d.code not in known
    ]


def decide(job: FineTuneJob, observed: Observed, now: datetime) -> Decision:
    """The next status of ``job`` given what exists, and what to do about it."""
    generation = job.metadata.generation
    status = job.status.model_copy(deep=True)
    status.observed_generation = generation
    names = Names.of(job.metadata.name)
    status.workload = WorkloadRefs(
        job=names.job,
        config_map=names.config_map,
        service_account=job.spec.resources.service_account_name or names.service_account,
        service=names.service if job.spec.resources.nodes > 1 else None,
    )
    if is_finished(status):
        return Decision(status=status, workload_wanted=False)

    events: list[Event] = []
    decision = Decision(status=status, events=events)
    status.early_stopping = _early_stopping(job, status)
    if status.early_stopping is not None and status.early_stopping.triggered and status.stop_request is None:
        events.append(Event("Normal", EARLY_STOPPED, status.early_stopping.reason or "early stopping fired"))
    stop = _stop_request(job, status, now)
    if stop is not None and status.stop_request is None and stop.reason == USER_REQUESTED:
        events.append(Event("Normal", "StopRequested", "stop requested by the user; the trainer will save and stop"))
    status.stop_request = stop
    trainer_reported_best = status.best is not None and status.best.checkpoint is not None
    if not trainer_reported_best and status.early_stopping is not None and status.early_stopping.best_step is not None:
        status.best = BestResult(
            metric=status.early_stopping.metric,
            value=status.early_stopping.best_value or 0.0,
            step=status.early_stopping.best_step,
        )
    workload = observed.job
    status.restarts = workload.failed if workload is not None else status.restarts

    def transition(type_: ConditionType, value: bool, reason: str, message: str, event: bool = True) -> None:
        if set_condition(status, type_, value, reason, message, now, generation) and event:
            events.append(Event("Warning" if type_ in ("Failed", "Stalled") else "Normal", reason, message))

    def finish(phase: Phase, type_: ConditionType, reason: str, message: str) -> Decision:
        status.phase = phase
        status.message = message
        status.completion_time = status.completion_time or (workload.completion_time if workload else None) or now
        transition(type_, True, reason, message)
        transition("Running", False, reason, message, event=False)
        transition("Stalled", False, reason, message, event=False)
        events.extend(_diagnose(job, status))
        decision.workload_wanted = False
        return decision

    if workload is not None and workload.complete:
        reason, message = _completion_reason(stop)
        return finish("EarlyStopped" if reason == EARLY_STOPPED else "Succeeded", "Complete", reason, message)
    if workload is not None and workload.failed_condition:
        reason, message = _failure(workload, observed.pods)
        return finish("Failed", "Failed", reason, message)

    if stop is not None and workload is not None and workload.active > 0:
        grace = timedelta(seconds=job.spec.stop_grace_period_seconds)
        if now - stop.requested_time >= grace:
            decision.halt_workload = True
            if not workload.suspended:
                events.append(
                    Event(
                        "Warning", "StopEnforced", f"trainer still running {grace} after the stop request; stopping it"
                    )
                )
    if stop is not None and workload is not None and workload.suspended and workload.active == 0:
        reason, message = _completion_reason(stop)
        return finish("EarlyStopped" if reason == EARLY_STOPPED else "Succeeded", "Complete", reason, message)

    suspended = job.spec.suspend and stop is None
    transition(
        "Suspended", suspended, "Suspended" if suspended else "Resumed", "spec.suspend is true" if suspended else ""
    )
    if suspended:
        status.phase = "Suspended"
        status.message = "suspended; resuming continues from the last checkpoint"
        transition("Running", False, "Suspended", status.message, event=False)
        return decision

    running = workload is not None and workload.active > 0
    if running:
        status.start_time = status.start_time or (workload.start_time if workload else None) or now
        transition("Running", True, "TrainerRunning", _summary(status))
        stalled = _stalled(job, status, now)
        transition(
            "Stalled",
            stalled,
            "NoProgress" if stalled else "Progressing",
            f"no progress report for more than {job.spec.stall_timeout_seconds}s" if stalled else "",
        )
        status.phase = "Stalled" if stalled else "Running"
        status.message = _summary(status)
        events.extend(_diagnose(job, status, finished=False))
        for condition in status.conditions:
            if condition.type == "Running":
                condition.message = status.message
    else:
        status.phase = "Pending"
        status.message = "waiting for the training pod to start" if workload is not None else "creating the workload"
        transition("Running", False, "Pending", status.message, event=False)
    return decision
