"""The training spec: what a fine-tuning run *is*.

Pure pydantic, no torch, so the operator can import it and the CRD can be generated
from it. Field names are camelCase on the wire (Kubernetes convention) and snake_case in
Python. Each cross-field rule is one ``Rule``: its CEL form goes into the CRD for the API
server and its Python form is checked by pydantic, side by side so they cannot drift apart
unnoticed (``tests/manifests.py`` runs the same invalid cases against both).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

# Bounded scalar types. Every string and list carries a maximum so that the API server
# can estimate the cost of the CEL rules that read them.
Name = Annotated[str, StringConstraints(min_length=1, max_length=253)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"not a valid regular expression: {error}") from None
    return pattern


# CEL cannot check that a regex compiles; pydantic can, so such a spec fails as InvalidSpec.
Regex = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_compiles)]
Location = Annotated[str, StringConstraints(min_length=1, max_length=2048)]

QUANTITY_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
"""A Kubernetes quantity: 4, 500m, 16Gi (the API server's own syntax, without exponents)."""
_QUANTITY_FACTORS: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    **{suffix: Decimal(1000) ** (power + 1) for power, suffix in enumerate("kMGTPE")},
    **{f"{suffix}i": Decimal(1024) ** (power + 1) for power, suffix in enumerate("KMGTPE")},
}


def quantity_value(value: int | str) -> Decimal:
    """A quantity (``4``, ``500m``, ``16Gi``) as a number, to compare two of them."""
    text = str(value)
    match = QUANTITY_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    suffix = match.group(2) or ""
    return Decimal(text[: len(text) - len(suffix)]) * _QUANTITY_FACTORS[suffix]


S3_URI_PATTERN = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^@]*)?"
"""``s3://bucket/prefix``: a DNS-style bucket name, no user-info (``s3://key:secret@...`` does not match)."""
_LOCAL = r"pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|file:///.*|/.*"
MODEL_SOURCE_PATTERN = rf"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?|{S3_URI_PATTERN}|{_LOCAL})$"
DATASET_SOURCE_PATTERN = (
    rf"^(hf://datasets/[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?|{S3_URI_PATTERN}|{_LOCAL})$"
)
OUTPUT_LOCATION_PATTERN = rf"^({S3_URI_PATTERN}|{_LOCAL})$"

CACHE_LOCATION_PATTERN = r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|file:///.*|/.*)$"

Task = Literal["sequence-classification", "causal-lm", "image-classification"]
CLASSIFICATION_TASKS: frozenset[str] = frozenset({"sequence-classification", "image-classification"})
Metric = Literal[
    "loss",
    "accuracy",
    "f1",
    "f1_macro",
    "f1_weighted",
    "precision",
    "recall",
    "auroc",
    "top5_accuracy",
    "perplexity",
]
LOWER_IS_BETTER: frozenset[str] = frozenset({"loss", "perplexity"})
CLASSIFICATION_METRICS: tuple[str, ...] = tuple(m for m in get_args(Metric) if m not in LOWER_IS_BETTER)
"""Metrics of predicted classes (computed in finetune_trainer.metrics); higher is better."""
LAYER_STRATEGIES: frozenset[str] = frozenset({"bottom-layers", "top-layers"})


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, stated once for both validators.

    ``cel`` goes into the CRD (``x-kubernetes-validations``, checked by the API server);
    ``holds`` is the same rule in Python (checked by pydantic in the operator and trainer).
    ``field`` is the camelCase path, relative to the model, that a violation is reported on.
    Transition rules (reading ``oldSelf``) have no Python side.
    """

    field: str
    message: str
    cel: str
    holds: Callable[[Any], bool] | None = None
    reason: str | None = None

    def schema(self) -> dict[str, str]:
        entry = {"rule": self.cel, "message": self.message, "fieldPath": f".{self.field}"}
        if self.reason:
            entry["reason"] = self.reason
        return entry


def _rules_into_schema(schema: dict[str, Any], cls: type[Any]) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.schema() for rule in rules]


class SpecModel(BaseModel):
    """Base of every API model: camelCase aliases, unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        json_schema_extra=_rules_into_schema,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _apply_rules(self) -> Self:
        for rule in self.rules:
            if rule.holds is not None and not rule.holds(self):
                raise ValueError(f"{rule.field}: {rule.message}")
        return self

    @field_validator("*", mode="after")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        """The API server keeps integers as int64 and rejects larger ones; so do the models (found by fuzzing)."""
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ValueError("must fit in a 64-bit integer")
        return value

    def to_wire(self) -> dict[str, Any]:
        """The JSON shape Kubernetes stores: camelCase, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SecretKeyRef(SpecModel):
    """A key in a Secret of the job's namespace."""

    name: Name = Field(description="Name of the Secret in the FineTuneJob's namespace.")
    key: ShortText = Field("token", description="Key inside the Secret.")


class LocalSecretRef(SpecModel):
    """A Secret of the job's namespace (all of its keys are read)."""

    name: Name = Field(description="Name of the Secret in the FineTuneJob's namespace.")


class S3Storage(SpecModel):
    """How to reach an S3-compatible object store (AWS S3, GCS's S3 API, MinIO, Ceph RGW, SeaweedFS)."""

    endpoint: Annotated[str, StringConstraints(max_length=2048, pattern=r"^https?://[^\s/@]+(/.*)?$")] | None = Field(
        None, description="Endpoint URL, e.g. http://minio.storage:9000; unset: AWS S3 of the region."
    )
    region: ShortText | None = Field(None, description="Region (AWS_REGION when unset, else us-east-1).")
    path_style: bool | None = Field(
        None,
        description="Path-style addressing (endpoint/bucket/key). Unset: on when an endpoint is set, else off.",
    )
    credentials_secret_ref: LocalSecretRef | None = Field(
        None,
        description=(
            "Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN. Unset: the "
            "pod's own identity from its environment (IRSA / workload identity of spec.serviceAccountName)."
        ),
    )


def _no_credentials_in_uri(field: str, attribute: str) -> Rule:
    return Rule(
        field,
        "an s3:// URI must not carry credentials: use storage.s3.credentialsSecretRef",
        f"!self.{field}.startsWith('s3://') || !self.{field}.contains('@')",
        lambda m: not (getattr(m, attribute).startswith("s3://") and "@" in getattr(m, attribute)),
    )


def _s3_only_for_s3(field: str, attribute: str) -> Rule:
    return Rule(
        "s3",
        f"s3 is only meaningful for an s3:// {field}",
        f"!has(self.s3) || self.{field}.startsWith('s3://')",
        lambda m: m.s3 is None or getattr(m, attribute).startswith("s3://"),
    )


S3_OVERRIDE_DESCRIPTION = "S3 settings for this s3:// location only; unset: spec.storage.s3."


class CacheSpec(SpecModel):
    """Where downloaded s3:// sources are kept, keyed by content (bucket, key, ETag)."""

    location: Location = Field(
        pattern=CACHE_LOCATION_PATTERN,
        description=(
            "pvc://claim/path (a claim shared by the namespace: retries, resumes and sweep trials download "
            "once), or file:///path. Unset: the pod's scratch volume (a retry of the same pod reuses it)."
        ),
    )
    max_size_gib: int = Field(
        50,
        ge=1,
        le=1000000,
        description="The cache is kept under this size: least recently used entries are removed first.",
    )


class StorageSpec(SpecModel):
    """Job-wide storage settings."""

    s3: S3Storage | None = Field(None, description="Default S3 settings for every s3:// URI of the job.")
    cache: CacheSpec | None = Field(None, description="Download cache of s3:// sources; unset: the pod's scratch.")


class StageableSource(SpecModel):
    """A source the storage stage may replace by a local copy (``s3://``): the URI as written stays known,
    for the lineage in ``status.artifacts`` and the tracking tags (not the cache directory it was read from)."""

    if TYPE_CHECKING:
        source: str
        s3: S3Storage | None

    _written: str | None = PrivateAttr(None)

    @property
    def written_source(self) -> str:
        """The source as the user wrote it."""
        return self._written or self.source

    def staged(self, directory: str) -> Self:
        """This source read from ``directory`` (a local copy), remembering the URI it was copied from."""
        copy = self.model_copy(update={"source": f"file://{directory}", "s3": None})
        copy._written = self.written_source
        return copy


class ModelSpec(StageableSource):
    """The pretrained model to start from and the head to put on it."""

    rules = (
        Rule(
            "revision",
            "revision is only meaningful for hf:// sources",
            "!has(self.revision) || self.source.startsWith('hf://')",
            lambda m: m.revision is None or m.source.startswith("hf://"),
        ),
        Rule(
            "tokenSecretRef",
            "tokenSecretRef is only meaningful for hf:// sources",
            "!has(self.tokenSecretRef) || self.source.startsWith('hf://')",
            lambda m: m.token_secret_ref is None or m.source.startswith("hf://"),
        ),
        _no_credentials_in_uri("source", "source"),
        _s3_only_for_s3("source", "source"),
        Rule(
            "labelNames",
            "labelNames must have exactly numLabels entries",
            "!has(self.labelNames) || !has(self.numLabels) || size(self.labelNames) == self.numLabels",
            lambda m: m.label_names is None or m.num_labels is None or len(m.label_names) == m.num_labels,
        ),
    )

    source: Location = Field(
        pattern=MODEL_SOURCE_PATTERN,
        description=(
            "Where the pretrained weights are: hf://org/name (Hugging Face hub id), "
            "pvc://claim/path (a directory on a PersistentVolumeClaim), s3://bucket/prefix (downloaded once "
            "into the cache) or file:///path (a directory inside the trainer container)."
        ),
    )
    s3: S3Storage | None = Field(None, description=S3_OVERRIDE_DESCRIPTION)
    revision: ShortText | None = Field(None, description="Hub revision (branch, tag or commit) for hf:// sources.")
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Secret holding a hub access token for private hf:// models; never copied into status or logs.",
    )
    task: Task = Field(
        description="The head to put on the model: sequence-classification, causal-lm or image-classification."
    )
    num_labels: int | None = Field(None, ge=2, le=100000, description="Number of classes for classification tasks.")
    label_names: list[ShortText] | None = Field(
        None,
        min_length=2,
        max_length=1000,
        description="Class names, index i naming label i (sets numLabels when that is unset).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the model. Off by default: it executes untrusted code.",
    )

    @property
    def effective_num_labels(self) -> int | None:
        if self.num_labels is not None:
            return self.num_labels
        return len(self.label_names) if self.label_names is not None else None


class DatasetFields(SpecModel):
    """Which columns of the dataset hold what."""

    text: ShortText = Field("text", description="Column with the input text (text tasks).")
    text_pair: ShortText | None = Field(
        None,
        description="Optional second text column for sentence-pair classification.",
    )
    label: ShortText = Field(
        "label",
        description="Column with the class label: an integer index or one of labelNames.",
    )
    image: ShortText = Field(
        "image",
        description="Column with the image path, relative to the dataset source (image tasks).",
    )
    messages: ShortText | None = Field(
        None,
        description="Column with chat messages ([{role, content}]), rendered with the tokenizer's chat template "
        "(causal-lm).",
    )


def _hub_only(field: str, name: str) -> Rule:
    """``field`` (Python ``name``) of a dataset is set only for an hf://datasets source."""
    return Rule(
        field,
        f"{field} is only meaningful for hf://datasets sources",
        f"!has(self.{field}) || self.source.startsWith('hf://')",
        lambda d: getattr(d, name) is None or bool(d.source.startswith("hf://")),
    )


class DatasetSpec(StageableSource):
    """Training and validation data."""

    rules = (
        Rule(
            "validationFraction",
            "set either validation or validationFraction, not both",
            "!(has(self.validation) && has(self.validationFraction))",
            lambda d: d.validation is None or d.validation_fraction is None,
        ),
        _hub_only("subset", "subset"),
        _hub_only("revision", "revision"),
        _hub_only("tokenSecretRef", "token_secret_ref"),
        _no_credentials_in_uri("source", "source"),
        _s3_only_for_s3("source", "source"),
    )

    source: Location = Field(
        pattern=DATASET_SOURCE_PATTERN,
        description="Base location: pvc://claim/dir, s3://bucket/prefix, file:///dir, or hf://datasets/org/name.",
    )
    subset: ShortText | None = Field(
        None,
        description="hf://datasets sources: the dataset's configuration (subset) name, e.g. sst2 of glue.",
    )
    revision: ShortText | None = Field(
        None, description="hf://datasets sources: the Hub revision (branch, tag or commit) to read."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="hf://datasets sources: Secret holding a Hub token for a private dataset (unset: the model's "
        "tokenSecretRef, if any); never copied into status or logs.",
    )
    s3: S3Storage | None = Field(None, description=S3_OVERRIDE_DESCRIPTION)
    format: Literal["jsonl", "csv", "parquet"] | None = Field(
        None,
        description="File format; inferred from the file extension when unset. Ignored for hf://datasets sources.",
    )
    train: ShortText = Field(
        "train.jsonl",
        description="Training file (or glob) relative to source; the split name for hf://datasets sources.",
    )
    validation: ShortText | None = Field(
        None,
        description="Validation file (or glob) relative to source, or split name for hf://datasets sources.",
    )
    validation_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Hold out this fraction of the training data for validation (seeded, stratified by label).",
    )
    fields: DatasetFields = Field(default_factory=DatasetFields, description="Column names.")
    max_seq_length: int = Field(
        512,
        ge=8,
        le=131072,
        description=(
            "Longer token sequences are truncated. The default 512 is lowered to what the model supports; "
            "a value above the model's positions is an error."
        ),
    )
    packing: bool = Field(
        False,
        description=(
            "causal-lm: put each batch's examples end to end in one row, without padding; position ids restart "
            "at every example, so attention never crosses from one example into another. Examples longer than "
            "maxSeqLength are truncated, as without packing."
        ),
    )
    assistant_only_loss: bool = Field(
        True,
        description=(
            "causal-lm with fields.messages: learn only the assistant turns (the prompt's tokens get label -100). "
            "Each row needs an assistant message."
        ),
    )
    max_train_samples: int | None = Field(
        None,
        ge=1,
        description="Use at most this many training examples (after shuffling).",
    )
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many validation examples.")


class LoraSpec(SpecModel):
    """LoRA adapters (peft) trained instead of the base weights."""

    r: int = Field(8, ge=1, le=1024, description="Rank of the adapter matrices.")
    alpha: int = Field(
        16,
        ge=1,
        le=4096,
        description="Scaling numerator: updates are scaled by alpha / r.",
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[Regex] | None = Field(
        None,
        max_length=64,
        description=(
            "Module names (or regexes) to adapt; unset picks the attention projections of the architecture. "
            "Required for models without them (CNNs such as ResNet or ConvNeXt: name Linear/Conv2d modules)."
        ),
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train alongside the adapters.")
    quantization: Literal["4bit"] | None = Field(
        None,
        description=(
            "QLoRA: 4bit loads the frozen base in 4-bit NF4 with double quantization (bitsandbytes) and computes "
            "in bf16; the adapters train in fp32. Needs a CUDA GPU."
        ),
    )


class GradualUnfreezing(SpecModel):
    """ULMFiT-style schedule: frozen layers thaw from the top down as epochs pass."""

    start_epoch: int = Field(
        1,
        ge=1,
        le=10000,
        description="First epoch (1-based) at which layers start to thaw.",
    )
    layers_per_epoch: int = Field(
        1,
        ge=1,
        le=1000,
        description="How many more layers thaw at the start of each epoch.",
    )


class FreezeSpec(SpecModel):
    """Which parameters train. Strategies pick a base set; module patterns then override it."""

    rules = (
        Rule(
            "layers",
            "layers is required for the bottom-layers and top-layers strategies",
            "!(self.strategy in ['bottom-layers', 'top-layers']) || has(self.layers)",
            lambda f: f.strategy not in LAYER_STRATEGIES or f.layers is not None,
        ),
        Rule(
            "layers",
            "layers is only used by the bottom-layers and top-layers strategies",
            "self.strategy in ['bottom-layers', 'top-layers'] || !has(self.layers)",
            lambda f: f.strategy in LAYER_STRATEGIES or f.layers is None,
        ),
        Rule(
            "lora",
            "lora settings are only allowed with strategy lora",
            "self.strategy == 'lora' || !has(self.lora)",
            lambda f: f.strategy == "lora" or f.lora is None,
        ),
        Rule(
            "frozenModules",
            "strategy modules needs at least one pattern in frozenModules or trainableModules",
            "self.strategy != 'modules' || size(self.frozenModules) + size(self.trainableModules) > 0",
            lambda f: f.strategy != "modules" or bool(f.frozen_modules or f.trainable_modules),
        ),
        Rule(
            "gradualUnfreezing",
            "gradualUnfreezing needs strategy head-only or bottom-layers (it thaws frozen layers)",
            "!has(self.gradualUnfreezing) || self.strategy in ['head-only', 'bottom-layers']",
            lambda f: f.gradual_unfreezing is None or f.strategy in ("head-only", "bottom-layers"),
        ),
        Rule(
            "cacheActivations",
            "cacheActivations needs strategy head-only or bottom-layers (it caches the frozen bottom's output)",
            "!self.cacheActivations || self.strategy in ['head-only', 'bottom-layers']",
            lambda f: not f.cache_activations or f.strategy in ("head-only", "bottom-layers"),
        ),
    )

    strategy: Literal["none", "head-only", "bottom-layers", "top-layers", "modules", "lora"] = Field(
        "none",
        description=(
            "none: everything trains. head-only: only the task head trains. bottom-layers: the lowest "
            "`layers` layers (and embeddings) are frozen. top-layers: only the top `layers` layers, the final "
            "norm/pooler and the head train. modules: only the patterns decide. lora: base weights are frozen "
            "and LoRA adapters train. Frozen modules run in eval mode (BatchNorm keeps its running statistics, "
            "dropout is off). A causal LM's output embeddings tied to frozen input embeddings are untied: the "
            "head trains its own copy (saved untied) and the input embeddings stay as they were."
        ),
    )
    layers: int | None = Field(
        None,
        ge=1,
        le=1000,
        description=(
            "Number of layers for bottom-layers / top-layers. A layer is one residual block, counted bottom up "
            "across the whole network: a transformer layer (BERT, GPT-2, Llama, ViT), a Swin block, a ResNet "
            "bottleneck/basic block, a ConvNeXt block. A stage's downsampling or patch merging belongs to the "
            "block next to it in that stage. A CNN's stem counts as its embeddings."
        ),
    )
    embeddings: bool = Field(
        False,
        description=(
            "Also freeze the input embeddings (a CNN's stem). Output embeddings tied to them are untied and "
            "keep training."
        ),
    )
    frozen_modules: list[Regex] = Field(
        default_factory=list,
        max_length=64,
        description="Regexes over parameter names; matches are frozen (applied after the strategy).",
    )
    trainable_modules: list[Regex] = Field(
        default_factory=list,
        max_length=64,
        description="Regexes over parameter names; matches train even if the strategy froze them (applied last).",
    )
    lora: LoraSpec | None = Field(
        None,
        description="LoRA settings; only with strategy lora (defaults apply when unset).",
    )
    gradual_unfreezing: GradualUnfreezing | None = Field(
        None,
        description="Thaw frozen layers top-down over epochs (head-only and bottom-layers only).",
    )
    cache_activations: bool = Field(
        False,
        description=(
            "Compute the frozen bottom (embeddings and frozen layers) once per example, in the first epoch, and "
            "feed its cached output to the first trainable layer afterwards (validation too): later epochs skip "
            "the frozen layers. Same results (frozen layers run in eval mode). Text tasks with head-only or "
            "bottom-layers; about tokens x hidden size x 4 bytes (reported in the freeze event), in memory when "
            "that fits half the memory to spare, otherwise memory-mapped on disk next to the checkpoints, where a "
            "restart reuses it; gradual unfreezing that thaws a cached layer drops it."
        ),
    )


class Hyperparameters(SpecModel):
    """Optimisation settings. Defaults follow common AdamW fine-tuning practice."""

    rules = (
        Rule(
            "warmupRatio",
            "set either warmupSteps or warmupRatio, not both",
            "!(has(self.warmupSteps) && has(self.warmupRatio))",
            lambda h: h.warmup_steps is None or h.warmup_ratio is None,
        ),
    )

    learning_rate: float = Field(5e-5, gt=0, le=10, description="Peak learning rate (AdamW). Must be > 0.")
    scheduler: Literal[
        "linear",
        "cosine",
        "cosine-with-restarts",
        "polynomial",
        "constant",
        "constant-with-warmup",
    ] = Field("linear", description="Learning-rate schedule after warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup over this many optimizer steps.")
    warmup_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Linear warmup over this fraction of all optimizer steps.",
    )
    layerwise_lr_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise LR decay: block i from the top gets learningRate * decay^i (1 = off).",
    )
    batch_size: int = Field(16, ge=1, le=65536, description="Per-device training batch size.")
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="Per-device evaluation batch size (default: batchSize).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=4096, description="Micro-batches accumulated per optimizer step."
    )
    epochs: float = Field(
        3.0,
        gt=0,
        le=10000,
        description="Training epochs (maxSteps, when set, takes precedence).",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many optimizer steps, overriding epochs.",
    )
    weight_decay: float = Field(
        0.01,
        ge=0,
        le=10,
        description="Decoupled L2 weight decay; not applied to biases and norms.",
    )
    l1_penalty: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Coefficient of the L1 norm of trainable weights added to the loss.",
    )
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Override the probability of every dropout module of the model.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing for the cross-entropy loss.")
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="Clip the global gradient norm to this value (unset: no clipping).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Training precision: auto is bf16 on GPUs that support it and fp32 elsewhere (fp32 matmuls use TF32 on"
            " Ampere and newer); bf16/fp16 use autocast, and LoRA's frozen base loads in that dtype."
        ),
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory by recomputing activations.")
    compile: bool = Field(
        False,
        description="Compile the model with torch.compile: faster steps on GPU after a compilation of minutes.",
    )
    seed: int = Field(
        42,
        ge=0,
        le=2**31 - 1,
        description="Seed for data order, initialisation of new heads and dropout.",
    )


class RandomResizedCrop(SpecModel):
    """Crop a random area and aspect ratio, then resize (torchvision RandomResizedCrop)."""

    rules = (
        Rule(
            "scaleMin",
            "scaleMin must not exceed scaleMax",
            "self.scaleMin <= self.scaleMax",
            lambda c: c.scale_min <= c.scale_max,
        ),
    )

    size: int = Field(224, ge=8, le=4096, description="Output side length in pixels.")
    scale_min: float = Field(0.08, gt=0, le=1, description="Smallest fraction of the image area kept.")
    scale_max: float = Field(1.0, gt=0, le=1, description="Largest fraction of the image area kept.")


class ColorJitter(SpecModel):
    """Random changes of brightness, contrast, saturation and hue (torchvision ColorJitter)."""

    brightness: float = Field(0.0, ge=0, le=10, description="Brightness factor drawn from [1-b, 1+b].")
    contrast: float = Field(0.0, ge=0, le=10, description="Contrast factor drawn from [1-c, 1+c].")
    saturation: float = Field(0.0, ge=0, le=10, description="Saturation factor drawn from [1-s, 1+s].")
    hue: float = Field(0.0, ge=0, le=0.5, description="Hue shift drawn from [-h, h].")


class Augmentation(SpecModel):
    """Training-time image augmentation (image-classification only); validation images are only resized."""

    random_resized_crop: RandomResizedCrop | None = Field(None, description="Random resized crop.")
    rotation_degrees: float | None = Field(None, gt=0, le=180, description="Rotate by a random angle in [-d, d].")
    horizontal_flip: float | None = Field(None, gt=0, le=1, description="Probability of a horizontal flip.")
    color_jitter: ColorJitter | None = Field(None, description="Colour jitter.")


class Evaluation(SpecModel):
    """When to evaluate on the validation data and what to compute."""

    rules = (
        Rule(
            "interval",
            "interval is required when strategy is steps",
            "self.strategy != 'steps' || has(self.interval)",
            lambda e: e.strategy != "steps" or e.interval is not None,
        ),
    )

    strategy: Literal["epoch", "steps", "no"] = Field(
        "epoch",
        description="Evaluate at the end of each epoch, every `interval` steps, or never.",
    )
    interval: int | None = Field(None, ge=1, description="Optimizer steps between evaluations (strategy steps).")
    metrics: list[Metric] = Field(
        default=["loss"],
        min_length=1,
        max_length=10,
        description=(
            "Metrics to compute. loss: mean token (causal-lm) or example negative log-likelihood, never "
            "label-smoothed. Classification: accuracy; f1, precision and recall on the positive class (label 1) "
            "with 2 labels, macro-averaged over classes otherwise; f1_macro; f1_weighted (by class support); "
            "auroc (2 labels only; from the positive-class probability); top5_accuracy (true class among the "
            "5 most likely). causal-lm: perplexity (exp of the loss). Computed with scikit-learn."
        ),
    )


class EarlyStopping(SpecModel):
    """Stop when the monitored evaluation metric stops improving. Absent means never stop early."""

    metric: Metric = Field(
        "loss",
        description="Evaluation metric to monitor; must be listed in evaluation.metrics.",
    )
    mode: Literal["min", "max"] | None = Field(
        None,
        description="min: lower is better; max: higher is better. Unset: min for loss and perplexity, max otherwise.",
    )
    patience: int = Field(
        3,
        ge=1,
        le=10000,
        description="Evaluations without improvement before stopping (>= 1).",
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        description="An evaluation improves only if it beats the best by more than this.",
    )
    restore_best: bool = Field(
        True,
        description="At the end, keep the weights of the best evaluation instead of the last.",
    )

    @property
    def effective_mode(self) -> Literal["min", "max"]:
        if self.mode is not None:
            return self.mode
        return "min" if self.metric in LOWER_IS_BETTER else "max"


ExportFormat = Literal["adapter", "merged"]


class Export(SpecModel):
    """Which forms of the final model are published, and in which dtype (always safetensors)."""

    formats: list[ExportFormat] | None = Field(
        None,
        min_length=1,
        max_length=2,
        description=(
            "adapter: the LoRA adapter in peft's format (adapter/; served beside a shared base, e.g. vLLM "
            "--lora-modules); merged: a plain model (model/; for LoRA the adapter merged into the base). "
            "Unset: both for the lora strategy, merged otherwise."
        ),
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weight dtype of the published model: auto is the training compute dtype (the resolved "
        "hyperparameters.precision: bf16 or fp16 when training ran in it, else fp32). A LoRA merge is computed "
        "in fp32, then cast.",
    )


class Output(SpecModel):
    """Where checkpoints and the final model go."""

    rules = (_no_credentials_in_uri("location", "location"), _s3_only_for_s3("location", "location"))

    location: Location = Field(
        pattern=OUTPUT_LOCATION_PATTERN,
        description=(
            "pvc://claim/path, s3://bucket/prefix or file:///path. Checkpoints go to checkpoints/, the final model "
            "to model/. With s3:// they are written to the pod's scratch volume first and uploaded (no shared "
            "volume needed, also for several nodes); each counts once its manifest, uploaded last, is there."
        ),
    )
    s3: S3Storage | None = Field(None, description=S3_OVERRIDE_DESCRIPTION)
    keep_checkpoints: int = Field(
        2,
        ge=1,
        le=1000,
        description="Most recent full (resumable) checkpoints kept; the best one is always kept too.",
    )
    checkpoint_interval_steps: int | None = Field(
        None,
        ge=1,
        description=(
            "Unset: every evaluation writes a full checkpoint (weights, optimizer and scheduler state: resumable). "
            "Set: full checkpoints every this many steps, at a stop and at the end; an evaluation in between "
            "writes only the weights of a new best (for restoreBest), so large models do not write optimizer "
            "state at every evaluation. A restart resumes from the newest full checkpoint."
        ),
    )
    save_final_model: bool = Field(
        True,
        description="Save the final (or best, with restoreBest) model and tokenizer to model/.",
    )
    export: Export | None = Field(
        None,
        description="What form the final model is published in (adapter, merged, dtype); unset: the defaults of "
        "each field.",
    )


class Distributed(SpecModel):
    """How the ranks of a multi-rank run share the model."""

    strategy: Literal["ddp", "fsdp", "auto"] = Field(
        "auto",
        description=(
            "ddp: every rank holds the whole model, optimizer state included. fsdp: parameters, gradients and "
            "optimizer state are sharded across the ranks (PyTorch FSDP2, one unit per transformer block; bf16 "
            "mixed precision on GPU), checkpoints are sharded and resume on the same number of ranks, the final "
            "model is consolidated. auto: ddp when the model fits one GPU, else fsdp (ddp when the GPU memory "
            "is unknown)."
        ),
    )


class SecretRef(SpecModel):
    """A whole Secret of the job's namespace (its keys become the trainer's environment)."""

    name: Name = Field(description="Name of the Secret in the FineTuneJob's namespace.")


class TrackingSpec(SpecModel):
    """Experiment tracking in MLflow: where the trainer logs the run, and the registered model it publishes to."""

    uri: Location = Field(
        pattern=r"^https?://.+",
        description="MLflow tracking server (http:// or https://); the registry is the same server.",
    )
    experiment: ShortText | None = Field(None, description="MLflow experiment; default: the job's namespace.")
    register_as: ShortText | None = Field(
        None,
        description="Registered model name: after the final model is saved, it becomes a new version of this model "
        "(once per job uid), tagged with its lineage (base model and revision, dataset, best metric).",
    )
    credentials_secret_ref: SecretRef | None = Field(
        None,
        description="Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN "
        "(only those keys are read); mounted into the trainer only, never read by the operator.",
    )


TRAINING_RULES: tuple[Rule, ...] = (
    Rule(
        "augmentation",
        "augmentation is only allowed for image-classification",
        "!has(self.augmentation) || self.model.task == 'image-classification'",
        lambda t: t.augmentation is None or t.model.task == "image-classification",
    ),
    Rule(
        "freeze.cacheActivations",
        "freeze.cacheActivations applies to text tasks (sequence-classification, causal-lm)",
        "!has(self.freeze) || !self.freeze.cacheActivations || self.model.task != 'image-classification'",
        lambda t: not t.freeze.cache_activations or t.model.task != "image-classification",
    ),
    Rule(
        "model.numLabels",
        "classification tasks need model.numLabels or model.labelNames",
        "!(self.model.task in ['sequence-classification', 'image-classification']) "
        "|| has(self.model.numLabels) || has(self.model.labelNames)",
        lambda t: t.model.task not in CLASSIFICATION_TASKS or t.model.effective_num_labels is not None,
    ),
    Rule(
        "evaluation.metrics",
        f"{', '.join(CLASSIFICATION_METRICS)} need a classification task",
        "self.model.task in ['sequence-classification', 'image-classification'] "
        f"|| !self.evaluation.metrics.exists(m, m in {list(CLASSIFICATION_METRICS)})",
        lambda t: t.model.task in CLASSIFICATION_TASKS or not set(CLASSIFICATION_METRICS) & set(t.evaluation.metrics),
    ),
    Rule(
        "evaluation.metrics",
        "auroc needs exactly 2 labels (model.numLabels or model.labelNames)",
        "!('auroc' in self.evaluation.metrics) || (has(self.model.numLabels) && self.model.numLabels == 2) "
        "|| (has(self.model.labelNames) && size(self.model.labelNames) == 2)",
        lambda t: "auroc" not in t.evaluation.metrics or t.model.effective_num_labels == 2,
    ),
    Rule(
        "evaluation.metrics",
        "perplexity needs the causal-lm task",
        "self.model.task == 'causal-lm' || !('perplexity' in self.evaluation.metrics)",
        lambda t: t.model.task == "causal-lm" or "perplexity" not in t.evaluation.metrics,
    ),
    Rule(
        "earlyStopping.metric",
        "earlyStopping.metric must be one of evaluation.metrics",
        "!has(self.earlyStopping) || self.earlyStopping.metric in self.evaluation.metrics",
        lambda t: t.early_stopping is None or t.early_stopping.metric in t.evaluation.metrics,
    ),
    Rule(
        "output.export.formats",
        "adapter export needs the lora freeze strategy",
        "!has(self.output.export) || !has(self.output.export.formats) || !('adapter' in self.output.export.formats) "
        "|| (has(self.freeze) && self.freeze.strategy == 'lora')",
        lambda t: (
            t.output.export is None or "adapter" not in (t.output.export.formats or ()) or t.freeze.strategy == "lora"
        ),
    ),
    Rule(
        "earlyStopping",
        "earlyStopping needs evaluation (evaluation.strategy must not be no)",
        "!has(self.earlyStopping) || self.evaluation.strategy != 'no'",
        lambda t: t.early_stopping is None or t.evaluation.strategy != "no",
    ),
    Rule(
        "tracking.registerAs",
        "tracking.registerAs needs output.saveFinalModel (there is no model to register otherwise)",
        "!has(self.tracking) || !has(self.tracking.registerAs) || self.output.saveFinalModel",
        lambda t: t.tracking is None or t.tracking.register_as is None or t.output.save_final_model,
    ),
    Rule(
        "distributed.strategy",
        "fsdp cannot thaw layers (freeze.gradualUnfreezing): FSDP2 fixes each block's trainable parameters when it "
        "shards them, so a layer thawed later would never be reduced across ranks; use ddp",
        "!has(self.distributed) || self.distributed.strategy != 'fsdp' || !has(self.freeze) "
        "|| !has(self.freeze.gradualUnfreezing)",
        lambda t: t.distributed.strategy != "fsdp" or t.freeze.gradual_unfreezing is None,
    ),
    Rule(
        "distributed.strategy",
        "fsdp cannot cache activations (freeze.cacheActivations): the cache replaces the frozen bottom of the "
        "model that FSDP2 shards; use ddp",
        "!has(self.distributed) || self.distributed.strategy != 'fsdp' || !has(self.freeze) "
        "|| !self.freeze.cacheActivations",
        lambda t: t.distributed.strategy != "fsdp" or not t.freeze.cache_activations,
    ),
    Rule(
        "distributed.strategy",
        "fsdp cannot shard a 4-bit base (freeze.lora.quantization): QLoRA runs with ddp",
        "!has(self.distributed) || self.distributed.strategy != 'fsdp' || !has(self.freeze) "
        "|| !has(self.freeze.lora) || !has(self.freeze.lora.quantization)",
        lambda t: t.distributed.strategy != "fsdp" or t.freeze.lora is None or t.freeze.lora.quantization is None,
    ),
)
"""Cross-field CEL rules of TrainingSpec (also applied by the subclass that extends it)."""


class TrainingSpec(SpecModel):
    """Everything a training run needs: the part of a FineTuneJob the trainer reads."""

    rules = TRAINING_RULES

    model: ModelSpec = Field(description="The pretrained model and task.")
    dataset: DatasetSpec = Field(description="Training and validation data.")
    freeze: FreezeSpec = Field(default_factory=FreezeSpec, description="Which parameters train.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Optimisation settings.")
    augmentation: Augmentation | None = Field(None, description="Image augmentation (image-classification only).")
    evaluation: Evaluation = Field(default_factory=Evaluation, description="When and what to evaluate.")
    early_stopping: EarlyStopping | None = Field(None, description="Early stopping; absent means train to the end.")
    output: Output = Field(description="Where checkpoints and the final model go.")
    tracking: TrackingSpec | None = Field(
        None, description="Log the run to MLflow (a sweep's trials become child runs) and register the final model."
    )
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="Object storage (s3://) settings and the download cache."
    )
    distributed: Distributed = Field(
        default_factory=Distributed, description="How the ranks share the model (DDP or sharded FSDP)."
    )


def export_plan(spec: TrainingSpec) -> tuple[frozenset[ExportFormat], str]:
    """The formats to publish (unset: adapter and merged for LoRA, merged otherwise) and the requested dtype."""
    export = spec.output.export or Export()
    default: tuple[ExportFormat, ...] = ("adapter", "merged") if spec.freeze.strategy == "lora" else ("merged",)
    return frozenset(export.formats or default), export.dtype
