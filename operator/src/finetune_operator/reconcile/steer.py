"""What the operator does to the trainer's batch Job and to Kueue's Workload, and what it reads first. Pure.

``decide`` is the whole reconcile of a FineTuneJob as the shell sees it: the status (``status.decide``),
the health conditions (``health``) and every action on the children, named in one ``Decision``. The
shell only gathers what the ``*_wanted`` functions here ask for, calls ``decide`` and carries it out.

Two objects are easily confused: the trainer Job is the batch/v1 Job that runs the trainer's pods;
Kueue's Workload is Kueue's record of that Job in a queue (admitted or not, ``spec.active``). The
public ``status.workload`` names the children; it is neither.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from finetune_operator.api.job import KIND, KUEUE_QUEUE_LABEL, OPERATOR_NAMESPACE, FineTuneJob, FineTuneJobStatus
from finetune_operator.reconcile import health
from finetune_operator.reconcile.children import content_hash, controller_of, owned_by
from finetune_operator.reconcile.kinds import BY_KIND
from finetune_operator.reconcile.observe import spec_hash_of
from finetune_operator.reconcile.status import (
    Decision,
    Observed,
    ObservedJob,
    ObservedPod,
    is_finished,
    not_understood,
    operator_namespace_refusal,
)

Manifest = dict[str, Any]
FINISHED_POD_PHASES = ("Succeeded", "Failed")


def decide(job: FineTuneJob, observed: Observed, now: datetime) -> Decision:
    """The next status of ``job``, its health, and every action on its trainer Job and Kueue Workloads."""
    decision = health.decide(job, observed, now)
    steer(job, observed, decision)
    return decision


def _pods_left(pods: tuple[ObservedPod, ...]) -> bool:
    """A pod of the Job that may still run or write: not yet Succeeded or Failed (a terminating one saves)."""
    return any(p.phase not in FINISHED_POD_PHASES for p in pods)


def _drifted(trainer: ObservedJob, observed: Observed) -> bool:
    return observed.desired_hash is not None and trainer.spec_hash != observed.desired_hash


def steer(job: FineTuneJob, observed: Observed, decision: Decision) -> None:
    """Fill in the actions on the trainer Job and Kueue's Workloads that follow from ``decision.status``."""
    trainer = observed.job
    if trainer is None or trainer.gone:
        return
    if not decision.trainer_job_wanted:  # finished
        if not trainer.ended and (trainer.queue_label is not None or job.queue_name is not None):
            # Stopped while Kueue held it: Kueue would admit and unsuspend it when quota frees, and a
            # finished job's trainer would run again. Its result is recorded; the Job goes (its Workload too).
            decision.delete_trainer_job = True
            return
        ttl = job.spec.ttl_seconds_after_finished
        if ttl is not None and trainer.ttl_seconds_after_finished != ttl:
            decision.ttl_seconds_after_finished = ttl
        return
    halt = decision.halt_trainer_job
    want_suspended = halt or (job.spec.suspend and decision.status.stop_request is None)
    # Edited while suspended (the only time the CRD allows it): the Job is replaced, and resumes from the
    # last checkpoint. Not before every pod of the old Job has gone: a new trainer's start-up cleanup
    # would delete the checkpoint an old one is still saving. Meanwhile the old Job stays suspended.
    replacing = trainer.suspended and not halt and _drifted(trainer, observed)
    if replacing:
        decision.replace_trainer_job = not (trainer.active or trainer.terminating or _pods_left(observed.pods))
    elif trainer.suspended != want_suspended and not (job.queue_name is not None and not want_suspended):
        decision.suspend_trainer_job = want_suspended  # a queued Job is unsuspended by Kueue alone, when it admits it
    if job.queue_name is not None and not want_suspended and not replacing and trainer.queue_label is None:
        decision.add_queue_label = job.queue_name  # created while the user had suspended it: now Kueue's
    # Kueue unsuspends any Job it has admitted: to keep a queued job suspended (the user's spec.suspend, a
    # stop being enforced) its Workload is deactivated, and activated again after; never for a Job about
    # to be replaced (its spec is stale).
    want_active = not want_suspended and not replacing
    decision.kueue_active = tuple((w, want_active) for w in observed.kueue_workloads if w.active != want_active)


def trainer_job_to_read(cached: Manifest | None, status: FineTuneJobStatus) -> bool:
    """Read the trainer Job from the API server: the watch has not delivered it (just restarted), the
    status says one was made, and the job is not finished (a finished job's Job arrives by its watch)."""
    return cached is None and status.workload is not None and not is_finished(status)


def children_wanted(
    status: FineTuneJobStatus, trainer: ObservedJob | None, ensure: bool, conflicts: tuple[str, ...] | list[str]
) -> bool:
    """Create missing children and repair drifted ones: asked for (a child was deleted), no trainer Job
    yet, or none recorded; never for a finished job, a Job that ended, or while another owner holds a name."""
    wanted = ensure or trainer is None or status.workload is None
    return wanted and not is_finished(status) and not conflicts and not (trainer is not None and trainer.ended)


def pods_wanted(trainer: ObservedJob | None, desired_hash: str | None) -> bool:
    """List the trainer's pods: why the Job failed, why it is not running yet, or whether any pod of a Job
    to be replaced is left."""
    if trainer is None:
        return False
    if trainer.failed_condition or (trainer.active > trainer.ready and not trainer.suspended):
        return True
    return trainer.suspended and desired_hash is not None and trainer.spec_hash != desired_hash


def kueue_wanted(job: FineTuneJob, status: FineTuneJobStatus, trainer: ObservedJob | None) -> bool:
    """List Kueue's Workloads of the trainer Job while Kueue holds it (suspended), or while it must be held
    (the user's suspend, a stop): their verdict goes to the status, and their ``active`` may need a switch."""
    if job.queue_name is None or trainer is None or trainer.gone or trainer.ended or is_finished(status):
        return False
    return trainer.suspended or job.spec.suspend or status.stop_request is not None


def repair(desired: Manifest, existing: Manifest, job: FineTuneJob) -> Literal["conflict", "adopt", "replace", "keep"]:
    """A child that already exists: another owner's (a conflict: never adopted, never deleted), the trainer
    Job (observed as it is; its drift is ``steer``'s), drifted from the spec (its content is replaced), or fine.
    Drift is judged by what the child holds, not only by its spec-hash annotation, which an edit can keep."""
    if not owned_by(existing, job):
        return "conflict"
    kind = desired["kind"]
    if kind == "Job":
        return "adopt"
    if BY_KIND[kind].content_free:
        return "keep"
    if spec_hash_of(existing) == spec_hash_of(desired) and content_hash(existing) == content_hash(desired):
        return "keep"
    return "replace"


def content_drifted(held: dict[tuple[str, str], str], desired: dict[tuple[str, str], str]) -> bool:
    """Whether a child holds other content than the spec asks for (both by (kind, name) -> ``content_hash``):
    its children are then ensured, and the drifted one replaced (``repair``)."""
    return any(ref in desired and desired[ref] != value for ref, value in held.items())


def conflict(kind: str, name: str, existing: Manifest) -> str:
    """The status message of a child whose name another owner holds."""
    owner = controller_of(existing)
    holder = f"{owner.get('kind')} {owner.get('name')} (uid {owner.get('uid')})" if owner else "no controller"
    return f"{kind} {name} exists and is controlled by {holder}, not by this FineTuneJob; waiting for it to go"


def desired_hash_wanted(trainer: ObservedJob | None) -> bool:
    """Whether the hash of the Job the spec asks for matters now (rendering it costs): only a suspended Job
    is replaced when the spec moved."""
    return trainer is not None and trainer.suspended and not trainer.gone and not trainer.ended


def trainer_job_patch(decision: Decision) -> Manifest | None:
    """The merge patch on the trainer Job that carries out ``suspend_trainer_job`` and ``add_queue_label``."""
    patch: Manifest = {}
    if decision.suspend_trainer_job is not None:
        patch["spec"] = {"suspend": decision.suspend_trainer_job}
    if decision.add_queue_label is not None:
        patch["metadata"] = {"labels": {KUEUE_QUEUE_LABEL: decision.add_queue_label}}
    return patch or None


def refused_in_operator_namespace(
    status: FineTuneJobStatus, namespace: str, operator_namespace: str | None, generation: int | None, now: datetime
) -> Decision | None:
    """A FineTuneJob in the operator's own namespace fails (``OperatorNamespace``) unless finished already;
    None when it is elsewhere."""
    message = operator_namespace_refusal(namespace, operator_namespace, KIND)
    if message is None or is_finished(status):
        return None
    return health.invalid_spec(status, message, generation, now, OPERATOR_NAMESPACE)


def unreadable_spec(status: FineTuneJobStatus, message: str, generation: int | None, now: datetime) -> Decision | None:
    """A stored spec the models reject: a finished job stays finished (None: nothing to do), a started one
    is never abandoned (operator/CRD version skew), a new one fails as InvalidSpec."""
    if is_finished(status):
        return None
    if status.workload is not None:
        return not_understood(status, message, now)
    return health.invalid_spec(status, message, generation, now)
