"""``distributed.strategy: fsdp``: the model sharded with PyTorch FSDP2, its checkpoints, its consolidation.

accelerate's FSDP plugin only runs on accelerators (a CPU process group stays DDP), so the trainer shards
the model itself, after the freeze policy and LoRA, the same way on the CPU (gloo) and on GPUs (nccl):
``fully_shard`` on each transformer block, then on the root. The Trainer is told through its own switch for a
model sharded by transformers (``is_distributed_loading_by_transformers``) that the model owns its placement
and gradient reduction: no DDP wrap, no ``.to()``. Checkpoints are torch distributed checkpoints (each rank
writes its own file) and resume on the same number of ranks; the final model is gathered into one plain model
on rank 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from peft import get_peft_model
from torch import distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from finetune_trainer.errors import ConfigError

Strategy = Literal["ddp", "fsdp"]
SHARDED_DIR = "sharded"
"""A checkpoint's torch distributed checkpoint: one ``__<rank>_0.distcp`` per rank and ``.metadata``."""
SHARDING_FILE = "sharding.json"
"""Which strategy and how many ranks wrote a checkpoint (absent: DDP, written by rank 0 alone)."""
_RANK_FILE = re.compile(rf"^(?:{SHARDED_DIR}/__(\d+)_\d+\.distcp|rng_state_(\d+)\.pth)$")
"""The files one rank writes into a sharded checkpoint: its shards and its RNG state (the Trainer's name)."""


def writer(relative: str) -> int:
    """The rank that wrote a sharded checkpoint's file (its path in the checkpoint): its own shards and RNG state;
    everything else (``.metadata``, the scheduler, the run state, the complete marker) is rank 0's."""
    match = _RANK_FILE.match(relative)
    return int(match.group(1) or match.group(2)) if match else 0


def files_of(rank: int) -> Callable[[str], bool]:
    """Which of a sharded checkpoint's files ``rank`` publishes (see ``writer``)."""
    return lambda relative: writer(relative) == rank


def is_sharded(model: nn.Module) -> bool:
    """The model (root) was sharded by ``shard``."""
    return isinstance(model, FSDPModule)


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    base: nn.Module = get_base() if callable(get_base) else model
    return base


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of the classes transformers never splits across devices."""
    names = set(getattr(_base(model), "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard(model: nn.Module, param_dtype: torch.dtype | None) -> int:
    """Shard ``model`` in place across the process group; returns how many blocks became their own unit.

    ``param_dtype``: the compute dtype of FSDP2's mixed precision (bf16 on GPU), gradients reduced in fp32;
    None computes in the parameters' dtype. Frozen parameters stay frozen: FSDP2 reduces only gradients.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    _base(model)._is_distributed_loading_by_transformers = True  # type: ignore[assignment]
    return len(blocks)


@contextmanager
def deferred_reduction(model: nn.Module) -> Iterator[None]:
    """Gradient accumulation: no reduce-scatter until the micro-batch that steps the optimizer."""
    root: Any = model
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every rank writes its shards of the model (and the optimizer state) under ``directory``; collective."""
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    (directory / SHARDED_DIR).mkdir(parents=True, exist_ok=True)  # on every node: not only where rank 0 writes
    dcp_save(state, checkpoint_id=str(directory / SHARDED_DIR))
    if dist.get_rank() == 0:
        (directory / SHARDING_FILE).write_text(json.dumps({"strategy": "fsdp", "worldSize": dist.get_world_size()}))


def check_resumable(directory: Path, strategy: Strategy, ranks: int) -> None:
    """A checkpoint resumes under the strategy and the number of ranks that wrote it; else a clear error."""
    path = directory / SHARDING_FILE
    written = json.loads(path.read_text()) if path.is_file() else {"strategy": "ddp"}
    if written["strategy"] != strategy:
        raise ConfigError(
            f"distributed.strategy: {directory.name} was written by {written['strategy']}, this run uses {strategy}: "
            "resume with the strategy that wrote it, or use a new output.location"
        )
    if strategy == "fsdp" and written["worldSize"] != ranks:
        raise ConfigError(
            f"resources: the sharded {directory.name} was written by {written['worldSize']} ranks and this run has "
            f"{ranks}: a sharded checkpoint resumes on the same number of ranks (nodes x GPUs per node)"
        )


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Read this rank's shards of the model (and the optimizer state) back; collective."""
    if optimizer is None:
        model_state = get_model_state_dict(model)
        dcp_load({"model": model_state}, checkpoint_id=str(directory / SHARDED_DIR))
        set_model_state_dict(model, model_state)
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp_load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the CPU of rank 0 (None on the others); collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = get_model_state_dict(model, options=options)
    return state if dist.get_rank() == 0 else None


def _plain_class(module: nn.Module) -> type[nn.Module]:
    """The class ``fully_shard`` replaced (it swaps in a subclass of FSDPModule and the original)."""
    cls = type(module)
    if not issubclass(cls, FSDPModule):
        return cls
    plain: type[nn.Module] = next(base for base in cls.__bases__ if issubclass(base, nn.Module) and base is not cls)
    return plain


def unsharded(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of the sharded ``model`` (LoRA: a PeftModel) holding ``state`` (see ``full_state_dict``).

    Built on the meta device and filled by assignment: no second copy of the weights, no process group needed
    to save it (``save_pretrained``, ``merge_and_unload``).
    """
    base = _base(model)
    config: Any = base.config
    with torch.device("meta"):
        plain: Any = _plain_class(base)(config)
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        adapter = getattr(model, "active_adapter", "default")
        plain = get_peft_model(plain, peft_config[adapter], adapter_name=adapter)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    missing = [name for name, tensor in plain.state_dict().items() if tensor.is_meta]
    if missing:
        raise RuntimeError(f"consolidating the sharded model: no weights for {missing[:3]}")
    plain.eval()
    result: nn.Module = plain
    return result
