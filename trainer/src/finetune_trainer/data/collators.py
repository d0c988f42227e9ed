"""Collators that batch encoded rows: padded causal-LM batches, packed (padding-free) rows, image batches.

Classification text uses transformers' ``DataCollatorWithPadding`` directly.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorWithFlattening


class PackingCollator:
    """One padding-free row per batch (transformers' ``DataCollatorWithFlattening``). transformers turns the
    restarting position ids into a block-diagonal attention mask, but only without a KV cache: the batch turns
    the cache off (the model's config, saved with the final model, is untouched)."""

    def __init__(self) -> None:
        self.flatten = DataCollatorWithFlattening(return_position_ids=True)  # type: ignore[no-untyped-call]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = dict(self.flatten(features))
        batch["use_cache"] = False
        return batch


class CausalLMCollator:
    """Pad to the longest sequence; labels are the examples' own (-100 where not learned), -100 on padding."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def image_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([f["pixel_values"] for f in features]),
        "labels": torch.as_tensor([f["labels"] for f in features], dtype=torch.long),
    }
