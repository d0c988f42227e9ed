"""The FineTuneJob API (finetune.dev/v1alpha1): spec and status as typed models.

The training part of the spec is the trainer's ``TrainingSpec``; this module adds what
only Kubernetes cares about (resources, scheduling, suspend, retries) and the status.
The CRD in ``crds/`` is generated from these classes by ``finetune_operator.generators.crd``.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel, to_snake

# The operator/trainer contract is part of this API: its names are re-exported from here.
from finetune_trainer.contract import *  # noqa: F403
from finetune_trainer.contract import (
    MAX_ARTIFACTS,
    MAX_EVALUATIONS,
    TRAINER_STATUS_KEYS,
    Artifact,
    BestResult,
    EvaluationRecord,
    MemoryPlan,
    Progress,
    StatusModel,
    TrackingStatus,
    wire_keys,
)
from finetune_trainer.exitcodes import PERMANENT, TABLE
from finetune_trainer.spec import (
    QUANTITY_PATTERN,
    TRAINING_RULES,
    Name,
    Rule,
    ShortText,
    SpecModel,
    TrainingSpec,
    quantity_value,  # noqa: F401  (re-exported: children.py compares quantities)
)

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/finetune-trainer:0.1.0"
LabelValue = Annotated[str, StringConstraints(max_length=63)]
QueueName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
"""A LocalQueue's name as the Job's queue label carries it (a DNS label)."""
Quantity = Annotated[int | str, Field(description="A Kubernetes quantity such as 4, 500m or 16Gi.")]


def _is_quantity(value: int | str | None) -> bool:
    if isinstance(value, str):
        return QUANTITY_PATTERN.fullmatch(value) is not None
    return value is None or value >= 0


def _quantity_rule(field: str) -> Rule:
    return Rule(
        field,
        "must be a Kubernetes quantity such as 4, 500m or 16Gi",
        f"!has(self.{field}) || (type(self.{field}) == int ? self.{field} >= 0 : isQuantity(self.{field}))",
        lambda r: _is_quantity(getattr(r, to_snake(field))),
    )


class Toleration(SpecModel):
    """A core/v1 Toleration, so GPU nodes with taints can run the workload."""

    key: ShortText | None = Field(None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: LabelValue | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None,
        description="For NoExecute: how long the pod stays bound after the taint appears.",
    )


DEFAULT_SCRATCH = "20Gi"
"""Size limit of the trainer's scratch volume when spec.resources.ephemeralStorage is unset."""
MAX_NODES = 1024
"""Upper bound of spec.resources.nodes: child names leave room for the largest pod index it allows."""


class Resources(SpecModel):
    """Compute for the training workload and where it may run."""

    rules = (
        _quantity_rule("cpu"),
        _quantity_rule("memory"),
        _quantity_rule("ephemeralStorage"),
        _quantity_rule("gpuMemory"),
    )

    gpus_per_node: int = Field(
        1,
        ge=0,
        le=64,
        description="GPUs requested by each training pod (0 runs on CPU).",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="Training pods (one per node). More than 1 runs an Indexed Job with torchrun rendezvous.",
    )
    cpu: Quantity | None = Field(None, description="CPU request and limit per pod, e.g. 8 or 7500m.")
    memory: Quantity | None = Field(None, description="Memory request and limit per pod, e.g. 64Gi.")
    ephemeral_storage: Quantity | None = Field(
        None,
        description="Local scratch space per pod: /tmp and the Hugging Face cache under it (an hf:// model is "
        f"downloaded there). That volume is bounded either way (at {DEFAULT_SCRATCH} when unset): a pod that "
        "outgrows it is evicted, and evictions count against backoffLimit. Set, it is also the pod's "
        "ephemeral-storage limit, and the pod requests ephemeral-storage (at most 1Gi), so a Kueue ClusterQueue "
        "must then cover ephemeral-storage; unset, the pod requests none.",
    )
    gpu_memory: Quantity | None = Field(
        None,
        description="Memory of each GPU, e.g. 80Gi: what the memory plan checks the job against (distributed."
        "strategy auto). Unset: read from a known nvidia.com/gpu.product in nodeSelector, else unknown (ddp). "
        "On the GPU, the trainer checks against the device's own memory.",
    )
    gpu_resource_name: Annotated[str, StringConstraints(max_length=253, pattern=r"^[a-z0-9.-]+/[a-z0-9._-]+$")] = Field(
        "nvidia.com/gpu",
        description="Extended resource name of the accelerator (e.g. amd.com/gpu).",
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels the training pods require.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=64,
        description="Tolerations of the training pods.",
    )
    affinity: dict[str, Any] | None = Field(
        None,
        description="A core/v1 Affinity for the training pods, passed through unchanged.",
    )
    priority_class_name: Name | None = Field(None, description="PriorityClass of the training pods.")
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = Field(
        None,
        description=f"Trainer image override (default {DEFAULT_TRAINER_IMAGE}).",
    )
    service_account_name: Name | None = Field(
        None,
        description="Run as this ServiceAccount instead of the per-job one the operator creates "
        "(it is still granted access to its job's status).",
    )


def _immutable(field: str, optional: bool) -> Rule:
    """A transition rule: a spec field may change only while the job is (or was) suspended."""
    if optional:
        same = f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
    else:
        same = f"self.{field} == oldSelf.{field}"
    return Rule(
        field,
        f"spec.{field} is immutable while the job is not suspended; set spec.suspend: true first",
        f"oldSelf.suspend || ({same})",
        reason="FieldValueForbidden",
    )


MUTABLE_FIELDS = frozenset({"suspend", "ttl_seconds_after_finished"})
"""The only spec fields a running job may change. Every other edit waits for a suspension and is
applied on resume (children whose content drifted are replaced), so the trainer never runs one
config while the operator enforces another."""


class FineTuneJobSpec(TrainingSpec):
    """Desired state of a FineTuneJob: the training spec plus how and where to run it."""

    resources: Resources = Field(
        default_factory=Resources,
        description="Compute and scheduling of the training pods.",
    )
    suspend: bool = Field(
        False,
        description="Suspend the workload (its Job is suspended; Kueue-compatible). Resuming continues from the last "
        "checkpoint. Training fields may be edited only while suspended.",
    )
    queue_name: QueueName | None = Field(
        None,
        description="Kueue LocalQueue to submit to (also read from the label kueue.x-k8s.io/queue-name). The Job is "
        "created suspended and Kueue alone unsuspends it when it admits it, or suspends it again to preempt it; the "
        "trainer then checkpoints and resumes on readmission. spec.suspend: true still wins.",
    )
    backoff_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="Retries of a crashed trainer (each resumes from its last checkpoint).",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job when it has run longer than this."
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the finished Job (not the FineTuneJob or its results) this long after its result is "
        "recorded in the status.",
    )
    stall_timeout_seconds: int = Field(
        900,
        ge=30,
        le=604800,
        description="Mark the job Stalled when a running trainer sends no progress for this long.",
    )
    stop_grace_period_seconds: int = Field(
        120,
        ge=0,
        le=86400,
        description="After asking the trainer to stop, wait this long before stopping the workload.",
    )


FineTuneJobSpec.rules = (
    *TRAINING_RULES,
    *(
        _immutable(to_camel(name), optional=not field.is_required() and field.default is None)
        for name, field in FineTuneJobSpec.model_fields.items()
        if name not in MUTABLE_FIELDS
    ),
)

ConditionType = Literal[
    "Running", "Complete", "Failed", "Suspended", "Stalled", "Ready", "Reconciling", "TrackingBehind"
]

CONDITION_TYPES: dict[ConditionType, str] = {
    "Running": "a trainer pod is running (True) or why not (False: Pending, Suspended, a final reason).",
    "Complete": "training finished; reason Succeeded, EarlyStopped or Stopped. `kubectl wait` for this one.",
    "Failed": "training failed for good; the reason says why (see REASONS).",
    "Suspended": "no pods run: spec.suspend is true (reason Suspended) or a queue holds the job (Queued).",
    "Stalled": "kstatus' abnormal-true condition: True when the job cannot progress without help "
    "(NoProgress, OwnershipConflict) and on every failure, with the Failed reason.",
    "Ready": "kstatus' summary: True when the job is where its spec wants it (complete, or suspended by the user).",
    "Reconciling": "kstatus' abnormal-true condition: True while the job works towards its spec "
    "(pending, queued, running).",
    "TrackingBehind": "spec.tracking only: True while the trainer's MLflow logging or model registration is behind "
    "(server unreachable, a refusal; the trainer's status.tracking.message says which). Training never waits for it.",
}
"""Every condition type the operator writes. GitOps tools (kstatus in Flux and kubectl tooling,
Argo CD's health.lua) read Ready/Reconciling/Stalled; people and `kubectl wait` read the rest."""

REASONS: dict[str, str] = {
    # in progress
    "Pending": "the Job exists but its pod is not running yet.",
    "TrainerRunning": "a trainer pod is running.",
    "Progressing": "the trainer reports progress (Stalled=False).",
    "Queued": "a queue (Kueue) holds the suspended Job until it admits it (Suspended=True, Reconciling=True).",
    # paused
    "Suspended": "spec.suspend is true; resuming continues from the last checkpoint.",
    "Resumed": "spec.suspend went back to false.",
    "Inadmissible": "Kueue cannot admit the job as it stands: its LocalQueue or ClusterQueue does not exist or is "
    "stopped, or it asks for more than the queue's whole quota; the message is Kueue's (Suspended=True, Stalled=True).",
    "Preempted": "Kueue evicted the running job (preemption, a queue stopped, ...): the trainer saved a checkpoint and "
    "the job resumes from it when Kueue admits it again (Suspended=True, Reconciling=True).",
    # stuck
    "NoProgress": "the trainer sent no progress report for stallTimeoutSeconds.",
    "OwnershipConflict": "a child object of the job's name exists and is owned by someone else.",
    "CreateFailed": "the API server refused a child (quota, webhook, policy, name); the message is its own.",
    "Unschedulable": "the trainer pod waits for a node (the scheduler's message).",
    "SpecNotUnderstood": "a started job whose stored spec this operator version cannot read; its workload runs on.",
    # finished
    "Succeeded": "training ran to its end.",
    "EarlyStopped": "the early-stopping rule fired; the best checkpoint is kept.",
    "Stopped": "a user asked the job to stop (annotation finetune.dev/stop-requested).",
    "StopEnforced": "the trainer did not stop within the grace period after a stop request; the operator "
    "stopped its workload (the best checkpoint is in status.best; the final model may be missing).",
    "Pruned": "a sweep trial stopped early as unpromising (its sweep asked it to stop); its best checkpoint is kept.",
    # sweeps (FineTuneSweep)
    "TrialsRunning": "the sweep creates and runs trials.",
    "GoalReached": "a sweep trial reached spec.objective.goal; no more trials are created.",
    "MaxTrialsReached": "the sweep ran spec.maxTrials trials; raising maxTrials resumes it.",
    "SearchSpaceExhausted": "the grid sweep tried every combination.",
    "TooManyFailedTrials": "spec.maxFailedTrials trials of the sweep failed; no more trials are created.",
    # tracking (TrackingBehind)
    "TrackingBehind": "the trainer cannot log to (or register in) MLflow for now; it retries, training goes on.",
    "TrackingSynced": "everything the trainer logged reached MLflow.",
    # failed
    "InvalidSpec": "the spec passed the API server but not the operator's models; nothing was created.",
    "OperatorNamespace": "the job or sweep is in the operator's own namespace, where a pod could run as the "
    "operator's ServiceAccount; nothing was created (run it in another namespace).",
    "BackoffLimitExceeded": "the trainer failed more than spec.backoffLimit times.",
    "DeadlineExceeded": "spec.activeDeadlineSeconds passed.",
    "JobFailed": "the training Job failed for a reason Kubernetes did not name.",
    "Evicted": "the trainer's pods were evicted (ephemeral storage, node pressure) more than spec.backoffLimit times.",
    **{
        row.reason: f"trainer exit code {row.code}, not retried: {row.meaning}."
        for row in TABLE
        if row.code in PERMANENT
    },
}
"""Every condition reason the operator writes, and what it means. Extend this table; never invent
reasons elsewhere (a unit test checks that every reason the reconcile core writes is listed here)."""

FAILURE_REASONS: tuple[str, ...] = (
    "InvalidSpec",
    "OperatorNamespace",
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "JobFailed",
    "Evicted",
    *PERMANENT.values(),
)
"""Reasons of the Failed condition that the operator names itself (a Job may add its own)."""

OPERATOR_NAMESPACE = "OperatorNamespace"
"""Failed: a job or sweep in the operator's own namespace (refused, nothing created)."""
OWNERSHIP_CONFLICT = "OwnershipConflict"
"""Stalled: a child's name is taken by an object another owner controls (never adopted nor deleted)."""
CREATE_FAILED = "CreateFailed"
"""Stalled: the API server refused a child (quota, webhook, policy, name); the message is its own."""
UNSCHEDULABLE = "Unschedulable"
"""Running=False while the pod waits for a node (the scheduler's message)."""
VERSION_SKEW = "SpecNotUnderstood"
"""A started job whose stored spec this operator version cannot read: its workload is left running."""
QUEUED = "Queued"
"""Suspended: Kueue holds the Job until it admits it (Kueue's message)."""
INADMISSIBLE = "Inadmissible"
"""Suspended and Stalled: Kueue says it cannot admit the job as it stands (no such queue, too large, a
resource its ClusterQueue does not cover); the message is Kueue's, with the fix where we know it."""
PREEMPTED = "Preempted"
"""Suspended: Kueue evicted the running job; it resumes from its checkpoint when readmitted."""
KUEUE_HOLDS = (QUEUED, INADMISSIBLE, PREEMPTED)
"""Suspended reasons of a job Kueue holds: work in progress, not a user's pause."""
Phase = Literal["Pending", "Running", "Suspended", "Stalled", "Succeeded", "EarlyStopped", "Pruned", "Failed"]


class Condition(StatusModel):
    """A Kubernetes-convention condition (metav1.Condition shape)."""

    type: ConditionType = Field(description="Running, Complete, Failed, Suspended, Stalled, Ready or Reconciling.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: Annotated[str, StringConstraints(max_length=1024)] = Field(description="CamelCase machine-readable reason.")
    message: Annotated[str, StringConstraints(max_length=32768)] = Field("", description="Human-readable detail.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(None, description="metadata.generation this condition was computed from.")


class Diagnosis(StatusModel):
    """One finding about the run's learning curves (see docs/advice.md)."""

    code: str = Field(max_length=64, description="Overfitting, BestAtFirstEvaluation, NoBetterThanBaseline, ...")
    severity: Literal["Info", "Warning"] = Field(description="Warning: probably worth another run.")
    message: str = Field(max_length=1024, description="What it means and what to try.")
    evidence: str = Field(max_length=1024, description="The numbers it rests on.")


class EarlyStoppingStatus(StatusModel):
    """The operator's evaluation of the early-stopping rule."""

    metric: str = Field(description="Monitored metric.")
    mode: Literal["min", "max"] = Field(description="min or max.")
    patience: int = Field(description="Evaluations without improvement allowed.")
    best_value: float | None = Field(None, description="Best value seen.")
    best_step: int | None = Field(None, description="Step of the best value.")
    evaluations_without_improvement: int = Field(0, description="Evaluations since the best one.")
    last_step: int | None = Field(None, description="Step of the last evaluation applied.")
    triggered: bool = Field(False, description="True once patience is exhausted.")
    reason: str | None = Field(None, description="Why training stopped early.")


class StopRequest(StatusModel):
    """A request to the trainer to save and stop; set by the operator, read by the trainer."""

    reason: str = Field(description="EarlyStopped, UserRequested, or (sweep trials) Pruned or SweepFinished.")
    message: str = Field("", description="Detail.")
    requested_time: datetime = Field(description="When the stop was requested.")


class WorkloadRefs(StatusModel):
    """Names of the children the operator created."""

    job: str | None = Field(None, description="batch/v1 Job.")
    service: str | None = Field(None, description="Headless Service (multi-node).")
    config_map: str | None = Field(None, description="ConfigMap with the rendered trainer config.")
    service_account: str | None = Field(None, description="ServiceAccount the trainer runs as.")


EVICTED = "Evicted"
"""Failed reason when the trainer's pods were evicted (ephemeral storage, node pressure) too often."""
STOP_ENFORCED = "StopEnforced"
"""Complete reason when the trainer did not stop on request and the operator stopped its workload."""


class FineTuneJobStatus(StatusModel):
    """Observed state of a FineTuneJob."""

    observed_generation: int | None = Field(None, description="metadata.generation the status reflects.")
    phase: Phase | None = Field(
        None,
        description="Summary for humans and printer columns; automation should read conditions.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Running, Complete, Failed, Suspended, Stalled, Ready, Reconciling (kstatus reads the last three).",
    )
    start_time: datetime | None = Field(None, description="When the workload first ran.")
    completion_time: datetime | None = Field(None, description="When the job finished.")
    progress: Progress | None = Field(None, description="Live training progress.")
    evaluations: list[EvaluationRecord] = Field(
        default_factory=list,
        max_length=MAX_EVALUATIONS,
        description="Most recent evaluations (bounded; oldest dropped first).",
    )
    best: BestResult | None = Field(None, description="Best evaluation and its checkpoint.")
    artifacts: list[Artifact] = Field(
        default_factory=list,
        max_length=MAX_ARTIFACTS,
        description="Published outputs (the final model; a LoRA job's adapter and merged model), each with its "
        "manifest's sha256 and its lineage (trainer-written).",
    )
    memory_plan: MemoryPlan | None = Field(
        None, description="The trainer's memory plan: the strategy it chose and its per-GPU estimate."
    )
    early_stopping: EarlyStoppingStatus | None = Field(None, description="Early-stopping rule state.")
    stop_request: StopRequest | None = Field(None, description="Set when the trainer has been asked to stop.")
    workload: WorkloadRefs | None = Field(None, description="Children created for this job.")
    restarts: int = Field(0, description="Trainer pods that failed and were retried.")
    diagnosis: list[Diagnosis] = Field(
        default_factory=list, max_length=16, description="What the learning curves say (operator-written)."
    )
    message: str | None = Field(None, description="Latest human-readable summary.")
    tracking: TrackingStatus | None = Field(None, description="The MLflow run (trainer-written; spec.tracking only).")


OPERATOR_STATUS_KEYS: tuple[str, ...] = tuple(
    key for key in wire_keys(FineTuneJobStatus) if key not in TRAINER_STATUS_KEYS
)
"""The status keys only the operator writes: all but the trainer's (the admission policy keeps them so)."""


class ObjectMeta(BaseModel):
    """The subset of metadata the operator reads."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", alias_generator=to_camel)

    name: str
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


OBJECT_RULES: tuple[Rule, ...] = (
    Rule(
        "metadata.name",
        "metadata.name of a multi-node job must start with a letter: it names the rendezvous Service",
        "self.spec.resources.nodes == 1 || self.metadata.name.matches('^[a-z]')",
        lambda job: job.spec.resources.nodes == 1 or job.metadata.name[:1].isalpha(),
    ),
)
"""Rules on the whole object (the CRD's root), for names that could never work."""


KUEUE_GROUP, KUEUE_VERSION, KUEUE_WORKLOADS = "kueue.x-k8s.io", "v1beta2", "workloads"
"""Kueue's Workload API, which holds its verdict on a queued Job: admitted, waiting and why, evicted."""
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""The label Kueue reads on a Job: which LocalQueue it waits in."""
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
"""The label Kueue reads on a Job: its WorkloadPriorityClass (else the pods' PriorityClass counts)."""


class FineTuneJob(BaseModel):
    """A whole FineTuneJob object."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", alias_generator=to_camel)

    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)

    @property
    def queue_name(self) -> str | None:
        """The Kueue LocalQueue this job waits in: spec.queueName, else the FineTuneJob's queue label."""
        return self.spec.queue_name or self.metadata.labels.get(KUEUE_QUEUE_LABEL) or None

    @model_validator(mode="after")
    def _apply_object_rules(self) -> Self:
        for rule in OBJECT_RULES:
            if rule.holds is not None and not rule.holds(self):
                raise ValueError(f"{rule.field}: {rule.message}")
        return self


def read_stored(body: dict[str, Any]) -> FineTuneJob:
    """A stored FineTuneJob, read tolerantly: fields this version does not know (written under a
    newer CRD, or kept after a rollback) are ignored, so operator/CRD version skew never fails a
    job. New specs are still checked strictly: by the CRD at the API server, and by pydantic on
    every field this version does know. Raises ``ValidationError`` for a spec that is wrong
    rather than newer. The body is copied only when there is something to drop (a copy per reconcile
    cost every reconcile for nothing)."""
    data = body
    for _ in range(16):
        try:
            return FineTuneJob.model_validate(data)
        except ValidationError as error:
            unknown = [e["loc"] for e in error.errors() if e["type"] == "extra_forbidden"]
            if not unknown:
                raise
            data = copy.deepcopy(data) if data is body else data
            try:
                for location in unknown:
                    _drop(data, location)
            except (KeyError, IndexError, TypeError):
                raise error from None
    return FineTuneJob.model_validate(data)


def _drop(data: Any, location: tuple[int | str, ...]) -> None:
    *parents, key = location
    for part in parents:
        data = data[part]
    del data[key]
