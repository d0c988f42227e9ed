"""Observed world -> FineTuneJob status and the actions that follow. Pure: no I/O, no clock.

The shell gathers an ``Observed`` snapshot (the FineTuneJob, its Job, its pods, the time),
calls ``decide`` and carries out the returned ``Decision``: patch the status, record events,
ask the trainer to stop, halt the trainer Job. Terminal states are sticky, so a late or
replayed event never turns a finished job back into a running one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from finetune_operator.api.job import (
    CREATE_FAILED,
    EARLY_STOPPED,
    EVICTED,
    INADMISSIBLE,
    OWNERSHIP_CONFLICT,
    PREEMPTED,
    PRUNED,
    QUEUED,
    STOP_ANNOTATION,
    STOP_ENFORCED,
    STOP_REASON_ANNOTATION,
    SWEEP_FINISHED,
    USER_REQUESTED,
    VERSION_SKEW,
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

STUCK_TERMINATING = timedelta(minutes=2)
KUEUE_DEACTIVATED = "Deactivated"
"""Kueue's eviction reason for a Workload made inactive (the operator does that for the user's suspend)."""
WAITING = (OWNERSHIP_CONFLICT, CREATE_FAILED)
"""Stalled reasons that end by themselves when the obstacle goes."""


@dataclass(frozen=True)
class ObservedJob:
    """The parts of the trainer's batch/v1 Job the status and the steering depend on."""

    suspended: bool = False
    active: int = 0
    terminating: int = 0
    """Pods asked to stop that still run (a trainer saving after SIGTERM)."""
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_condition: bool = False
    failed_reason: str = ""
    failed_message: str = ""
    start_time: datetime | None = None
    completion_time: datetime | None = None
    spec_hash: str | None = None
    """The hash of the spec it was made from (``finetune.dev/spec-hash``)."""
    queue_label: str | None = None
    """The LocalQueue it names (``kueue.x-k8s.io/queue-name``): Kueue admits only a Job that names one."""
    ttl_seconds_after_finished: int | None = None
    gone: bool = False
    """Deleted after it ended (its TTL): its final state is kept until recorded; nothing may be done to it."""

    @property
    def ended(self) -> bool:
        return self.complete or self.failed_condition


@dataclass(frozen=True)
class ObservedPod:
    """A trainer pod's last known state."""

    name: str
    phase: str
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    finished_at: datetime | None = None
    waiting_reason: str = ""
    """Why the pod is not running yet, from the pod: Unschedulable, ImagePullBackOff, ..."""
    waiting_message: str = ""
    terminating: bool = False
    deletion_deadline: datetime | None = None
    """When a terminating pod should have been gone (its deletionTimestamp)."""


@dataclass(frozen=True)
class ObservedAdmission:
    """Kueue's Workload for the trainer Job: its own account of why the job waits."""

    admitted: bool = False
    reason: str = ""
    """Why it holds no quota (QuotaReserved=False): Pending, Inadmissible, ..."""
    message: str = ""
    evicted_reason: str = ""
    """Evicted=True: Preempted, ClusterQueueStopped, ..."""
    evicted_message: str = ""

    @property
    def inadmissible(self) -> bool:
        """Kueue cannot admit it as it stands: no such queue, larger than the queue's whole quota, or
        asking for a resource the ClusterQueue does not cover."""
        return self.reason == INADMISSIBLE or "maximum capacity" in self.message or self.uncovered is not None

    @property
    def uncovered(self) -> str | None:
        """The resource Kueue says its ClusterQueue does not cover, if that is why it waits."""
        found = _UNCOVERED.search(self.message)
        return found.group(1) if found else None


_UNCOVERED = re.compile(r"resource (\S+) unavailable in ClusterQueue")
"""Kueue's words (flavor assignment) for a resource that none of the ClusterQueue's groups covers."""


def _uncovered_fix(job: FineTuneJob, resource: str) -> str:
    """How to get a job admitted whose pods request a resource the ClusterQueue does not cover."""
    add = f"have {resource} added to the ClusterQueue's coveredResources"
    if resource == job.spec.resources.gpu_resource_name:
        return f"set spec.resources.gpuResourceName to the GPU resource the queue covers, or {add}"
    field = {"cpu": "cpu", "memory": "memory", "ephemeral-storage": "ephemeralStorage"}.get(resource)
    return f"unset spec.resources.{field}, or {add}" if field else add


@dataclass(frozen=True)
class KueueWorkload:
    """One of Kueue's Workloads for the trainer Job: what the operator may switch."""

    namespace: str
    name: str
    active: bool = True


@dataclass(frozen=True)
class Observed:
    job: ObservedJob | None
    """The trainer's batch/v1 Job (None: there is none, or another owner's)."""
    pods: tuple[ObservedPod, ...] = ()
    conflicts: tuple[str, ...] = ()
    """Children whose name another owner holds: never adopted, never deleted; the job waits."""
    create_errors: tuple[str, ...] = ()
    """The API server's messages for children it refused to create."""
    admission: ObservedAdmission | None = None
    """Kueue's verdict on a queued job, from its Workload (None: none seen, e.g. Kueue has not created it yet)."""
    kueue_workloads: tuple[KueueWorkload, ...] = ()
    desired_hash: str | None = None
    """The spec hash of the Job the spec asks for now (``children.batch_job``): another on a suspended Job
    means the spec was edited, and the Job is replaced."""


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    """The job's next status and every action the shell carries out, in this order: force-delete
    ``stuck_pods``; switch Kueue's Workloads off; replace the trainer Job, or patch its ``suspend`` and queue
    label; switch Kueue's Workloads on; write the status and post the events; then (the result recorded) set
    the TTL or delete the trainer Job."""

    status: FineTuneJobStatus
    events: list[Event] = field(default_factory=list)
    halt_trainer_job: bool = False
    """Keep the trainer Job suspended: a stop is being enforced (the trainer ignored it for longer than
    the grace period, or nothing runs that could save), or its pods are still saving."""
    trainer_job_wanted: bool = True
    """False once the job is finished: a Job removed by its TTL must not be recreated."""
    stuck_pods: tuple[str, ...] = ()
    """Pods still terminating long after their grace period (a lost node never confirms): with a
    podFailurePolicy the Job controller waits for them before it starts a replacement, forever."""
    suspend_trainer_job: bool | None = None
    """Patch the trainer Job's ``spec.suspend`` to this (None: leave it)."""
    add_queue_label: str | None = None
    """Name this LocalQueue on the trainer Job: the user resumed a queued job created while suspended."""
    replace_trainer_job: bool = False
    """Delete the trainer Job so that it is created again from the edited spec (its DELETED event does that)."""
    kueue_active: tuple[tuple[KueueWorkload, bool], ...] = ()
    """Kueue Workloads to switch ``spec.active`` on (True) or off (False)."""
    ttl_seconds_after_finished: int | None = None
    """Set on the finished trainer Job once the result is recorded: the Job controller may delete it then."""
    delete_trainer_job: bool = False
    """Delete the trainer Job once the result is recorded: the job finished while its Job could still be
    started by Kueue (stopped while queued): a finished job's Job never runs again."""


StatusT = TypeVar("StatusT", bound=BaseModel)


def copy_status(status: StatusT) -> StatusT:
    """A copy of ``status`` to decide on, sharing nothing with it, made by validating its dump afresh:
    ``model_copy(deep=True)`` goes through ``copy.deepcopy`` object by object (73 us for a suspended job's
    status against 15 us), and every reconcile copies one. Which fields count as set is not kept (a list
    filled in place never counted): the operator writes a status's ``to_wire``, which does not read it."""
    return status.model_validate(status.model_dump(by_alias=True))


def is_finished(status: FineTuneJobStatus) -> bool:
    return any(c.type in ("Complete", "Failed") and c.status == "True" for c in status.conditions)


class _HasConditions(Protocol):
    conditions: list[Condition]


def set_condition(
    status: _HasConditions,
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


def describe_validation(error: ValidationError) -> str:
    """One line per problem, each naming the field as users wrote it (spec.a.b)."""
    parts = []
    for problem in error.errors():
        location = ".".join(str(p) for p in problem["loc"])
        parts.append(f"{location}: {problem['msg']}" if location else problem["msg"])
    return "invalid spec: " + "; ".join(parts)


def invalid_spec(
    job_status: FineTuneJobStatus, message: str, generation: int | None, now: datetime, reason: str = "InvalidSpec"
) -> Decision:
    """A spec the API server accepted but the models reject (e.g. an older CRD), or one the operator refuses
    (``reason``): fail, create nothing."""
    status = copy_status(job_status)
    status.observed_generation = generation
    status.phase = "Failed"
    status.message = message
    became = set_condition(status, "Failed", True, reason, message, now, generation)
    set_condition(status, "Running", False, reason, message, now, generation)
    status.completion_time = status.completion_time or now
    events = [Event("Warning", reason, message)] if became else []
    return Decision(status=status, events=events, trainer_job_wanted=False)


def operator_namespace_refusal(namespace: str, operator_namespace: str | None, kind: str) -> str | None:
    """Why a job or sweep in ``namespace`` is refused: the operator's own namespace holds its ServiceAccount
    (``serviceAccountName: finetune-operator`` would give a trainer pod the operator's token). None: fine."""
    if operator_namespace is None or namespace != operator_namespace:
        return None
    return (
        f"namespace {namespace} is the operator's own namespace: a {kind} there could run pods as the "
        "operator's ServiceAccount, so the operator refuses it and creates nothing; use another namespace"
    )


def not_understood(job_status: FineTuneJobStatus, problem: str, now: datetime) -> Decision:
    """A started job whose stored spec this operator version cannot read (operator/CRD version
    skew): its workload and status are left as they are, never failed; said once, as a warning."""
    status = copy_status(job_status)
    message = f"this operator version cannot read the spec; the workload is left running: {problem}"
    events = [] if status.message == message else [Event("Warning", VERSION_SKEW, message)]
    status.message = message
    return Decision(status=status, events=events)


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
        reason = job.metadata.annotations.get(STOP_REASON_ANNOTATION)
        if reason == PRUNED:
            return StopRequest(reason=PRUNED, message="its sweep judged it unpromising", requested_time=now)
        if reason == SWEEP_FINISHED:
            return StopRequest(reason=SWEEP_FINISHED, message="its sweep has finished", requested_time=now)
        return StopRequest(reason=USER_REQUESTED, message=f"annotation {STOP_ANNOTATION}=true", requested_time=now)
    return None


def _completion_reason(stop: StopRequest | None, halted: bool = False) -> tuple[str, str]:
    if halted and stop is not None:
        return STOP_ENFORCED, (
            f"the trainer did not stop by itself after the stop request ({stop.reason}: {stop.message}); its "
            "workload was stopped, so the final model may not have been written: the best checkpoint is in status.best"
        )
    if stop is None:
        return "Succeeded", "training finished"
    if stop.reason in (EARLY_STOPPED, PRUNED):
        return stop.reason, stop.message
    return "Stopped", f"stopped on request: {stop.message}"


def _completion_phase(reason: str) -> Phase:
    """The printer-column phase of a completed job: how it ended, when it ended early."""
    return "EarlyStopped" if reason == EARLY_STOPPED else "Pruned" if reason == PRUNED else "Succeeded"


def _failure(observed: ObservedJob, pods: tuple[ObservedPod, ...]) -> tuple[str, str]:
    """Map the Job's failure to a reason users can act on (the trainer's exit code first)."""
    finished = sorted((p for p in pods if p.exit_code not in (None, 0)), key=lambda p: p.finished_at or datetime.min)
    last = finished[-1] if finished else None
    detail = f"; last trainer exit code {last.exit_code} ({last.reason or 'Error'}): {last.message}" if last else ""
    if last is not None and last.exit_code in exitcodes.PERMANENT:
        return exitcodes.PERMANENT[last.exit_code], (last.message or f"trainer exited with {last.exit_code}").strip()
    if observed.failed_reason == "DeadlineExceeded":
        return "DeadlineExceeded", "activeDeadlineSeconds exceeded" + detail
    if observed.failed_reason == "BackoffLimitExceeded" and last is not None and last.reason == EVICTED:
        evictions = sum(p.reason == EVICTED for p in pods)
        return EVICTED, f"trainer pods evicted {evictions} times (counted against backoffLimit); last: {last.message}"
    if observed.failed_reason == "BackoffLimitExceeded":
        # FailureTarget comes before the Job counts the failed pod: count the pods too.
        failures = max(observed.failed, len(finished))
        return "BackoffLimitExceeded", f"trainer failed {failures} time{'s' if failures != 1 else ''}" + detail
    return observed.failed_reason or "JobFailed", (observed.failed_message or "the training Job failed") + detail


def _stalled(job: FineTuneJob, status: FineTuneJobStatus, trainer: ObservedJob, now: datetime) -> bool:
    """The stall clock runs from the later of the last heartbeat and the Job's (re)start: a
    heartbeat from before a suspension (or an edit that replaced the Job) does not count."""
    beat = status.progress.last_heartbeat_time if status.progress is not None else None
    moments = [t for t in (beat, trainer.start_time) if t is not None]
    since = max(moments) if moments else status.start_time
    return since is not None and now - since > timedelta(seconds=job.spec.stall_timeout_seconds)


def _waiting(pods: tuple[ObservedPod, ...]) -> tuple[str, str]:
    """(reason, message) of the first live pod that waits for something (scheduling, an image)."""
    for pod in pods:
        if pod.waiting_reason and not pod.terminating:
            return pod.waiting_reason, pod.waiting_message
    return "Pending", "waiting for the training pod to start"


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


def _kueue_hold(
    job: FineTuneJob, status: FineTuneJobStatus, queue: str, trainer: ObservedJob, admission: ObservedAdmission | None
) -> tuple[str, str]:
    """(reason, message) of a queued Job that Kueue keeps suspended: waiting for admission,
    inadmissible, or preempted (it ran before). Kueue owns ``suspend`` here; we repeat its words."""
    waits_for = f"LocalQueue {queue}"
    if admission is None:
        return QUEUED, f"waiting for Kueue to admit it from {waits_for} (no Workload yet: is Kueue running?)"
    stopping = trainer.active > 0 or trainer.terminating > 0
    evicted = admission.evicted_reason not in ("", KUEUE_DEACTIVATED)  # deactivated: the user's suspend, now over
    if status.start_time is not None and (evicted or stopping):  # it ran: Kueue took the quota back
        said = admission.evicted_message or "evicted by Kueue"
        saving = "; the trainer is saving a checkpoint" if stopping else ""
        return PREEMPTED, f"{said}{saving}; resumes from its last checkpoint when {waits_for} readmits it"
    if admission.admitted:
        return QUEUED, f"{waits_for}: admitted; Kueue is starting it"
    reason = INADMISSIBLE if admission.inadmissible else QUEUED
    fix = f"; {_uncovered_fix(job, admission.uncovered)}" if admission.uncovered else ""
    return reason, f"{waits_for}: {admission.message or 'waiting for admission'}{fix}"


def _tracking(status: FineTuneJobStatus, now: datetime, generation: int | None) -> list[Event]:
    """The trainer's ``status.tracking`` as the TrackingBehind condition, with a Warning when it falls behind
    (also after the job finished: registration is the trainer's last stage)."""
    tracking = status.tracking
    if tracking is None:
        return []
    reason = "TrackingBehind" if tracking.behind else "TrackingSynced"
    message = (tracking.message or "MLflow logging is behind") if tracking.behind else ""
    if set_condition(status, "TrackingBehind", tracking.behind, reason, message, now, generation):
        return [Event("Warning", reason, message)]
    return []


def decide(job: FineTuneJob, observed: Observed, now: datetime) -> Decision:
    """The next status of ``job`` given what exists, and what to do about it."""
    generation = job.metadata.generation
    status = copy_status(job.status)
    status.observed_generation = generation
    names = Names.for_job(job)
    status.workload = WorkloadRefs(
        job=names.job,
        config_map=names.config_map,
        service_account=job.spec.resources.service_account_name or names.service_account,
        service=names.service if job.spec.resources.nodes > 1 else None,
    )
    events: list[Event] = _tracking(status, now, generation)
    if is_finished(status):
        return Decision(status=status, events=events, trainer_job_wanted=False)

    decision = Decision(status=status, events=events)

    def transition(type_: ConditionType, value: bool, reason: str, message: str, event: bool = True) -> None:
        if set_condition(status, type_, value, reason, message, now, generation) and event:
            events.append(Event("Warning" if type_ in ("Failed", "Stalled") else "Normal", reason, message))

    if observed.conflicts or observed.create_errors:
        reason = OWNERSHIP_CONFLICT if observed.conflicts else CREATE_FAILED
        message = "; ".join((*observed.conflicts, *observed.create_errors))
        status.phase = "Pending"
        status.message = message
        transition("Stalled", True, reason, message)
        transition("Running", False, reason, message, event=False)
        return decision
    if any(c.type == "Stalled" and c.status == "True" and c.reason in WAITING for c in status.conditions):
        transition("Stalled", False, "Resolved", "", event=False)
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
    trainer = observed.job
    status.restarts = trainer.failed if trainer is not None else status.restarts
    decision.stuck_pods = tuple(
        p.name
        for p in observed.pods
        if p.terminating and p.deletion_deadline is not None and now - p.deletion_deadline > STUCK_TERMINATING
    )
    if decision.stuck_pods:
        events.append(
            Event(
                "Warning",
                "PodsLost",
                f"pods {', '.join(decision.stuck_pods)} are still terminating {STUCK_TERMINATING} after their grace "
                "period (a lost node?): deleting them so that the Job can replace them",
            )
        )

    def finish(phase: Phase, type_: ConditionType, reason: str, message: str) -> Decision:
        status.phase = phase
        status.message = message
        status.completion_time = status.completion_time or (trainer.completion_time if trainer else None) or now
        transition(type_, True, reason, message)
        transition("Running", False, reason, message, event=False)
        transition("Stalled", False, reason, message, event=False)
        events.extend(_diagnose(job, status))
        decision.trainer_job_wanted = False
        return decision

    if trainer is not None and trainer.complete:
        reason, message = _completion_reason(stop)
        return finish(_completion_phase(reason), "Complete", reason, message)
    if trainer is not None and trainer.failed_condition:
        reason, message = _failure(trainer, observed.pods)
        return finish("Failed", "Failed", reason, message)

    if stop is not None and trainer is not None and trainer.active > 0:
        grace = timedelta(seconds=job.spec.stop_grace_period_seconds)
        if status.progress is not None and status.progress.finalizing:
            grace *= 2  # saving the final model: let it finish rather than leave none (bounded: a lying trainer)
        # A pod that is not ready yet has nothing to save: no need to wait for it.
        if now - stop.requested_time >= grace or trainer.ready == 0:
            decision.halt_trainer_job = True
            if not trainer.suspended:
                events.append(
                    Event(
                        "Warning", "StopEnforced", f"trainer still running {grace} after the stop request; stopping it"
                    )
                )
    if stop is not None and trainer is not None and trainer.suspended and trainer.active == 0:
        if trainer.terminating > 0:
            status.message = "stopping: waiting for the trainer's pods to save and exit"
            decision.halt_trainer_job = True  # stays suspended meanwhile
            return decision
        # Halted after the grace period: the trainer ignored the request. Halted before it: no trainer was
        # running yet (a pending pod), so the stop simply took effect.
        halted = now - stop.requested_time >= timedelta(seconds=job.spec.stop_grace_period_seconds)
        reason, message = _completion_reason(stop, halted=halted)
        return finish(_completion_phase(stop.reason), "Complete", reason, message)

    suspended = job.spec.suspend and stop is None
    queue = job.queue_name
    held = queue is not None and not suspended and stop is None and trainer is not None and trainer.suspended
    if held and queue is not None and trainer is not None:
        reason, message = _kueue_hold(job, status, queue, trainer, observed.admission)
        status.phase = "Suspended"
        status.message = message
        transition("Suspended", True, reason, message)
        transition("Running", False, reason, message, event=False)
        stuck = reason == INADMISSIBLE
        if stuck or any(c.type == "Stalled" and c.status == "True" for c in status.conditions):
            transition("Stalled", stuck, reason if stuck else "Progressing", message if stuck else "")
        return decision
    if suspended or any(c.type == "Suspended" for c in status.conditions):  # no Resumed on a never-suspended job
        transition(
            "Suspended", suspended, "Suspended" if suspended else "Resumed", "spec.suspend is true" if suspended else ""
        )
    if suspended:
        status.phase = "Suspended"
        status.message = "suspended; resuming continues from the last checkpoint"
        transition("Running", False, "Suspended", status.message, event=False)
        return decision

    running = trainer is not None and trainer.active > 0 and trainer.ready > 0
    if running and trainer is not None:
        status.start_time = status.start_time or trainer.start_time or now
        transition("Running", True, "TrainerRunning", _summary(status))
        stalled = _stalled(job, status, trainer, now)
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
        reason, message = _waiting(observed.pods) if trainer is not None else ("Pending", "creating the workload")
        status.phase = "Pending"
        status.message = message
        transition("Running", False, reason, message, event=False)
        pending_since = trainer.start_time if trainer is not None and trainer.active > 0 else None
        too_long = pending_since is not None and now - pending_since > timedelta(seconds=job.spec.stall_timeout_seconds)
        if too_long or any(c.type == "Stalled" for c in status.conditions):
            transition(
                "Stalled",
                too_long,
                reason if too_long else "Progressing",
                f"pending for more than {job.spec.stall_timeout_seconds}s: {message}" if too_long else "",
            )
    return decision
