"""Chat data for causal LMs: messages rendered by the tokenizer's chat template, loss on assistant turns."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import TrainingSpec


def assistant_spans(processor: Any, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered chat) that assistant turns produced, end-of-turn markup included.

    A turn is what rendering ``messages[: i + 1]`` adds to rendering ``messages[:i]``; for a template whose
    renderings are not prefixes of each other, the turn's content.
    """
    spans = []
    previous = ""
    cursor = 0
    for i, message in enumerate(messages):
        rendered = processor.apply_chat_template(messages[: i + 1], tokenize=False)
        if rendered.startswith(previous) and text.startswith(rendered):
            start, end = len(previous), len(rendered)
        else:
            start = text.find(message["content"], cursor)
            end = start + len(message["content"])
        if message["role"] == "assistant" and start >= 0:
            spans.append((start, end))
        cursor = max(cursor, end)
        previous = rendered
    return spans


def chat_tokens(processor: Any, messages: list[dict[str, Any]], assistant_only: bool) -> tuple[list[int], list[int]]:
    """Ids of the rendered chat (the template places its own special tokens: none are added again), and labels."""
    text = processor.apply_chat_template(messages, tokenize=False)
    encoded = processor(text, add_special_tokens=False, return_offsets_mapping=assistant_only)
    ids: list[int] = encoded["input_ids"]
    if not assistant_only:
        return ids, list(ids)
    spans = assistant_spans(processor, messages, text)
    labels = [
        token if any(start <= begin < end for start, end in spans) else -100
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def encode_chat(spec: TrainingSpec, rows: Dataset, processor: Any, column: str) -> Dataset:
    """Each row's messages as ids and labels, cut to maxSeqLength."""
    max_len = spec.dataset.max_seq_length
    if not getattr(processor, "chat_template", None):
        raise ConfigError("dataset.fields.messages: the tokenizer has no chat template to render messages with")
    assistant_only = spec.dataset.assistant_only_loss
    if assistant_only and not getattr(processor, "is_fast", False):
        raise ConfigError("dataset.assistantOnlyLoss needs a fast tokenizer (token offsets); set it to false")

    def encode(batch: dict[str, Any]) -> Any:
        pairs = [chat_tokens(processor, messages, assistant_only) for messages in batch[column]]
        return {"input_ids": [ids[:max_len] for ids, _ in pairs], "labels": [lab[:max_len] for _, lab in pairs]}

    return rows.map(encode, batched=True, remove_columns=rows.column_names)
