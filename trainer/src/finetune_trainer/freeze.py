"""Freeze policies: which parameters train. Applied before the optimizer is built.

Transformer stacks are found generically: the block stack is the ModuleList of identical
modules holding the most parameters (``bert.encoder.layer``, ``transformer.h``,
``model.layers``, ``vit.encoder.layer``...). Parameters registered before the first block
are the embeddings, those after the last block but inside the base model are the "neck"
(final norm, pooler), and those outside the base model (plus the output embeddings) the head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig, TaskType, get_peft_model
from torch import nn

from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import FreezeSpec, LoraSpec, Task


@dataclass(frozen=True)
class LayerMap:
    """A model's parameter names split into embeddings, blocks (bottom first), neck and head."""

    blocks_prefix: str
    embeddings: tuple[str, ...]
    blocks: tuple[tuple[str, ...], ...]
    neck: tuple[str, ...]
    head: tuple[str, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def depth(self, name: str) -> int:
        """Blocks counted from the top: head and neck 0, top block 0, ..., embeddings ``num_blocks``."""
        for index, names in enumerate(self.blocks):
            if name in names:
                return self.num_blocks - 1 - index
        if name in self.embeddings:
            return self.num_blocks
        return 0


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of same-typed modules with the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > 0 and (best is None or size > best[0]):
                best = (size, name, module)
    if best is None:
        raise ConfigError("freeze: found no stack of transformer blocks in the model")
    return best[1], best[2]


def _base_prefix(model: nn.Module) -> str | None:
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return f"{prefix}."
    return None


def layer_map(model: nn.Module) -> LayerMap:
    """Split parameter names by position in registration order (embeddings, blocks, neck, head)."""
    stack_name, stack = find_block_stack(model)
    named = list(model.named_parameters())
    block_of = {id(p): i for i, block in enumerate(stack) for p in block.parameters()}
    blocks: list[list[str]] = [[] for _ in stack]
    positions = [i for i, (_, p) in enumerate(named) if id(p) in block_of]
    first, last = positions[0], positions[-1]
    base = _base_prefix(model)
    output = getattr(model, "get_output_embeddings", lambda: None)()
    output_ids = {id(p) for p in output.parameters()} if isinstance(output, nn.Module) else set()
    inputs = getattr(model, "get_input_embeddings", lambda: None)()
    input_ids = {id(p) for p in inputs.parameters()} if isinstance(inputs, nn.Module) else set()
    embeddings, neck, head = [], [], []
    for i, (name, param) in enumerate(named):
        if id(param) in block_of:
            blocks[block_of[id(param)]].append(name)
            continue
        if id(param) in output_ids or (base is not None and not name.startswith(base)):
            head.append(name)
            if id(param) not in input_ids:
                continue
        # Tied input/output embeddings are in both sets: the head trains them, freezing embeddings freezes them.
        if i < first or id(param) in input_ids or i <= last:
            embeddings.append(name)
        else:
            neck.append(name)
    return LayerMap(stack_name, tuple(embeddings), tuple(tuple(b) for b in blocks), tuple(neck), tuple(head))


@dataclass
class FreezePlan:
    """The outcome: counts for the report and the units gradual unfreezing thaws, top first."""

    trainable: int
    total: int
    thaw_units: list[list[str]] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each shared (tied) parameter counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _compile(patterns: list[str], where: str) -> list[re.Pattern[str]]:
    compiled = []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(f"{where}[{i}]: invalid regex '{pattern}': {exc}") from exc
    return compiled


def _apply_patterns(model: nn.Module, spec: FreezeSpec) -> set[str]:
    """frozenModules then trainableModules; each pattern must match a parameter. Returns pattern-frozen names."""
    names = [name for name, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    pattern_frozen: set[str] = set()
    for where, patterns, trainable in (
        ("freeze.frozenModules", spec.frozen_modules, False),
        ("freeze.trainableModules", spec.trainable_modules, True),
    ):
        for i, regex in enumerate(_compile(patterns, where)):
            matched = [name for name in names if regex.search(name)]
            if not matched:
                raise ConfigError(
                    f"{where}[{i}]: pattern '{regex.pattern}' matches no parameter (e.g. {', '.join(names[:3])})"
                )
            for name in matched:
                params[name].requires_grad_(trainable)
                if trainable:
                    pattern_frozen.discard(name)
                else:
                    pattern_frozen.add(name)
    return pattern_frozen


ATTENTION_PROJECTIONS = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("c_attn",),
    ("query_key_value",),
    ("qkv",),
    ("Wqkv",),
)
"""Default LoRA targets, first family found wins: the attention query/value projections (LoRA paper)."""


def default_lora_targets(model: nn.Module) -> list[str] | None:
    """Attention projections by module name, so new architectures work without peft's per-model table."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not list(module.children())}
    for family in ATTENTION_PROJECTIONS:
        if all(part in names for part in family):
            return list(family)
    return None


def _lora(model: nn.Module, task: Task, spec: LoraSpec | None, head: tuple[str, ...]) -> nn.Module:
    lora = spec or LoraSpec()
    target: str | list[str] | None = default_lora_targets(model)
    if lora.target_modules:
        _compile(lora.target_modules, "freeze.lora.targetModules")
        target = r"^(?:.*\.)?(?:" + "|".join(f"(?:{p})" for p in lora.target_modules) + r")$"
    task_type = {"sequence-classification": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM}.get(task)
    # The classification head is new: it trains in full next to the adapters.
    modules_to_save = sorted({name.rsplit(".", 1)[0] for name in head}) if task != "causal-lm" else None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        bias=lora.bias,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    try:
        wrapped: nn.Module = get_peft_model(model, config)
    except ValueError as exc:
        where = "freeze.lora.targetModules" if lora.target_modules else "freeze.lora"
        raise ConfigError(f"{where}: {str(exc).strip().splitlines()[0]}") from exc
    return wrapped


def apply_freeze(model: nn.Module, spec: FreezeSpec, task: Task) -> tuple[nn.Module, FreezePlan]:
    """Set ``requires_grad`` per the policy (wrapping the model for LoRA) and describe the result."""
    layers = layer_map(model)
    params: dict[str, Any] = dict(model.named_parameters())
    if spec.layers is not None and spec.layers > layers.num_blocks:
        raise ConfigError(f"freeze.layers: {spec.layers} exceeds the {layers.num_blocks} blocks of the model")
    n = spec.layers or 0
    frozen: set[str] = set()
    thaw_order: list[tuple[str, ...]] = []
    match spec.strategy:
        case "head-only":
            frozen = set(params) - set(layers.head)
            thaw_order = [layers.neck, *reversed(layers.blocks), layers.embeddings]
        case "bottom-layers":
            frozen = set(layers.embeddings).union(*layers.blocks[:n])
            thaw_order = [*reversed(layers.blocks[:n]), layers.embeddings]
        case "top-layers":
            trainable = set(layers.neck) | set(layers.head)
            trainable = trainable.union(*layers.blocks[layers.num_blocks - n :])
            frozen = set(params) - trainable
        case _:
            frozen = set()
    if spec.embeddings:
        frozen |= set(layers.embeddings)
        thaw_order = [unit for unit in thaw_order if unit is not layers.embeddings]  # asked to stay frozen
    for name, param in params.items():
        param.requires_grad_(name not in frozen)
    if spec.strategy == "lora":
        model = _lora(model, task, spec.lora, layers.head)
    pattern_frozen = _apply_patterns(model, spec)
    units = [[n for n in unit if n in frozen and n not in pattern_frozen] for unit in thaw_order]
    trainable_count, total = count_parameters(model)
    return model, FreezePlan(trainable_count, total, [u for u in units if u] if spec.gradual_unfreezing else [])


def thawed_units(epoch: int, start_epoch: int, per_epoch: int, available: int) -> int:
    """How many thaw units are unfrozen during 1-based ``epoch`` (a pure function of the epoch: resume-safe)."""
    if epoch < start_epoch:
        return 0
    return min(available, (epoch - start_epoch + 1) * per_epoch)
