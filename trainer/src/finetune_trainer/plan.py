"""``finetune-trainer --config job.yaml --plan``: the model's layer map, what the freeze policy trains, and the
memory plan (per-GPU GiB for ddp and fsdp, and the strategy the job would run with).

Know the model before you freeze it: loads the weights, applies the same policy a run would
(``freeze.apply_freeze``, ``freeze.layer_map``), prints a table and exits without touching data or output.
The memory plan needs only the model's config.json (``memory_plan``, torch-free: ``kubectl finetune advise``
prints it too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO

from torch import nn

from finetune_trainer.config import RuntimeEnv
from finetune_trainer.freeze import apply_freeze, count_parameters, layer_map
from finetune_trainer.models import load_model, resolve_source
from finetune_trainer.spec import TrainingSpec


def _count(named: dict[str, nn.Parameter], names: Iterable[str]) -> tuple[int, int]:
    """(total, trainable) over ``names``, a shared (tied) parameter counted once."""
    params = {id(named[n]): named[n] for n in names if n in named}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _state(total: int, trainable: int) -> str:
    if trainable == 0:
        return "frozen"
    return "trains" if trainable == total else "partly trains"


def plan_rows(spec: TrainingSpec, env: RuntimeEnv) -> list[tuple[str, int, int]]:
    """(part, parameters, trainable) for embeddings, each block bottom first, neck, head, then the total."""
    model = load_model(spec.model, resolve_source(spec.model, env), spec.hyperparameters.dropout)
    wrapped, _ = apply_freeze(model, spec.freeze, spec.model.task)
    layers = layer_map(wrapped)
    named = dict(wrapped.named_parameters())
    parts: list[tuple[str, tuple[str, ...]]] = [("embeddings", layers.embeddings)]
    parts += [(f"block {i} ({layers.blocks_prefix}.{i})", block) for i, block in enumerate(layers.blocks)]
    parts += [("neck (final norm, pooler)", layers.neck), ("head", layers.head)]
    rows = [(label, *_count(named, names)) for label, names in parts if names]
    trainable, total = count_parameters(wrapped)
    return [*rows, ("total", total, trainable)]


def print_plan(spec: TrainingSpec, env: RuntimeEnv, out: TextIO) -> int:
    """The layer map (loads the model)."""
    rows = plan_rows(spec, env)
    freeze = spec.freeze
    detail = f", layers {freeze.layers}" if freeze.layers is not None else ""
    detail += ", embeddings frozen" if freeze.embeddings else ""
    print(f"model {spec.model.source} ({spec.model.task}); freeze.strategy {freeze.strategy}{detail}", file=out)
    width = max(len(r[0]) for r in rows)
    print(f"{'PART':<{width}}  {'PARAMETERS':>12}  {'TRAINABLE':>12}  STATE", file=out)
    for label, total, trainable in rows:
        state = f"{100.0 * trainable / max(total, 1):.1f}%" if label == "total" else _state(total, trainable)
        print(f"{label:<{width}}  {total:>12,}  {trainable:>12,}  {state}", file=out)
    if freeze.gradual_unfreezing is not None:
        print(
            "gradualUnfreezing thaws frozen blocks top-down from epoch "
            f"{freeze.gradual_unfreezing.start_epoch}, {freeze.gradual_unfreezing.layers_per_epoch} per epoch",
            file=out,
        )
    return 0
