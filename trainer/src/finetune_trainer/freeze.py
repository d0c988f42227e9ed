"""Freeze policies: which parameters train. Applied before the optimizer is built.

What a "layer" is, for every family: one residual block — a transformer layer (BERT, GPT-2,
Llama, ViT), a Swin block, a ResNet bottleneck/basic block, a ConvNeXt block. The block stack is
found generically: the largest ModuleList/Sequential of composite modules (their types may differ:
hybrid stacks mix attention and recurrent blocks). When its members are stages (a direct child
list of composite blocks holds most of a stage's weights: ResNet, ConvNeXt, Swin), the stages'
blocks are laid end to end, and a stage's own downsampling/patch-merging weights belong to the
adjacent block of that stage. Parameters registered before the first block are the embeddings
(a CNN's stem), those after the last block but inside the base model are the "neck" (final norm,
pooler), and those outside the base model (plus the output embeddings) the head.

Frozen modules run in eval mode, also after the Trainer's ``model.train()``: frozen BatchNorm keeps
its running statistics and frozen dropout is off, so a frozen part computes a fixed function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, TypeGuard

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


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _block_container(module: nn.Module) -> TypeGuard[nn.ModuleList | nn.Sequential]:
    """A ModuleList/Sequential of composite modules with weights (blocks, not single ops like an MLP's Linear)."""
    return (
        isinstance(module, nn.ModuleList | nn.Sequential)
        and len(module) > 0
        and all(any(True for _ in m.children()) for m in module)
        and _size(module) > 0
    )


def _stage_blocks(stage: nn.Module) -> list[nn.Module] | None:
    """The direct child list of blocks that holds most of a stage's weights; None for a plain block."""
    lists = [list(child) for child in stage.children() if _block_container(child)]
    best = max(lists, key=lambda blocks: sum(map(_size, blocks)), default=None)
    return best if best is not None and 2 * sum(map(_size, best)) >= _size(stage) else None


def find_block_stack(model: nn.Module) -> tuple[str, list[list[nn.Parameter]]]:
    """The stack's name and its blocks' parameters, bottom first (stages expanded into their blocks)."""
    candidates = [(name, module) for name, module in model.named_modules() if _block_container(module)]
    if not candidates:
        raise ConfigError("freeze: found no stack of layers (transformer or residual blocks) in the model")
    stack_name, stack = max(candidates, key=lambda item: _size(item[1]))  # max keeps the first of equals
    blocks: list[list[nn.Parameter]] = []
    for member in stack:
        inner = _stage_blocks(member)
        if inner is None:
            blocks.append(list(member.parameters()))
            continue
        first = len(blocks)
        owner = {id(p): first + i for i, block in enumerate(inner) for p in block.parameters()}
        blocks.extend([] for _ in inner)
        current: int | None = None
        pending: list[nn.Parameter] = []  # stage weights before its first block (e.g. ConvNeXt downsampling)
        for param in member.parameters():
            if id(param) in owner:
                current = owner[id(param)]
                blocks[current].extend(pending)
                pending = []
                blocks[current].append(param)
            elif current is None:
                pending.append(param)
            else:  # after a block (e.g. Swin patch merging): joins the block before it
                blocks[current].append(param)
    return stack_name, [block for block in blocks if block]


def _base_prefix(model: nn.Module) -> str | None:
    """Where the base model sits: ``bert.``, or ``base_model.model.bert.`` inside a LoRA wrapper."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module):
        return None
    return next((f"{name}." for name, module in model.named_modules() if module is base), None)


def _embedding_ids(model: nn.Module, getter: str) -> set[int]:
    """Parameter ids of the input or output embeddings; none for models without them (CNNs raise)."""
    try:
        module = getattr(model, getter, lambda: None)()
    except (NotImplementedError, AttributeError):
        return set()
    return {id(p) for p in module.parameters()} if isinstance(module, nn.Module) else set()


def head_names(model: nn.Module) -> list[str]:
    """Parameters outside the base model, plus the output embeddings: the task head."""
    base = _base_prefix(model)
    output_ids = _embedding_ids(model, "get_output_embeddings")
    return [
        name
        for name, param in model.named_parameters()
        if id(param) in output_ids or (base is not None and not name.startswith(base))
    ]


def layer_map(model: nn.Module) -> LayerMap:
    """Split parameter names by position in registration order (embeddings, blocks, neck, head)."""
    stack_name, stack = find_block_stack(model)
    named = list(model.named_parameters())
    block_of = {id(p): i for i, block in enumerate(stack) for p in block}
    blocks: list[list[str]] = [[] for _ in stack]
    positions = [i for i, (_, p) in enumerate(named) if id(p) in block_of]
    first, last = positions[0], positions[-1]
    head_set = set(head_names(model))
    input_ids = _embedding_ids(model, "get_input_embeddings")
    embeddings, neck, head = [], [], []
    for i, (name, param) in enumerate(named):
        if id(param) in block_of:
            blocks[block_of[id(param)]].append(name)
            continue
        if name in head_set:
            head.append(name)
            if id(param) not in input_ids:
                continue
        # Tied input/output embeddings are in both sets (apply_freeze unties them when the two disagree).
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
    untied: str | None = None
    """The output embedding's parameter name when it was untied from the frozen input embeddings."""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each shared (tied) parameter counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _apply_patterns(model: nn.Module, spec: FreezeSpec) -> set[str]:
    """frozenModules then trainableModules; each pattern must match a parameter. Returns pattern-frozen names."""
    names = [name for name, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    pattern_frozen: set[str] = set()
    for where, patterns, trainable in (
        ("freeze.frozenModules", spec.frozen_modules, False),
        ("freeze.trainableModules", spec.trainable_modules, True),
    ):
        # the spec's Regex type has already checked that each pattern compiles
        for i, regex in enumerate(map(re.compile, patterns)):
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


def _lora_target_hint(model: nn.Module, head: list[str]) -> str:
    """A few leaf Linear/Conv module names to suggest when no default LoRA target exists."""
    head_modules = {name.rsplit(".", 1)[0] for name in head}
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d) and name not in head_modules
        }
    )
    return ", ".join(names[:6]) or "none found"


def _lora(model: nn.Module, task: Task, spec: LoraSpec | None, head: list[str]) -> nn.Module:
    lora = spec or LoraSpec()
    target: str | list[str] | None = default_lora_targets(model)
    if lora.target_modules:
        target = r"^(?:.*\.)?(?:" + "|".join(f"(?:{p})" for p in lora.target_modules) + r")$"
    elif target is None:
        families = ", ".join("/".join(family) for family in ATTENTION_PROJECTIONS)
        raise ConfigError(
            "freeze.lora.targetModules: the model has none of the attention projections LoRA adapts by default "
            f"({families}); name the modules to adapt (Linear or Conv2d names, e.g. "
            f"{_lora_target_hint(model, head)})"
        )
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


def untie_output_embeddings(model: nn.Module) -> str:
    """Give the output embeddings their own copy of the tied matrix; the saved config says they are untied."""
    output: Any = model.get_output_embeddings()  # type: ignore[operator]
    inputs: Any = model.get_input_embeddings()  # type: ignore[operator]
    output.weight = nn.Parameter(inputs.weight.detach().clone())
    config: Any = getattr(model, "config", None)
    if config is not None:
        for cfg in (config, config.get_text_config()):
            cfg.tie_word_embeddings = False
    return next(name for name, param in model.named_parameters() if param is output.weight)


def prefix_blocks(model: nn.Module, block_params: list[list[nn.Parameter]]) -> list[nn.Module]:
    """The block modules whose parameters are exactly each of ``block_params`` (bottom first)."""
    owners: list[nn.Module] = []
    for params in block_params:
        wanted = {id(p) for p in params}
        owner = next(
            (m for m in model.modules() if {id(p) for p in m.parameters()} == wanted and list(m.children())), None
        )
        if owner is None:
            raise ValueError("a frozen block is not a single module")
        owners.append(owner)
    return owners


def frozen_prefix(model: nn.Module, block_params: list[list[nn.Parameter]]) -> int:
    """How many blocks from the bottom are frozen whole (0: nothing to cache)."""
    count = 0
    for params in block_params:
        if any(p.requires_grad for p in params):
            break
        count += 1
    return count


def cached_prefix(
    model: nn.Module, embeddings: tuple[str, ...], blocks: tuple[tuple[str, ...], ...]
) -> tuple[list[nn.Module], list[nn.Parameter]] | None:
    """The frozen embeddings' and whole frozen blocks' (modules, parameters); None when nothing is frozen so."""
    named = dict(model.named_parameters())
    if not embeddings or any(named[name].requires_grad for name in embeddings):
        return None  # trainable embeddings change the prefix's output every step
    block_params = [[named[name] for name in block] for block in blocks]
    count = frozen_prefix(model, block_params)
    if count == 0:
        return None
    params = [named[name] for name in embeddings] + [p for block in block_params[:count] for p in block]
    return prefix_blocks(model, block_params[:count]), params


class PrefixEvalMode:
    """Runs the frozen prefix's parameter-free modules in eval mode, as ``eval_frozen`` does for those that own
    parameters: GPT-2's ``transformer.drop`` between the embeddings and the first block (GPT-Neo's, Phi's
    ``embed_dropout``) would otherwise add fresh noise to frozen activations every step, and the activation
    cache would replay its first epoch's mask for ever (and train different weights than a run without it).

    Which parameter-free modules feed the prefix shows only in the order they run (Phi registers its dropout
    after its layers), so forward hooks decide on each call: a module outside the blocks that runs after the
    model's forward began and before the last fully frozen block (bottom up, under frozen embeddings) returned
    is in the prefix. That block is found again on every forward: gradual unfreezing moves it down.
    """

    def __init__(self, model: nn.Module, embeddings: list[nn.Parameter], blocks: list[nn.Module]) -> None:
        self.embeddings = embeddings
        self.blocks = blocks
        self.end: nn.Module | None = None
        """The block whose return closes the prefix in the forward under way (None: not inside the prefix)."""
        inside = {id(m) for block in blocks for m in block.modules()}
        model.register_forward_pre_hook(self._begin)
        for block in blocks:
            block.register_forward_hook(self._finish)
        for module in model.modules():
            if id(module) not in inside and next(module.parameters(), None) is None:
                module.register_forward_pre_hook(self._enter)

    def last_frozen(self) -> nn.Module | None:
        if any(p.requires_grad for p in self.embeddings):
            return None
        last = None
        for block in self.blocks:
            if any(p.requires_grad for p in block.parameters()):
                break
            last = block
        return last

    def _begin(self, module: nn.Module, args: Any) -> None:
        self.end = self.last_frozen() if module.training else None

    def _finish(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is self.end:
            self.end = None

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self.end is not None and module.training:
            module.eval()  # before its forward: this call already runs in eval mode


def eval_frozen_prefix(model: nn.Module, layers: LayerMap) -> PrefixEvalMode | None:
    """Install ``PrefixEvalMode`` when ``model`` has a frozen prefix (frozen embeddings and bottom block)."""
    named = dict(model.named_parameters())
    try:
        if cached_prefix(model, layers.embeddings, layers.blocks) is None:
            return None
        blocks = prefix_blocks(model, [[named[name] for name in block] for block in layers.blocks])
    except ValueError:  # blocks that are not single modules (stages of a CNN): only eval_frozen applies
        return None
    return PrefixEvalMode(model, [named[name] for name in layers.embeddings], blocks)


def eval_frozen(module: nn.Module) -> None:
    """Put every fully frozen submodule in eval mode: BatchNorm keeps its running statistics, dropout is off."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            eval_frozen(child)


def _train_keeping_frozen_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    type(self).train(self, mode)
    if mode:
        eval_frozen(self)
    return self


def keep_frozen_in_eval(model: nn.Module) -> None:
    """Make ``model.train()`` leave frozen modules in eval mode.

    The Trainer calls ``model.train()`` every step, which would undo a one-off ``eval()``; the check runs on
    each call, so modules thawed by gradual unfreezing train again. A bound method: ``deepcopy`` rebinds it.
    """
    model.__dict__["train"] = MethodType(_train_keeping_frozen_in_eval, model)
    if model.training:
        model.train()


MAPPED_STRATEGIES = ("head-only", "bottom-layers", "top-layers")
"""Strategies that need the layer map; the others (and CNNs under them) never look for a block stack."""


def _frozen_by_layers(layers: LayerMap, spec: FreezeSpec, names: set[str]) -> tuple[set[str], list[tuple[str, ...]]]:
    """Names the strategy freezes and the thaw order, a tied embedding matrix counting as embeddings only."""
    tied = set(layers.embeddings) & set(layers.head)
    head = {name for name in layers.head if name not in tied}
    n = spec.layers or 0
    frozen: set[str] = set()
    thaw_order: list[tuple[str, ...]] = []
    match spec.strategy:
        case "head-only":
            frozen = names - head
            thaw_order = [layers.neck, *reversed(layers.blocks), layers.embeddings]
        case "bottom-layers":
            frozen = set(layers.embeddings).union(*layers.blocks[:n])
            thaw_order = [*reversed(layers.blocks[:n]), layers.embeddings]
        case "top-layers":
            frozen = names - (set(layers.neck) | head).union(*layers.blocks[layers.num_blocks - n :])
    if spec.embeddings:
        frozen |= set(layers.embeddings)
        thaw_order = [unit for unit in thaw_order if unit is not layers.embeddings]  # asked to stay frozen
    return frozen, thaw_order


def apply_freeze(model: nn.Module, spec: FreezeSpec, task: Task) -> tuple[nn.Module, FreezePlan]:
    """Set ``requires_grad`` per the policy (wrapping the model for LoRA) and describe the result.

    A tied input/output embedding matrix is one parameter: when the policy freezes the input embeddings but
    trains the head (head-only, top-layers, bottom-layers, ``embeddings: true``), the head gets its own copy.
    """
    frozen: set[str] = set()
    thaw_order: list[tuple[str, ...]] = []
    untied: str | None = None
    layers: LayerMap | None = None
    if spec.strategy in MAPPED_STRATEGIES or spec.embeddings:
        layers = layer_map(model)
        if spec.layers is not None and spec.layers > layers.num_blocks:
            raise ConfigError(
                f"freeze.layers: {spec.layers} exceeds the {layers.num_blocks} layers (blocks) of the model"
            )
        frozen, thaw_order = _frozen_by_layers(layers, spec, {name for name, _ in model.named_parameters()})
        if spec.strategy != "lora" and set(layers.embeddings) & set(layers.head) & frozen:  # LoRA freezes both
            untied = untie_output_embeddings(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    if spec.strategy == "lora":
        model = _lora(model, task, spec.lora, head_names(model))
    pattern_frozen = _apply_patterns(model, spec)
    units = [[n for n in unit if n in frozen and n not in pattern_frozen] for unit in thaw_order]
    trainable_count, total = count_parameters(model)
    if trainable_count < total:  # thawing only adds trainable parameters: nothing frozen now, nothing ever
        keep_frozen_in_eval(model)
        if layers is not None and spec.strategy != "lora":
            eval_frozen_prefix(model, layers)
    thaw_units = [u for u in units if u] if spec.gradual_unfreezing else []
    return model, FreezePlan(trainable_count, total, thaw_units, untied)


def thawed_units(epoch: int, start_epoch: int, per_epoch: int, available: int) -> int:
    """How many thaw units are unfrozen during 1-based ``epoch`` (a pure function of the epoch: resume-safe)."""
    if epoch < start_epoch:
        return 0
    return min(available, (epoch - start_epoch + 1) * per_epoch)
