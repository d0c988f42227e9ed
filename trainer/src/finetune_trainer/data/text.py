"""Text data: sentence (pair) classification and plain causal-LM text, fitted to the model's positions."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import DatasetSpec, TrainingSpec


def encode_classification(spec: TrainingSpec, rows: Dataset, processor: Any) -> Dataset:
    """Text (and text pair) as truncated token ids; ``labels`` kept."""
    fields = spec.dataset.fields
    max_len = spec.dataset.max_seq_length

    def encode(batch: dict[str, Any]) -> Any:
        pair = batch[fields.text_pair] if fields.text_pair else None
        return processor(batch[fields.text], pair, truncation=True, max_length=max_len)

    keep = {"labels"}
    return rows.map(encode, batched=True, remove_columns=[c for c in rows.column_names if c not in keep])


def encode_causal_text(spec: TrainingSpec, rows: Dataset, processor: Any) -> Dataset:
    """Documents as ids that learn every token, EOS at the end (unless truncation cut it off)."""
    column = spec.dataset.fields.text
    max_len = spec.dataset.max_seq_length
    eos = processor.eos_token_id

    def encode(batch: dict[str, Any]) -> Any:
        # strings (check_columns refused nulls and numbers); EOS ends each document, unless truncation cut it off
        ids = [
            ([*encoded, eos] if eos is not None and encoded[-1:] != [eos] else encoded)[:max_len]
            for encoded in processor(batch[column])["input_ids"]
        ]
        return {"input_ids": ids, "labels": ids}

    return rows.map(encode, batched=True, remove_columns=rows.column_names)


POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_positions(processor: Any, model_config: Any) -> int | None:
    """How many tokens the model can take: its position table (less a RoBERTa-like padding offset)."""
    config = getattr(model_config, "text_config", None) or model_config
    positions = next(
        (getattr(config, a) for a in POSITION_ATTRIBUTES if isinstance(getattr(config, a, None), int)), None
    )
    tokenizer_limit = getattr(processor, "model_max_length", None)
    if positions is not None and isinstance(tokenizer_limit, int) and positions - 2 <= tokenizer_limit < positions:
        return tokenizer_limit  # RoBERTa-like: 514 positions, 512 usable (the padding offset)
    return positions  # a tokenizer's lower limit is often only a suggestion: not a reason to refuse


def fit_max_seq_length(spec: TrainingSpec, processor: Any, model_config: Any) -> TrainingSpec:
    """The default maxSeqLength is capped to the model's positions; an explicit value above them is an error."""
    limit = model_positions(processor, model_config)
    wanted = spec.dataset.max_seq_length
    if limit is None or wanted <= limit:
        return spec
    if wanted != DatasetSpec.model_fields["max_seq_length"].default:
        raise ConfigError(f"dataset.maxSeqLength: {wanted} exceeds the {limit} positions the model supports")
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"max_seq_length": limit})})
