"""``freeze.lora.quantization: 4bit`` (QLoRA): the frozen base in 4-bit NF4 with double quantization (bitsandbytes),
bf16 compute, fp32 LoRA adapters.

CUDA only: bitsandbytes' 4-bit kernels need a GPU, and it is imported only when a job asks for 4bit (it is the
trainer's optional ``qlora`` extra). The model loads on this rank's GPU (4-bit weights cannot be moved after
loading); ``prepare_model_for_kbit_training`` then keeps the non-quantized weights (norms, head) in fp32.
Proven only by ``benchmarks/gpu.sh``: the CPU tests cover the refusal.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from torch import nn
from transformers import BitsAndBytesConfig

from finetune_trainer.accelerator import require_cuda_for_quantization
from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import FreezeSpec

FIELD = "freeze.lora.quantization"


def quantization(freeze: FreezeSpec) -> str | None:
    """The quantization the job asks for (None: the base loads unquantized)."""
    return freeze.lora.quantization if freeze.lora is not None else None


def require(freeze: FreezeSpec, cuda: bool) -> None:
    """4bit needs CUDA (the refusal the run checks at start) and bitsandbytes: checked before the weights load."""
    require_cuda_for_quantization(quantization(freeze), cuda)
    if quantization(freeze) is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{FIELD}: 4bit needs bitsandbytes, which this trainer image lacks (install finetune-trainer[qlora])"
        )


def load_kwargs(freeze: FreezeSpec, cuda: bool) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the base in 4 bits on this rank's GPU ({} without quantization)."""
    if quantization(freeze) is None:
        return {}
    require(freeze, cuda)
    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def prepare(model: nn.Module, freeze: FreezeSpec) -> nn.Module:
    """Ready a 4-bit base for adapters (fp32 norms and head, no weight gradients); others unchanged.

    Activation checkpointing stays ours (non-reentrant, see checkpointing.py), not peft's reentrant default."""
    if quantization(freeze) is None:
        return model
    prepared: nn.Module = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]
    return prepared


def merged(model: Any) -> Any:
    """The adapters merged into the dequantized base, in bf16 (a 4-bit base cannot be cast to fp32 first)."""
    return model.merge_and_unload().dequantize().to(torch.bfloat16)
