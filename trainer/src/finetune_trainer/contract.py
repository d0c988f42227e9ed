"""The contract between the operator and the trainer: everything both sides must agree on, once.

Torch-free (pydantic only), so the operator imports it: the API's names, the annotations and
labels, the environment the operator gives a trainer pod, the status the trainer writes (its wire
models, the keys it owns and their bounds) and the reasons a stop request may carry. The operator's
``finetune_operator.api.job`` embeds these; the trainer produces them. The training spec lives in
``spec``, the exit codes in ``exitcodes``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

__all__ = [
    "API_VERSION",
    "ARTIFACT_KINDS",
    "CATEGORIES",
    "CPU_REQUEST_ENV",
    "DATASET_HF_TOKEN_ENV",
    "DEFAULT_LOG_EVERY_STEPS",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_PVC_ROOT",
    "DEFAULT_REPORT_INTERVAL_SECONDS",
    "EARLY_STOPPED",
    "GPU_MEMORY_ENV",
    "GROUP",
    "HF_TOKEN_ENV",
    "JOB_NAMESPACE_ENV",
    "JOB_NAME_ENV",
    "JOB_UID_ENV",
    "KIND",
    "LOG_EVERY_STEPS_ENV",
    "MAX_ARTIFACTS",
    "MAX_CHECKPOINT_URI_LENGTH",
    "MAX_EVALUATIONS",
    "MAX_LINEAGE_LENGTH",
    "MAX_METRICS_PER_EVALUATION",
    "MAX_METRIC_NAME_LENGTH",
    "METRICS_ADDRESS_ENV",
    "METRICS_PORT_ENV",
    "OPERATOR_ENV",
    "PARAMETERS_ANNOTATION",
    "PLURAL",
    "PRUNED",
    "PVC_ROOT_ENV",
    "REPORT_INTERVAL_ENV",
    "S3_CREDENTIAL_KEYS",
    "SHARED_STATUS_KEYS",
    "SHORT_NAMES",
    "SINGULAR",
    "STOP_ANNOTATION",
    "STOP_REASON_ANNOTATION",
    "SWEEP_FINISHED",
    "SWEEP_KIND",
    "TERMINATION_GRACE_ENV",
    "TRACKING_SECRET_KEYS",
    "TRAINER_STATUS_KEYS",
    "USER_ENV",
    "USER_REQUESTED",
    "VERSION",
    "Artifact",
    "ArtifactKind",
    "BaseModelLineage",
    "BestResult",
    "EvaluationRecord",
    "MemoryPlan",
    "Progress",
    "StatusModel",
    "TrackingStatus",
    "TrainerStatus",
    "s3_env_prefix",
    "wire_keys",
]

# The API's names.
GROUP: Final = "finetune.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)
CATEGORIES: Final = ("finetune",)

# Annotations.
STOP_ANNOTATION: Final = f"{GROUP}/stop-requested"
"""``"true"`` asks the job to stop (a user, ``kubectl finetune stop``, a sweep); the trainer reads it too."""
STOP_REASON_ANNOTATION: Final = f"{GROUP}/stop-reason"
"""Set by a sweep beside ``finetune.dev/stop-requested: "true"``: Pruned or SweepFinished (anything else is a
user's stop)."""

# Stop reasons: what status.stopRequest.reason says (the operator writes it, the trainer reads it).
EARLY_STOPPED: Final = "EarlyStopped"
"""The early-stopping rule fired (the trainer stops as EarlyStopped; anything else is a plain stop)."""
USER_REQUESTED: Final = "UserRequested"
"""The stop annotation is set."""
PRUNED: Final = "Pruned"
"""Stop reason and Complete reason of a sweep trial its sweep judged unpromising."""
SWEEP_FINISHED: Final = "SweepFinished"
"""Stop reason of a trial still running when its sweep ended (goal reached, too many failed trials): it
completes as Stopped, keeping its best checkpoint, instead of burning its GPUs for a finished search."""

# The environment of a trainer pod.
JOB_NAME_ENV: Final = "FINETUNE_JOB_NAME"
JOB_NAMESPACE_ENV: Final = "FINETUNE_JOB_NAMESPACE"
"""With the name: the FineTuneJob whose status the trainer reports to (without them it reports nowhere)."""
JOB_UID_ENV: Final = "FINETUNE_JOB_UID"
"""The FineTuneJob's uid: checkpoints of another uid at the same output location are not resumed."""
METRICS_PORT_ENV: Final = "FINETUNE_METRICS_PORT"
METRICS_ADDRESS_ENV: Final = "FINETUNE_METRICS_ADDRESS"
"""Where /metrics listens: the pod IP (downward API) so pods sharing a network never collide; empty: all."""
REPORT_INTERVAL_ENV: Final = "FINETUNE_REPORT_INTERVAL_SECONDS"
PVC_ROOT_ENV: Final = "FINETUNE_PVC_ROOT"
"""Where ``pvc://claim`` is mounted: ``<root>/claim``."""
CPU_REQUEST_ENV: Final = "FINETUNE_CPU_REQUEST"
"""The pod's CPU request in whole cores (rounded up), set by the operator through the downward API."""
TERMINATION_GRACE_ENV: Final = "FINETUNE_TERMINATION_GRACE_SECONDS"
"""The pod's terminationGracePeriodSeconds: how long torchrun lets its workers save after SIGTERM
(``finetune_trainer.launch``)."""
HF_TOKEN_ENV: Final = "HF_TOKEN"
"""The model's token Secret (``spec.model.tokenSecretRef``)."""
DATASET_HF_TOKEN_ENV: Final = "FINETUNE_DATASET_HF_TOKEN"
"""The dataset's own token Secret (``spec.dataset.tokenSecretRef``); without it a hub dataset is read with the
model's token, as before."""
LOG_EVERY_STEPS_ENV: Final = "FINETUNE_LOG_EVERY_STEPS"
GPU_MEMORY_ENV: Final = "FINETUNE_GPU_MEMORY"
"""Bytes of each GPU the job asked for (``spec.resources.gpuMemory`` or a known ``nvidia.com/gpu.product``):
what the memory plan checks against where CUDA cannot say (set only for GPU jobs whose GPU memory is known)."""
TRACKING_SECRET_KEYS: Final = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""The keys of ``spec.tracking.credentialsSecretRef`` the trainer gets (each optional), as the MLflow client
reads them from its environment."""

# Sweeps: what a trial FineTuneJob carries of its FineTuneSweep (the trainer reads it to log a child run).
SWEEP_KIND: Final = "FineTuneSweep"
"""The kind of a trial's controlling owner."""
PARAMETERS_ANNOTATION: Final = f"{GROUP}/parameters"
"""Annotation on every trial: its parameters as JSON (name to value, or preset label), from which
the study is rebuilt."""
S3_CREDENTIAL_KEYS: Final = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""The keys of an S3 credentials Secret (``credentialsSecretRef``), as AWS tools name them."""


def s3_env_prefix(role: str) -> str:
    """The env prefix of the credentials of ``role``'s (model, dataset, output) S3 Secret.

    Each role may name its own Secret, so each gets its own variables (``FINETUNE_S3_MODEL_AWS_...``);
    without any Secret the plain ``AWS_*`` variables (IRSA, workload identity) are read.
    """
    return f"FINETUNE_S3_{role.upper()}_"


DEFAULT_METRICS_PORT: Final = 9400
DEFAULT_REPORT_INTERVAL_SECONDS: Final = 10
DEFAULT_PVC_ROOT: Final = "/mnt/pvc"
DEFAULT_LOG_EVERY_STEPS: Final = 10

OPERATOR_ENV: Final = frozenset(
    {
        JOB_NAME_ENV,
        JOB_NAMESPACE_ENV,
        JOB_UID_ENV,
        METRICS_PORT_ENV,
        METRICS_ADDRESS_ENV,
        REPORT_INTERVAL_ENV,
        PVC_ROOT_ENV,
        CPU_REQUEST_ENV,
        TERMINATION_GRACE_ENV,
        HF_TOKEN_ENV,
        DATASET_HF_TOKEN_ENV,
        GPU_MEMORY_ENV,
    }
)
"""What the operator sets on a trainer container (CPU_REQUEST_ENV, the two token variables and GPU_MEMORY_ENV
only when the spec names a CPU request, a token Secret or its GPUs' memory). With
``spec.tracking.credentialsSecretRef`` it also sets TRACKING_SECRET_KEYS, which the MLflow client reads itself."""
USER_ENV: Final = frozenset({LOG_EVERY_STEPS_ENV})
"""What the trainer also reads but the operator never sets (a user's ``extraEnv``, a laptop run)."""


class StatusModel(BaseModel):
    """Base of status models: camelCase; unknown fields ignored (written by several writers)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_wire(self) -> dict[str, Any]:
        """As stored: the fields that have a value."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_patch(self) -> dict[str, Any]:
        """As a JSON merge patch: every field given, ``None`` as ``null`` (which deletes a stored value);
        fields not given keep what is stored."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class Progress(StatusModel):
    """Live training progress reported by the trainer."""

    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    epoch: float = Field(0.0, description="Fractional epoch reached.")
    total_epochs: float | None = Field(None, description="Epochs planned.")
    percent: float = Field(0.0, description="step / totalSteps in percent.")
    eta_seconds: int | None = Field(None, description="Estimated seconds to the end of training.")
    samples_per_second: float | None = Field(None, description="Training throughput.")
    train_loss: float | None = Field(None, description="Recent training loss.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    last_heartbeat_time: datetime | None = Field(None, description="When the trainer last reported.")
    finalizing: bool | None = Field(
        None,
        description="True while the trainer restores the best weights and saves the final model after training: "
        "a stop is then enforced only after twice stopGracePeriodSeconds.",
    )


class EvaluationRecord(StatusModel):
    """One evaluation's results."""

    step: int = Field(description="Step at which the evaluation ran.")
    epoch: float | None = Field(None, description="Epoch at which the evaluation ran.")
    metrics: dict[str, float] = Field(description="Metric name to value (loss, accuracy, f1, perplexity).")
    time: datetime | None = Field(None, description="When the evaluation finished.")
    train_loss: float | None = Field(
        None,
        description="The mean training loss of the steps since the previous evaluation, logged or not (for the "
        "diagnosis).",
    )


class BestResult(StatusModel):
    """The best evaluation so far and where its weights are."""

    metric: str = Field(description="Monitored metric.")
    value: float = Field(description="Best value.")
    step: int = Field(description="Step of the best evaluation.")
    epoch: float | None = Field(None, description="Epoch of the best evaluation.")
    checkpoint: str | None = Field(None, description="URI of the checkpoint holding the best weights.")
    majority_baseline: float | None = Field(
        None,
        description="Classification: accuracy of always predicting the most frequent validation label.",
    )


class MemoryPlan(StatusModel):
    """The memory plan the trainer ran with (``finetune_trainer.memory_plan``): small, the details are in its
    freeze event and ``finetune-trainer --plan``."""

    strategy: Literal["ddp", "fsdp"] = Field(description="The strategy the run uses: ddp or fsdp.")
    requested: Literal["ddp", "fsdp", "auto"] | None = Field(
        None, description="spec.distributed.strategy: ddp, fsdp or auto."
    )
    world_size: int | None = Field(None, description="GPUs (ranks) in all.")
    gpu_memory_gi_b: float | None = Field(
        None, alias="gpuMemoryGiB", description="Memory of each GPU in GiB; unset when unknown."
    )
    per_gpu_gi_b: float | None = Field(
        None, alias="perGpuGiB", description="Estimated peak memory per GPU in GiB for the chosen strategy."
    )


MAX_EVALUATIONS: Final = 200
"""Evaluations kept in status: the trainer sends its most recent ones, the CRD and the admission policy
allow no more. 200 (not the trainer's former 50): the API has always allowed 200, and a longer curve
serves the diagnosis, ``kubectl finetune plot`` and a sweep's pruner; at most ~32 KB a patch."""
MAX_METRICS_PER_EVALUATION: Final = 16
MAX_METRIC_NAME_LENGTH: Final = 63
MAX_CHECKPOINT_URI_LENGTH: Final = 2048


MAX_ARTIFACTS: Final = 8
"""Published outputs listed in ``status.artifacts`` (a LoRA job publishes two: adapter and merged)."""
MAX_LINEAGE_LENGTH: Final = 256
"""Longest base revision or dataset fingerprint (a commit, or ``sha256:`` and 64 hex digits)."""
ArtifactKind = Literal["adapter", "merged", "model"]
ARTIFACT_KINDS: Final = get_args(ArtifactKind)
"""adapter: peft's LoRA adapter (load it onto the base); merged: the adapter merged into the base; model: a
fine-tuned model (no adapter)."""


LineageText = Annotated[str, StringConstraints(max_length=MAX_LINEAGE_LENGTH)]


class BaseModelLineage(StatusModel):
    """Which base model an artifact was trained from."""

    source: str = Field(description="spec.model.source as written.")
    revision: LineageText | None = Field(
        None,
        description="hf:// sources: the Hub commit the weights were read at. Other sources: sha256:<hex>, the hash "
        "of the manifest (path, size, sha256 of each file) of the base's config and weight files.",
    )


class Artifact(StatusModel):
    """One published output: where it is, what it is, its identity and its lineage."""

    uri: str = Field(
        max_length=MAX_CHECKPOINT_URI_LENGTH, description="Where it was published (inside output.location)."
    )
    kind: ArtifactKind = Field(
        description="adapter (peft LoRA adapter: load it onto baseModel), merged (the adapter merged into the "
        "base) or model (a fine-tuned model without adapters)."
    )
    size_bytes: int = Field(description="Total size of its files.")
    sha256: str = Field(
        max_length=64, description="sha256 of its manifest (finetune-manifest.json): the artifact's identity."
    )
    dtype: str | None = Field(None, max_length=16, description="Weight dtype it was saved in (bf16, fp16, fp32).")
    base_model: BaseModelLineage | None = Field(None, description="The base model it was trained from.")
    dataset_fingerprint: LineageText | None = Field(
        None,
        description="sha256:<hex> of the training and validation rows used (after reading, splitting and limiting; "
        "the content hash the tokenized-data cache keys on), the split names and the dataset's columns.",
    )


class TrackingStatus(StatusModel):
    """Where the run is in MLflow, and whether the trainer's logging is behind (the operator makes it a condition)."""

    run_id: str | None = Field(None, max_length=64, description="MLflow run id.")
    url: str | None = Field(None, max_length=2048, description="The run in the MLflow UI.")
    experiment_id: str | None = Field(None, max_length=64, description="MLflow experiment id.")
    parent_run_id: str | None = Field(None, max_length=64, description="A sweep trial: the sweep's run.")
    registered_model: str | None = Field(None, max_length=256, description="Registered model name.")
    registered_version: str | None = Field(None, max_length=64, description="The model version this job made.")
    behind: bool = Field(
        False,
        description="True while the tracking server cannot be reached or refuses what the trainer logs (training "
        "goes on; logging is retried), and when logging or registration gave up at the end.",
    )
    message: str | None = Field(None, max_length=1024, description="Why tracking is behind.")


class TrainerStatus(StatusModel):
    """The status keys the trainer writes, as one merge patch (a key left unset keeps its stored value).
    Every other status key is the operator's; the API server enforces the split with an admission
    policy generated from ``TRAINER_STATUS_KEYS`` and the bounds above."""

    progress: Progress | None = None
    evaluations: list[EvaluationRecord] | None = Field(None, max_length=MAX_EVALUATIONS)
    best: BestResult | None = None
    artifacts: list[Artifact] | None = Field(None, max_length=MAX_ARTIFACTS)
    memory_plan: MemoryPlan | None = None
    tracking: TrackingStatus | None = None


def wire_keys(model: type[BaseModel]) -> tuple[str, ...]:
    """A model's field names as they are on the wire (camelCase), in order."""
    return tuple(field.alias or name for name, field in model.model_fields.items())


TRAINER_STATUS_KEYS: Final = wire_keys(TrainerStatus)
"""The status keys the trainer writes (wire names); every other status key is the operator's."""
SHARED_STATUS_KEYS: Final = ("best",)
"""Trainer keys the operator writes too: it fills ``best`` from the evaluations only until the trainer
reports one with its checkpoint (a trainer image that reports no best still gets one)."""
