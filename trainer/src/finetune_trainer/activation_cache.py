"""The frozen-prefix activation cache (``freeze.cacheActivations``): compute the frozen bottom once per example.

Under bottom-layers and head-only, the embeddings and the lowest blocks are frozen and run in eval mode (no
dropout, not even a parameter-free one between them: see freeze.keep_frozen_in_eval and freeze.PrefixEvalMode),
so their output for an example is the same in every epoch. The first time an example passes, the last frozen
block's output is kept per example, unpadded (only the positions its attention mask marks). When every example
of a batch is cached, the frozen blocks do not run: the lower ones pass their input through and the last one
returns the cached activations, padded into the batch's shape (the padding positions are masked out of attention
and loss, so their values do not matter). Everything above — attention masks, position embeddings, the trainable
blocks, the head — runs as usual.

Examples are told apart by an index column the collator turns into a tensor (``IndexedCollator``); validation
examples get their own range. Each rank caches the examples it sees: under several ranks, training deals each rank
a fixed shard of the examples (``FixedShardSampler``; the usual sampler deals them anew each epoch, so a rank would
rarely replay a batch), shuffled within the shard each epoch. The cache lives in memory when it fits the rank's
share of half the memory to spare (the ranks of a pod share one budget); otherwise on disk next to the checkpoints
(``DiskStore``: one memory-mapped float32 array of every example's rows, end to end, in a folder of the rank's own),
where a restart finds what the run before it had filled and reuses it. Gradual
unfreezing that thaws a frozen block drops the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from torch import nn
from torch.utils.data import Sampler

from finetune_trainer.atomic import atomic_directory, remove_leftovers
from finetune_trainer.data import PreparedData
from finetune_trainer.freeze import cached_prefix, layer_map
from finetune_trainer.token_cache import rows_digest

CACHE_DIR = "cache/activations"
"""Under the output location, next to the checkpoints (and the tokenized data's cache)."""

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


class FixedShardSampler(Sampler[int]):
    """This rank's training examples: the same shard every epoch (so its cache covers all its batches), reshuffled.

    Rank ``r`` of ``ranks`` takes examples ``r, r + ranks, r + 2 * ranks, ...``; as with torch's DistributedSampler,
    the list is first padded with its own beginning to a multiple of ``ranks``, so every rank has as many examples
    (and batches: DDP needs every rank to step together). Each epoch shuffles the shard with ``seed + epoch``: the
    same order on a resume, which sets the epoch before it skips the batches already trained.
    """

    def __init__(self, examples: int, rank: int, ranks: int, seed: int) -> None:
        if not 0 <= rank < ranks:
            raise ValueError(f"rank {rank} is not one of {ranks} ranks")
        self.rank = rank
        self.ranks = ranks
        self.seed = seed
        self.epoch = 0
        padded = list(range(examples))
        while len(padded) % ranks:
            padded += padded[: ranks - len(padded) % ranks]
        self.shard = padded[rank::ranks]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.shard)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter([self.shard[i] for i in torch.randperm(len(self.shard), generator=generator).tolist()])


class Store(Protocol):
    """Where the activations of examples live: each is (attended tokens, hidden) for one example index."""

    def __contains__(self, index: object) -> bool: ...

    def get(self, index: int) -> torch.Tensor: ...

    def put(self, index: int, states: torch.Tensor) -> None: ...

    def persist(self) -> None: ...

    def clear(self) -> None: ...

    @property
    def nbytes(self) -> int: ...


class MemoryStore:
    """The activations in this process's memory, in the dtype the prefix computed them in."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}

    def __contains__(self, index: object) -> bool:
        return index in self.rows

    def get(self, index: int) -> torch.Tensor:
        return self.rows[index]

    def put(self, index: int, states: torch.Tensor) -> None:
        self.rows[index] = states.detach().to("cpu").clone()

    def persist(self) -> None:
        """Nothing outlives the process."""

    def clear(self) -> None:
        self.rows.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())


class DiskStore:
    """The activations in one memory-mapped float32 file, example after example, each as long as its tokens.

    ``filled.npy`` says which examples are written; it is replaced (atomically, after the array is flushed) by
    ``persist``, so a restart trusts exactly what was on disk before it. ``meta.json`` holds the key (model,
    frozen depth, data) the file was computed for: a different key starts the file afresh.
    """

    def __init__(self, directory: Path, lengths: list[int], hidden: int, key: str) -> None:
        self.directory = directory
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
        shape = (int(self.offsets[-1]), hidden)
        meta = {"key": key, "shape": list(shape), "examples": len(lengths)}
        if not self._matches(meta):
            shutil.rmtree(directory, ignore_errors=True)
            remove_leftovers(directory.parent, only=directory.name)  # the other ranks' are theirs to clean
            with atomic_directory(directory) as tmp:
                np.lib.format.open_memmap(tmp / "activations.npy", mode="w+", dtype=np.float32, shape=shape).flush()
                np.save(tmp / "filled.npy", np.zeros(len(lengths), dtype=bool))
                (tmp / "meta.json").write_text(json.dumps(meta))
        self.data = np.lib.format.open_memmap(directory / "activations.npy", mode="r+")
        self.filled: np.ndarray = np.load(directory / "filled.npy")
        self.reused = int(self.filled.sum())
        """Examples a previous run had written."""
        self._dirty = False

    def _matches(self, meta: dict[str, Any]) -> bool:
        try:
            found = json.loads((self.directory / "meta.json").read_text())
            filled = np.load(self.directory / "filled.npy")
            data = np.lib.format.open_memmap(self.directory / "activations.npy", mode="r")
        except (OSError, ValueError):
            return False
        return bool(found == meta and filled.shape == (meta["examples"],) and list(data.shape) == meta["shape"])

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and bool(self.filled[index])

    def get(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.data[self.offsets[index] : self.offsets[index + 1]])

    def put(self, index: int, states: torch.Tensor) -> None:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        if states.shape[0] != end - start:
            raise ValueError(f"example {index} attends {states.shape[0]} tokens, not its {end - start} tokens")
        self.data[start:end] = states.detach().to("cpu", torch.float32).numpy()
        self.filled[index] = True
        self._dirty = True
        if self.filled.all():
            self.persist()

    def persist(self) -> None:
        """Flush the array, then record which examples it holds (never the other way round)."""
        if not self._dirty:
            return
        self.data.flush()
        written = self.directory / ".filled.npy.tmp"
        with written.open("wb") as handle:
            np.save(handle, self.filled)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(written, self.directory / "filled.npy")
        self._dirty = False

    def clear(self) -> None:
        """Remove the files: the cache is no longer valid (its prefix is training)."""
        del self.data
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1]) * int(self.data.shape[1]) * 4 if hasattr(self, "data") else 0


class ActivationCache:
    """Keeps the last frozen block's output per example and replays it instead of running the frozen blocks."""

    def __init__(
        self,
        blocks: list[nn.Module],
        params: list[nn.Parameter],
        on_drop: Callable[[str], None],
        store: Store | None = None,
    ) -> None:
        self.blocks = blocks
        self.params = params
        self.on_drop = on_drop
        self.store: Store = MemoryStore() if store is None else store
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
        return self.store.nbytes

    def persist(self) -> None:
        """Make what is cached so far durable (a disk store; a checkpoint calls this)."""
        if self.active:
            self.store.persist()

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
                # one scatter: the mask's True positions, row by row, are the examples' rows end to end
                rows = torch.cat([self.store.get(index) for index in self._indices])
                out[self._mask.to(out.device)] = rows.to(out.device, out.dtype, non_blocking=True)
                return out
            output = forward(*args, **kwargs)
            if self._indices is not None and self._mask is not None:
                states = output if isinstance(output, torch.Tensor) else output[0]
                try:
                    for row, index in enumerate(self._indices):
                        if index not in self.store:
                            self.store.put(index, states[row, self._mask[row]])
                except ValueError as exc:  # e.g. packed rows whose mask does not mark their tokens
                    self.drop(str(exc))
            return output

        return run


def spare_memory() -> int | None:
    """The memory this pod may still use: the cgroup's limit (a pod's) less its use, or the host's available."""
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
    return min(candidates) if candidates else None


def memory_budget(local_ranks: int | None = None) -> int | None:
    """This rank's share of half the memory its pod may still use.

    The ranks of a pod (torchrun's ``LOCAL_WORLD_SIZE``) measure at the same time, before any has filled its
    cache, and fill their caches from the same memory: each gets ``1/local_ranks`` of one budget, or together
    they would take ``local_ranks`` times it (and the pod be OOM-killed on every retry).
    """
    ranks = local_ranks if local_ranks is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    spare = spare_memory()
    return spare // 2 // max(ranks, 1) if spare is not None else None


def install(
    model: nn.Module,
    prepared: PreparedData,
    hidden_size: int | None,
    on_drop: Callable[[str], None],
    budget: int | None = None,
    spill: Path | None = None,
    identity: str = "",
    ranks: int = 1,
) -> tuple[ActivationCache | None, PreparedData, dict[str, Any]]:
    """Attach a cache to ``model`` and index ``prepared``'s examples; returns what the freeze event reports.

    A cache that would not fit in ``budget`` bytes of memory goes to the directory ``spill`` (when given and the
    disk has room), keyed by ``identity`` (the model), the frozen depth and the data; otherwise it is not built
    (training goes on, recomputing the prefix). Each of ``ranks`` ranks caches only its share of the examples.
    """
    splits = [rows for rows in (prepared.train, prepared.validation) if rows is not None]
    lengths = [len(ids) for rows in splits for ids in rows["input_ids"]]
    estimate = -(-sum(lengths) * hidden_size * 4 // ranks) if hidden_size is not None else None
    layers = layer_map(model)
    prefix = cached_prefix(model, layers.embeddings, layers.blocks)
    if prefix is None:
        return None, prepared, {"enabled": False, "reason": "nothing is frozen below the first trainable layer"}
    blocks, params = prefix
    report: dict[str, Any] = {"enabled": True, "layers": len(blocks), "examples": len(lengths), "storage": "memory"}
    store: Store | None = None
    if estimate is not None and budget is not None and estimate > budget:
        memory = f"the cache would take about {estimate} bytes, more than the {budget} bytes of memory to spare"
        room = _disk_room(spill) if spill is not None else 0
        if spill is None or hidden_size is None or estimate > room:
            reason = memory if spill is None else f"{memory}, and more than the {room} bytes free on {spill.parent}"
            return None, prepared, {"enabled": False, "reason": reason, "estimatedBytes": estimate}
        key = Hasher()
        for part in (identity, str(len(blocks)), str(hidden_size), *(rows_digest(rows) for rows in splits)):
            key.update(part)
        disk = DiskStore(spill, lengths, hidden_size, key.hexdigest())
        store = disk
        report.update(storage="disk", location=str(spill), reusedExamples=disk.reused)
    if estimate is not None:
        report["estimatedBytes"] = estimate
    if budget is not None:
        report["memoryBudget"] = budget
    train = with_example_index(prepared.train, 0)
    validation = None
    if prepared.validation is not None:
        validation = with_example_index(prepared.validation, len(train))
    return (
        ActivationCache(blocks, params, on_drop, store),
        replace(prepared, train=train, validation=validation, collator=IndexedCollator(prepared.collator)),
        report,
    )


def _disk_room(directory: Path) -> int:
    """Bytes free where ``directory`` is (or would be), plus what a previous cache there already holds."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    held = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) if directory.is_dir() else 0
    return shutil.disk_usage(existing).free + held
