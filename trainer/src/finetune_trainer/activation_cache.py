"""The frozen-prefix activation cache (``freeze.cacheActivations``): compute the frozen bottom once per example.

Under bottom-layers and head-only, the embeddings and the lowest blocks are frozen and run in eval mode (no
dropout, see freeze.keep_frozen_in_eval), so their output for an example is the same in every epoch. The first
time an example passes, the last frozen block's output is kept per example, unpadded (only the positions its
attention mask marks). When every example of a batch is cached, the frozen blocks do not run: the lower ones pass
their input through and the last one returns the cached activations, padded into the batch's shape (the padding
positions are masked out of attention and loss, so their values do not matter). Everything above — attention masks,
position embeddings, the trainable blocks, the head — runs as usual.

Examples are told apart by an index column the collator turns into a tensor (``IndexedCollator``); validation
examples get their own range. Each rank caches the examples it sees. The cache lives in memory; a restart
recomputes it during its first epoch. Gradual unfreezing that thaws a frozen block drops the cache.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from finetune_trainer.data import PreparedData
from finetune_trainer.freeze import layer_map

EXAMPLE_INDEX = "example_index"
"""The column (and batch key) that names an example; popped before the model sees the batch."""


def with_example_index(rows: Dataset, start: int) -> Dataset:
    """``rows`` with indices ``start, start+1, ...`` in the EXAMPLE_INDEX column."""
    return rows.add_column(EXAMPLE_INDEX, list(range(start, start + len(rows))))


class IndexedCollator:
    """Batches with the example indices as a tensor, whatever the inner collator does with other columns."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner
        self.pad_to_multiple_of: int | None = getattr(inner, "pad_to_multiple_of", None)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [int(feature[EXAMPLE_INDEX]) for feature in features]
        rest = [{k: v for k, v in feature.items() if k != EXAMPLE_INDEX} for feature in features]
        if hasattr(self.inner, "pad_to_multiple_of"):
            self.inner.pad_to_multiple_of = self.pad_to_multiple_of
        batch = dict(self.inner(rest))
        batch[EXAMPLE_INDEX] = torch.tensor(indices, dtype=torch.long)
        return batch


class ActivationCache:
    """Keeps the last frozen block's output per example and replays it instead of running the frozen blocks."""

    def __init__(self, blocks: list[nn.Module], params: list[nn.Parameter], on_drop: Callable[[str], None]) -> None:
        self.blocks = blocks
        self.params = params
        self.on_drop = on_drop
        self.store: dict[int, torch.Tensor] = {}
        self.active = True
        self._indices: list[int] | None = None
        self._mask: torch.Tensor | None = None
        self._replay = False
        self._originals = [block.forward for block in blocks]
        for block in blocks[:-1]:
            block.forward = self._passthrough(block.forward)
        blocks[-1].forward = self._last(blocks[-1].forward)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def drop(self, why: str) -> None:
        """Forget everything and run the frozen blocks again from now on."""
        if not self.active:
            return
        for block, forward in zip(self.blocks, self._originals, strict=True):
            block.forward = forward
        size = self.nbytes
        self.store.clear()
        self.active = False
        self.on_drop(f"activation cache dropped ({size} bytes): {why}")

    def begin(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Before a forward pass: note the batch's examples (removing their indices from the model's inputs)."""
        indices = inputs.pop(EXAMPLE_INDEX, None)
        if not self.active:
            return inputs
        if any(p.requires_grad for p in self.params):
            self.drop("gradual unfreezing thawed a cached layer")
            return inputs
        mask = inputs.get("attention_mask")
        if indices is None or mask is None:
            self._indices = None
            self._replay = False
            return inputs
        self._indices = [int(i) for i in indices.tolist()]
        self._mask = mask.bool()
        self._replay = all(i in self.store for i in self._indices)
        return inputs

    def _passthrough(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self._replay:
                return args[0] if args else kwargs["hidden_states"]
            return forward(*args, **kwargs)

        return run

    def _last(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self._replay and self._mask is not None and self._indices is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                out = torch.zeros_like(hidden)
                for row, index in enumerate(self._indices):
                    out[row, self._mask[row]] = self.store[index].to(out.device, out.dtype)
                return out
            output = forward(*args, **kwargs)
            if self._indices is not None and self._mask is not None:
                states = output if isinstance(output, torch.Tensor) else output[0]
                for row, index in enumerate(self._indices):
                    if index not in self.store:
                        self.store[index] = states[row, self._mask[row]].detach().to("cpu").clone()
            return output

        return run


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


def attach(
    model: nn.Module, embeddings: tuple[str, ...], blocks: tuple[tuple[str, ...], ...], on_drop: Callable[[str], None]
) -> ActivationCache | None:
    """A cache over the frozen embeddings and the blocks frozen whole above them; None when nothing is frozen so."""
    named = dict(model.named_parameters())
    if not embeddings or any(named[name].requires_grad for name in embeddings):
        return None  # trainable embeddings change the prefix's output every step
    block_params = [[named[name] for name in block] for block in blocks]
    count = frozen_prefix(model, block_params)
    if count == 0:
        return None
    params = [named[name] for name in embeddings] + [p for block in block_params[:count] for p in block]
    return ActivationCache(prefix_blocks(model, block_params[:count]), params, on_drop)


def memory_budget() -> int | None:
    """Half of the memory this process may still use: the cgroup's limit (a pod's) or the host's available."""
    candidates = []
    try:
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            candidates.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError):
        candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(candidates) // 2 if candidates else None


def install(
    model: nn.Module,
    prepared: PreparedData,
    hidden_size: int | None,
    on_drop: Callable[[str], None],
    budget: int | None = None,
) -> tuple[ActivationCache | None, PreparedData, dict[str, Any]]:
    """Attach a cache to ``model`` and index ``prepared``'s examples; returns what the freeze event reports.

    A cache that would not fit in ``budget`` bytes is not built (training goes on, recomputing the prefix).
    """
    splits = [rows for rows in (prepared.train, prepared.validation) if rows is not None]
    tokens = sum(len(ids) for rows in splits for ids in rows["input_ids"])
    estimate = tokens * hidden_size * 4 if hidden_size is not None else None
    if estimate is not None and budget is not None and estimate > budget:
        reason = f"the cache would take about {estimate} bytes, more than the {budget} bytes of memory to spare"
        return None, prepared, {"enabled": False, "reason": reason, "estimatedBytes": estimate}
    layers = layer_map(model)
    cache = attach(model, layers.embeddings, layers.blocks, on_drop)
    if cache is None:
        return None, prepared, {"enabled": False, "reason": "nothing is frozen below the first trainable layer"}
    train = with_example_index(prepared.train, 0)
    validation = None
    if prepared.validation is not None:
        validation = with_example_index(prepared.validation, len(train))
    report: dict[str, Any] = {"enabled": True, "layers": len(cache.blocks), "examples": sum(map(len, splits))}
    if estimate is not None:
        report["estimatedBytes"] = estimate
    return (
        cache,
        replace(prepared, train=train, validation=validation, collator=IndexedCollator(prepared.collator)),
        report,
    )
