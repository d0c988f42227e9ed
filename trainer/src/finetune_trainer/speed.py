"""Fast defaults per device: precision, TF32, the dtype LoRA's frozen base loads in, data loading.

The decisions are pure functions of the spec and a ``Device`` (what the accelerator can do), so they are tested
without a GPU; ``detect_device`` is the only place that asks torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from finetune_trainer.contract import CPU_REQUEST_ENV

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Device:
    """What matters about the accelerator for the defaults (``capability`` is CUDA's (major, minor))."""

    cuda: bool
    capability: tuple[int, int] | None = None
    bf16: bool = False


CPU = Device(cuda=False)

AMPERE = (8, 0)
"""The first CUDA generation with TF32 tensor cores and fast bf16."""


def detect_device() -> Device:
    if not torch.cuda.is_available():
        return CPU
    return Device(cuda=True, capability=torch.cuda.get_device_capability(), bf16=torch.cuda.is_bf16_supported())


def resolve_precision(requested: str, device: Device) -> tuple[Precision, str | None]:
    """The precision to train in and, when it differs from an explicit request, why (a warning).

    ``auto`` is bf16 where the GPU supports it (no loss scaling, fp32's range) and fp32 elsewhere: on CPU,
    autocast to bf16 is slower than fp32 on most hosts and changes results. fp16 needs a GPU.
    """
    if requested == "auto":
        return ("bf16" if device.cuda and device.bf16 else "fp32"), None
    if requested == "fp16" and not device.cuda:
        return "fp32", "precision fp16 needs a GPU; training in fp32 on CPU"
    if requested == "bf16" and device.cuda and not device.bf16:
        return "fp32", "precision bf16 is not supported by this GPU; training in fp32"
    if requested in ("fp32", "bf16", "fp16"):
        return requested, None  # type: ignore[return-value]
    raise ValueError(f"unknown precision {requested!r}")


def use_tf32(precision: Precision, device: Device) -> bool:
    """TF32 tensor cores for fp32 matmuls on Ampere and newer: ~8x the fp32 rate at a 10-bit mantissa."""
    return precision == "fp32" and device.cuda and device.capability is not None and device.capability >= AMPERE


def base_dtype(strategy: str, precision: Precision) -> torch.dtype:
    """The dtype weights load in: LoRA's frozen base in the compute dtype (half the memory, no per-step casts).

    Everything else loads in fp32: trainable weights need fp32 master copies for mixed precision.
    """
    if strategy == "lora" and precision == "bf16":
        return torch.bfloat16
    if strategy == "lora" and precision == "fp16":
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class Loading:
    """DataLoader settings."""

    workers: int
    pin_memory: bool
    persistent_workers: bool
    pad_to_multiple_of: int | None


MAX_WORKERS = 8


def data_loading(cpus: int | None, device: Device) -> Loading:
    """Workers from the CPUs the pod asked for, one core left to the training loop; pinned memory on GPU.

    On CPU, training itself uses every core: worker processes would only compete with it. Tensor cores want
    sequence lengths that are multiples of 8.
    """
    if not device.cuda:
        return Loading(0, False, False, None)
    workers = max(0, min((cpus or 1) - 1, MAX_WORKERS))
    return Loading(workers, True, workers > 0, 8)


def available_cpus(environ: Mapping[str, str] | None = None) -> int | None:
    """This rank's share of the pod's CPU request (else of the CPUs this process may run on)."""
    env = os.environ if environ is None else environ
    try:
        requested = int(env.get(CPU_REQUEST_ENV, "0"))
        ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        requested, ranks = 0, 1
    cpus = requested if requested > 0 else len(os.sched_getaffinity(0))
    return max(1, cpus // ranks)


def pad_for_tensor_cores(collator: Any, device: Device) -> Any:
    """Pad batches to a multiple of 8 on GPU (a padding collator's own option; others are left alone)."""
    multiple = data_loading(None, device).pad_to_multiple_of
    if multiple is not None and hasattr(collator, "pad_to_multiple_of"):
        collator.pad_to_multiple_of = multiple
    return collator


def upcast_trainable(model: nn.Module) -> int:
    """Trainable weights in fp32 (optimizer state and updates need its mantissa) when the base loaded in half
    precision: LoRA's new classification head is copied from the base. Returns how many were cast."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
