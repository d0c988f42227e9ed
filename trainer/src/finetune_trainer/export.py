"""Publishing the final model in the forms a server loads: a LoRA adapter (peft's format) and a plain model.

Both are safetensors in one dtype (``output.export.dtype``; ``auto``: the compute dtype the run trained in, so a
bf16 LoRA run never ships an fp32 model twice the size of its base). A LoRA merge is computed in fp32 and cast once
at the end: merging into a bf16 base directly would round the base plus each adapter's update twice.

Each directory is written whole or not at all (``atomic_directory``) with its manifest written last
(``manifest.write_manifest``): the manifest's sha256 is the artifact's identity in ``status.artifacts``. The save
functions take the model and, optionally, its full state dict, so a sharded model's consolidated state dict
(FSDP) saves through the same path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from peft import PeftModel

from finetune_trainer.atomic import atomic_directory
from finetune_trainer.contract import ArtifactKind
from finetune_trainer.manifest import Manifest, build_manifest, write_manifest

__all__ = [
    "ADAPTER_DIR",
    "DTYPES",
    "MODEL_DIR",
    "Published",
    "base_revision",
    "export_dtype",
    "merged",
    "save_adapter",
    "save_model",
]

ADAPTER_DIR: Final = "adapter"
"""A LoRA job's adapter, under the output location."""
MODEL_DIR: Final = "model"
"""The final (for LoRA: merged) model, under the output location."""
DTYPES: Final = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Published:
    """One directory written: where, what, in which dtype, and its manifest."""

    path: Path
    kind: ArtifactKind
    dtype: str
    manifest: Manifest


def export_dtype(requested: str, precision: str) -> str:
    """``auto`` is the precision the run trained in (bf16, fp16 or fp32); anything else stands."""
    return precision if requested == "auto" else requested


def _publish(target: Path, write: Callable[[Path], None]) -> Manifest:
    with atomic_directory(target) as partial:
        write(partial)
        return write_manifest(partial)


def save_adapter(
    model: PeftModel, processor: Any, target: Path, dtype: str, state_dict: StateDict | None = None
) -> Published:
    """The adapter (and any head it trains) in peft's format, its trained weights cast to ``dtype``."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    full = state_dict if state_dict is not None else model.state_dict()
    cast = {name: tensor.to(DTYPES[dtype]) if name in trainable else tensor for name, tensor in full.items()}

    def write(directory: Path) -> None:
        model.save_pretrained(str(directory), state_dict=cast, safe_serialization=True)
        processor.save_pretrained(str(directory))

    return Published(target, "adapter", dtype, _publish(target, write))


def merged(model: Any, dtype: str) -> Any:
    """A plain model in ``dtype``: a LoRA model's adapters merged in fp32 first (in place: save the adapter before)."""
    if isinstance(model, PeftModel):
        model = model.float().merge_and_unload()
    return model.to(DTYPES[dtype])


def save_model(
    model: Any, processor: Any, target: Path, kind: ArtifactKind, dtype: str, state_dict: StateDict | None = None
) -> Published:
    """A plain model (already ``merged``) and its processor; ``state_dict`` is saved instead of the model's own."""

    def write(directory: Path) -> None:
        model.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(str(directory))

    return Published(target, kind, dtype, _publish(target, write))


def base_revision(name_or_path: str, commit: str | None) -> str | None:
    """The base model's revision: the Hub commit it was read at, or for a directory ``sha256:`` of the manifest
    of its config and weight files (the same base gives the same hash wherever it is stored)."""
    if commit:
        return commit
    directory = Path(name_or_path)
    if not directory.is_dir():
        return None
    manifest = build_manifest(directory, only=lambda path: path == "config.json" or path.endswith(_WEIGHT_SUFFIXES))
    return "sha256:" + manifest.sha256
