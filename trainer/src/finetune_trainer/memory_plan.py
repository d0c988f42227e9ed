"""The memory plan: per-GPU memory of a job, from the model's ``config.json`` alone, for DDP and FSDP.

Torch-free on purpose: ``kubectl finetune advise`` runs it on a laptop without the training stack and without
the weights (an 8B model's config is 1 KB, its weights 16 GB), and the trainer runs it before the weights load.
So the parameter count is a formula per architecture family from the config's dimensions (Llama-style gated
MLPs, GPT-2, BERT), checked against the real models in the tests; a family it does not know gets no estimate,
and then ``auto`` means DDP, as it does when the GPU memory is unknown. The freeze policy is mirrored the same
way (``freeze.apply_freeze`` decides on a real model; this counts what it would train).

What it counts per GPU (GiB = 2**30 bytes), as the trainer trains:
- parameters: trainable ones in fp32; LoRA's frozen base in the compute dtype (bf16 on a GPU), 4-bit QLoRA
  blocks at ~0.52 bytes a parameter (nf4 + double-quantized constants); other frozen ones in fp32;
- gradients (fp32) and AdamW's two fp32 moments for the trainable parameters;
- under autocast, the half-precision copies of fp32 weights it keeps for the step;
- activations at ``batchSize`` x ``maxSeqLength`` (a standard per-layer count, SDPA attention: no
  sequence-squared term), all layers' or, with gradient checkpointing, each layer's input plus one layer's;
  a causal LM's logits (compute dtype, their fp32 upcast, the saved log-softmax and a gradient);
- ddp: all of it on every GPU, plus DDP's gradient buckets (a second copy of the gradients) over 1 rank;
- fsdp: parameters, gradients and optimizer state divided by the world size, plus the gathered half-precision
  blocks in flight (two blocks) and the unsharded root (embeddings, head).
A job fits when the total is at most ``USABLE_FRACTION`` of the GPU's memory: the CUDA context, the allocator's
fragmentation and temporary buffers are not counted. How close the estimate is: ``benchmarks/memory_plan.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from finetune_trainer.config import RuntimeEnv, local_path
from finetune_trainer.contract import GPU_MEMORY_ENV
from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import TRAINING_RULES, TrainingSpec, quantity_value

GIB = 1024**3
USABLE_FRACTION = 0.9
"""Share of a GPU's memory the estimate may fill: the rest is the CUDA context and the allocator's slack."""
PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCTS: dict[str, int] = {
    "NVIDIA-A100-SXM4-80GB": 80,
    "NVIDIA-A100-80GB-PCIe": 80,
    "NVIDIA-A100-SXM4-40GB": 40,
    "NVIDIA-A100-PCIE-40GB": 40,
    "NVIDIA-H100-80GB-HBM3": 80,
    "NVIDIA-H100-PCIe": 80,
    "NVIDIA-H100-NVL": 94,
    "NVIDIA-H200": 141,
    "NVIDIA-H200-NVL": 141,
    "NVIDIA-L40S": 48,
    "NVIDIA-L4": 24,
    "NVIDIA-A10G": 24,
    "NVIDIA-A10": 24,
    "Tesla-T4": 16,
    "Tesla-V100-SXM2-16GB": 16,
    "Tesla-V100-SXM2-32GB": 32,
    "NVIDIA-GeForce-RTX-4090": 24,
    "NVIDIA-GeForce-RTX-3090": 24,
}
"""GPU memory in GB (as sold: 10**9 bytes... rounded by the vendor; taken as GiB, the smaller reading) by the
``nvidia.com/gpu.product`` label GPU Feature Discovery puts on a node. Other labels that name ``<N>GB`` are read
too."""
_GB_IN_LABEL = re.compile(r"(?:^|-)(\d{1,4})GB(?:-|$)")

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp")
GATED = frozenset({"llama", "mistral", "qwen2"})
"""Llama-style families: q/k/v/o projections (grouped-query attention), a gated MLP, RMSNorm, no biases
(qwen2: biases on q/k/v)."""
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""4-bit nf4 per parameter with double quantization: blocks of 64 share an 8-bit scale, 256 scales an fp32."""


@dataclass(frozen=True)
class Shape:
    """What the count needs from ``config.json``: the family, its dimensions, and the leaf modules LoRA may adapt
    (name -> (in features, out features), per block)."""

    family: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    embeddings: int
    """Input embeddings (with position and token-type embeddings and their norm)."""
    block: int
    """Parameters of one block."""
    neck: int
    """Final norm (and BERT's pooler)."""
    tied: bool
    """Causal LM head shares the input embedding matrix."""
    linears: dict[str, tuple[int, int]]
    gated: bool


def _get(config: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise KeyError(keys[0])


def shape_of(config: Mapping[str, Any]) -> Shape | None:
    """The family's dimensions from a ``config.json`` mapping; None for a family the formula does not know."""
    family = str(config.get("model_type", ""))
    try:
        if family in GATED:
            return _gated_shape(config, family)
        if family == "gpt2":
            return _gpt2_shape(config)
        if family in ("bert", "roberta", "xlm-roberta"):
            return _bert_shape(config, family)
    except KeyError:
        return None
    return None


def _gated_shape(config: Mapping[str, Any], family: str) -> Shape:
    h, layers, vocab = _get(config, "hidden_size"), _get(config, "num_hidden_layers"), _get(config, "vocab_size")
    heads = _get(config, "num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    inter = _get(config, "intermediate_size")
    q, k = heads * head_dim, kv * head_dim
    linears = {
        "q_proj": (h, q),
        "k_proj": (h, k),
        "v_proj": (h, k),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    bias = q + 2 * k if family == "qwen2" else 0
    block = sum(i * o for i, o in linears.values()) + bias + 2 * h
    tied = bool(config.get("tie_word_embeddings", False))
    return Shape(family, h, layers, vocab, inter, vocab * h, block, h, tied, linears, gated=True)


def _gpt2_shape(config: Mapping[str, Any]) -> Shape:
    h, layers, vocab = _get(config, "n_embd"), _get(config, "n_layer"), _get(config, "vocab_size")
    inter = config.get("n_inner") or 4 * h
    positions = _get(config, "n_positions")
    linears = {"c_attn": (h, 3 * h), "c_proj": (h, h), "c_fc": (h, inter)}
    block = 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * inter + inter) + (inter * h + h)
    tied = bool(config.get("tie_word_embeddings", True))
    return Shape("gpt2", h, layers, vocab, inter, (vocab + positions) * h, block, 2 * h, tied, linears, gated=False)


def _bert_shape(config: Mapping[str, Any], family: str) -> Shape:
    h, layers, vocab = _get(config, "hidden_size"), _get(config, "num_hidden_layers"), _get(config, "vocab_size")
    inter = _get(config, "intermediate_size")
    positions = _get(config, "max_position_embeddings")
    types = config.get("type_vocab_size", 2)
    linears = {"query": (h, h), "key": (h, h), "value": (h, h), "dense": (h, h)}
    block = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 4 * h
    embeddings = (vocab + positions + types) * h + 2 * h
    return Shape(family, h, layers, vocab, inter, embeddings, block, h * h + h, False, linears, gated=False)


@dataclass(frozen=True)
class Counts:
    """Parameters: all of them (LoRA adapters and untied copies included), trainable, and QLoRA-quantized."""

    total: int
    trainable: int
    quantized: int
    block: int
    root: int
    """Parameters outside the blocks (embeddings, neck, head): FSDP's root unit, gathered for the whole step."""


def _head(shape: Shape, spec: TrainingSpec) -> int:
    """The task head's own parameters (a tied causal LM head has none of its own)."""
    task = spec.model.task
    if task == "causal-lm":
        return 0 if shape.tied else shape.vocab * shape.hidden
    labels = spec.model.effective_num_labels or 2
    bias = labels if shape.family in ("bert", "roberta", "xlm-roberta") else 0
    if shape.family in ("roberta", "xlm-roberta"):  # dense + out_proj
        return shape.hidden * shape.hidden + shape.hidden + shape.hidden * labels + labels
    return shape.hidden * labels + bias


def _lora_targets(shape: Shape, spec: TrainingSpec) -> list[str]:
    lora = spec.freeze.lora
    if lora is None or not lora.target_modules:
        defaults = {"gpt2": ["c_attn"]}.get(shape.family, ["q_proj", "v_proj"] if shape.gated else ["query", "value"])
        return defaults
    return [name for name in shape.linears if any(re.fullmatch(p, name) for p in lora.target_modules)]


def count(shape: Shape, spec: TrainingSpec) -> Counts:
    """What ``freeze.apply_freeze`` would leave trainable (``modules``: every parameter, an upper bound)."""
    freeze = spec.freeze
    head = _head(shape, spec)
    blocks = shape.layers * shape.block
    base = shape.embeddings + blocks + shape.neck + head
    linear = shape.layers * sum(i * o for i, o in shape.linears.values())
    tied_copy = shape.vocab * shape.hidden if spec.model.task == "causal-lm" and shape.tied else 0
    quantized = linear if freeze.lora is not None and freeze.lora.quantization else 0
    n = freeze.layers or 0
    if freeze.strategy == "lora":
        r = freeze.lora.r if freeze.lora else 8
        adapters = shape.layers * sum(r * sum(shape.linears[t]) for t in _lora_targets(shape, spec))
        saved = head if spec.model.task != "causal-lm" else 0  # the new classification head trains in full
        root = shape.embeddings + shape.neck + head + saved
        return Counts(base + adapters + saved, adapters + saved, quantized, shape.block, root)
    frozen_embeddings = freeze.embeddings or freeze.strategy in ("head-only", "bottom-layers", "top-layers")
    untied = tied_copy if frozen_embeddings else 0  # the head gets its own copy of the frozen matrix
    total = base + untied
    match freeze.strategy:
        case "head-only":
            trainable = head + untied
        case "bottom-layers":
            trainable = total - shape.embeddings - n * shape.block
        case "top-layers":
            trainable = n * shape.block + shape.neck + head + untied
        case _:  # none, modules
            trainable = total - (shape.embeddings if freeze.embeddings else 0)
    return Counts(total, trainable, 0, shape.block, total - blocks)


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU for one strategy."""

    strategy: Strategy
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    checkpointed_activations: float
    """Activations with gradient checkpointing (``activations`` is without)."""
    overhead: float
    """Autocast weight copies, DDP's gradient buckets, FSDP's gathered blocks."""

    def total(self, checkpointing: bool) -> float:
        acts = self.checkpointed_activations if checkpointing else self.activations
        return self.parameters + self.gradients + self.optimizer + acts + self.overhead


def compute_bytes(precision: str) -> int:
    """Bytes of the dtype the GPU computes in: auto is bf16 on a GPU (``speed.resolve_precision``)."""
    return 4 if precision == "fp32" else 2


def activation_bytes(shape: Shape, spec: TrainingSpec, checkpointing: bool, precision: str) -> float:
    """Activations kept for the backward pass of one micro-batch on one GPU."""
    tokens = spec.hyperparameters.batch_size * spec.dataset.max_seq_length
    c = compute_bytes(precision)
    # gated: gate, up, activation, product; GPT-2's gelu_new is tanh-GELU in pointwise ops, each saving its input
    mlp = (4 if shape.gated else 6 if shape.family == "gpt2" else 2) * shape.intermediate
    per_layer = tokens * (10 * shape.hidden + mlp) * c  # norms, q/k/v, attention output, projections, residuals
    layers = tokens * shape.hidden * c * shape.layers + per_layer if checkpointing else per_layer * shape.layers
    # logits, their fp32 upcast, cross-entropy's saved log-softmax, and a gradient
    logits = tokens * shape.vocab * (c + 4 + 4 + 4) if spec.model.task == "causal-lm" else 0
    return float(layers + logits)


def estimate(
    shape: Shape, counts: Counts, spec: TrainingSpec, world: int, precision: str | None = None
) -> dict[Strategy, Estimate]:
    """Per-GPU bytes for each strategy with ``world`` GPUs in all, in ``precision`` (default: the spec's, auto
    meaning bf16 as on a GPU; the trainer passes the precision it resolved)."""
    precision = precision or spec.hyperparameters.precision
    c = compute_bytes(precision)
    half = c == 2
    lora_half = spec.freeze.strategy == "lora" and half
    frozen = counts.total - counts.trainable
    frozen_bytes = (frozen - counts.quantized) * (c if lora_half or counts.quantized else 4)
    parameters = counts.trainable * 4 + frozen_bytes + counts.quantized * NF4_BYTES
    gradients = counts.trainable * 4.0
    optimizer = counts.trainable * 8.0
    fp32_params = counts.trainable + (0 if lora_half or counts.quantized else frozen)
    acts = activation_bytes(shape, spec, False, precision)
    ckpt = activation_bytes(shape, spec, True, precision)
    casts = fp32_params * c if half else 0  # autocast's half copies of fp32 weights, kept for the step
    buckets = gradients if world > 1 else 0
    ddp = Estimate("ddp", parameters, gradients, optimizer, acts, ckpt, casts + buckets)
    gathered = (counts.root + 2 * counts.block) * c
    fsdp = Estimate("fsdp", parameters / world, gradients / world, optimizer / world, acts, ckpt, float(gathered))
    return {"ddp": ddp, "fsdp": fsdp}


@dataclass(frozen=True)
class Gpus:
    """The GPUs a job asks for: how many in all, each one's memory in bytes (None: unknown) and where that
    figure came from."""

    world: int
    memory: int | None
    source: str


def product_memory(product: str) -> int | None:
    """A GPU product label's memory in bytes: the table, else a ``<N>GB`` in the label; None when unknown."""
    gb = GPU_PRODUCTS.get(product)
    if gb is None:
        found = _GB_IN_LABEL.search(product)
        gb = int(found.group(1)) if found else None
    return gb * GIB if gb else None


def job_gpus(resources: Mapping[str, Any]) -> Gpus:
    """From a FineTuneJob's ``spec.resources`` (wire form): world size and per-GPU memory.

    ``gpuMemory`` wins over the product label; a CPU job (``gpusPerNode: 0``) has no GPU memory."""
    per_node = int(resources.get("gpusPerNode", 1))
    world = int(resources.get("nodes", 1)) * max(per_node, 1)
    if per_node == 0:
        return Gpus(world, None, "CPU")
    hint = resources.get("gpuMemory")
    if hint is not None:
        try:
            hinted = int(quantity_value(hint))
        except ValueError as exc:
            raise ConfigError(f"resources.gpuMemory: {exc}") from exc
        return Gpus(world, hinted, f"resources.gpuMemory {hint}")
    product = (resources.get("nodeSelector") or {}).get(PRODUCT_LABEL)
    labelled = product_memory(product) if product else None
    if labelled is not None:
        return Gpus(world, labelled, f"{PRODUCT_LABEL} {product}")
    return Gpus(world, None, "unknown GPU memory")


def gpus_for(resources: Mapping[str, Any], hint: int | None) -> Gpus:
    """``job_gpus``, falling back to ``hint`` (bytes, the operator's ``FINETUNE_GPU_MEMORY``) for a GPU job
    whose resources do not say."""
    gpus = job_gpus(resources)
    if gpus.memory is None and hint and gpus.source != "CPU":
        return Gpus(gpus.world, hint, GPU_MEMORY_ENV)
    return gpus


def read_config(directory: Path) -> dict[str, Any] | None:
    """A model directory's ``config.json`` (None when it has none or it is not a JSON object)."""
    try:
        found = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


@dataclass(frozen=True)
class Plan:
    """The estimate for each strategy and the strategy the job runs with."""

    requested: str
    strategy: Strategy
    gpus: Gpus
    counts: Counts | None
    estimates: dict[Strategy, Estimate]
    checkpointing: bool
    fsdp_refused: str | None = None
    """Why this spec cannot run with fsdp (``fsdp_refusal``); None when it can."""

    def per_gpu_gib(self, strategy: Strategy) -> float | None:
        found = self.estimates.get(strategy)
        return round(found.total(self.checkpointing) / GIB, 2) if found is not None else None

    def fits(self, strategy: Strategy, checkpointing: bool | None = None) -> bool | None:
        """None when the GPU memory or the estimate is unknown."""
        found = self.estimates.get(strategy)
        if found is None or self.gpus.memory is None:
            return None
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        return found.total(ckpt) <= USABLE_FRACTION * self.gpus.memory

    def summary(self) -> dict[str, Any]:
        """For the freeze event and ``status.memoryPlan`` (camelCase, small)."""
        return {
            "strategy": self.strategy,
            "requested": self.requested,
            "worldSize": self.gpus.world,
            "gpuMemoryGiB": round(self.gpus.memory / GIB, 2) if self.gpus.memory is not None else None,
            "perGpuGiB": self.per_gpu_gib(self.strategy),
            "perGpuGiBByStrategy": {s: self.per_gpu_gib(s) for s in self.estimates},
        }


def fsdp_refusal(spec: TrainingSpec) -> str | None:
    """Why the spec cannot run with fsdp (the spec's own ``distributed.strategy`` rules, e.g. with gradual
    unfreezing), so auto never picks a strategy the run would refuse; None when it can."""
    as_fsdp = spec.model_copy(update={"distributed": spec.distributed.model_copy(update={"strategy": "fsdp"})})
    for rule in TRAINING_RULES:
        if rule.field == "distributed.strategy" and rule.holds is not None and not rule.holds(as_fsdp):
            return rule.message
    return None


def plan(spec: TrainingSpec, config: Mapping[str, Any], gpus: Gpus, precision: str | None = None) -> Plan:
    """Estimate each strategy and pick one: the spec's, or for ``auto`` ddp when it fits (or the memory or the
    model's family is unknown), else fsdp. ``precision``: what the run resolved ``auto`` to (unset: bf16)."""
    checkpointing = spec.hyperparameters.gradient_checkpointing
    requested = spec.distributed.strategy
    shape = shape_of(config)
    counts = count(shape, spec) if shape is not None else None
    estimates = estimate(shape, counts, spec, gpus.world, precision) if shape is not None and counts else {}
    refused = fsdp_refusal(spec)
    draft = Plan(requested, "ddp", gpus, counts, estimates, checkpointing, refused)
    if requested != "auto":
        return Plan(requested, requested, gpus, counts, estimates, checkpointing, refused)
    if draft.fits("ddp") is False and draft.fits("fsdp") and refused is None and gpus.world > 1:  # 1: no shards
        return Plan(requested, "fsdp", gpus, counts, estimates, checkpointing, refused)
    return draft


def check_fits(found: Plan) -> None:
    """InvalidConfig with the numbers when the GPU memory is known and no strategy fits."""
    allowed = [s for s in STRATEGIES if s == "ddp" or found.fsdp_refused is None]
    if found.gpus.memory is None or not found.estimates or any(found.fits(s) for s in allowed):
        return
    gib = found.gpus.memory / GIB
    need = ", ".join(f"{s} {found.per_gpu_gib(s):.1f} GiB" for s in STRATEGIES)
    hint = "; gradientCheckpointing: true would fit" if any(found.fits(s, True) for s in STRATEGIES) else ""
    raise ConfigError(
        f"distributed.strategy: the job fits no strategy on {found.gpus.world} GPU(s) of {gib:.1f} GiB "
        f"({found.gpus.source}, {USABLE_FRACTION:.0%} usable): per GPU it needs {need}{hint}; use more GPUs, "
        "LoRA, freeze.lora.quantization 4bit, a smaller batchSize or maxSeqLength"
    )


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def format_plan(found: Plan) -> list[str]:
    """The table ``--plan`` and ``advise`` print: one row per strategy, GiB per GPU."""
    gpus = found.gpus
    memory = f"{gpus.memory / GIB:.1f} GiB each" if gpus.memory is not None else "memory unknown"
    head = f"memory plan: {gpus.world} GPU(s), {memory} ({gpus.source})"
    if found.counts is None:
        return [
            head,
            "no estimate: the model's family is not one the plan knows (llama, mistral, qwen2, gpt2, "
            "bert, roberta); distributed.strategy auto means ddp",
        ]
    counts = found.counts
    share = 100.0 * counts.trainable / max(counts.total, 1)
    lines = [f"{head}; {counts.total:,} parameters, {counts.trainable:,} trainable ({share:.2f}%)"]
    gc = "on" if found.checkpointing else "off"
    lines.append(
        f"{'STRATEGY':<8}  {'PARAMS':>7}  {'GRADS':>7}  {'OPTIM':>7}  {'ACTIV':>7}  {'ACTIV-GC':>8}  "
        f"{'OTHER':>7}  {'TOTAL':>7}  FITS"
    )
    for strategy, e in found.estimates.items():
        fits = {True: "yes", False: "no", None: "?"}[found.fits(strategy)]
        fits = "refused" if strategy == "fsdp" and found.fsdp_refused else fits
        lines.append(
            f"{strategy:<8}  {_gib(e.parameters):>7}  {_gib(e.gradients):>7}  {_gib(e.optimizer):>7}  "
            f"{_gib(e.activations):>7}  {_gib(e.checkpointed_activations):>8}  {_gib(e.overhead):>7}  "
            f"{_gib(e.total(found.checkpointing)):>7}  {fits}"
        )
    if found.fsdp_refused:
        lines.append(f"fsdp refused: {found.fsdp_refused}")
    why = "auto: " if found.requested == "auto" else ""
    lines.append(f"strategy: {why}{found.strategy} (GiB per GPU; TOTAL with gradientCheckpointing {gc})")
    return lines


def print_memory_plan(spec: TrainingSpec, env: RuntimeEnv, resources: dict[str, Any], out: TextIO) -> None:
    """The memory plan's table for the GPUs ``resources`` asks for, from the model's config.json alone."""
    source = spec.model.source
    config = None if source.startswith("hf://") else read_config(local_path(source, env.pvc_root))
    if config is None:
        where = "the Hub (offline here)" if source.startswith("hf://") else "this machine"
        print(f"memory plan: not shown: no config.json of model.source {source} on {where}", file=out)
        return
    for line in format_plan(plan(spec, config, gpus_for(resources, env.gpu_memory))):
        print(line, file=out)
