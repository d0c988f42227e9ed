"""Turn the checked splits into model inputs: labels, held-out validation, limits, encoding, the collator.

Split by task over the shared, torch-free reader (`finetune_trainer.reader`, which `preflight` runs before
the training stack loads): `text` (classification and plain causal text), `chat`, `image`, `collators`,
and `splits` (hub downloads, labels, validation split and limits).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from datasets import Dataset
from transformers import DataCollatorWithPadding

from finetune_trainer.config import RuntimeEnv, local_path
from finetune_trainer.data.chat import assistant_spans, chat_tokens, encode_chat
from finetune_trainer.data.collators import CausalLMCollator, PackingCollator, image_collator
from finetune_trainer.data.image import attach_images, augmentation_transforms, image_pipeline
from finetune_trainer.data.splits import as_dataset, limit, read_hub, read_split, split_validation, with_labels
from finetune_trainer.data.text import (
    encode_causal_text,
    encode_classification,
    fit_max_seq_length,
    model_positions,
)
from finetune_trainer.errors import DataError
from finetune_trainer.preflight import Checked, check_data, read_checked
from finetune_trainer.reader import RawSplit, check_columns, label_ids
from finetune_trainer.spec import TrainingSpec
from finetune_trainer.token_cache import cached_encode, dataset_fingerprint, rows_digest

__all__ = [
    "CausalLMCollator",
    "PackingCollator",
    "PreparedData",
    "RawSplit",
    "assistant_spans",
    "attach_images",
    "augmentation_transforms",
    "chat_tokens",
    "check_columns",
    "drop_unused_inputs",
    "image_collator",
    "label_ids",
    "model_positions",
    "prepare",
    "read_split",
    "tokenize_text",
    "with_labels",
]


@dataclass
class PreparedData:
    """Model-ready splits plus the collator that batches them."""

    train: Dataset
    validation: Dataset | None
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    cached_splits: tuple[str, ...] = ()
    """Splits whose tokens came from the cache on the output volume (see token_cache)."""
    fingerprint: str | None = None
    """What data this is (``token_cache.dataset_fingerprint``): an artifact's lineage."""


def tokenize_text(spec: TrainingSpec, rows: Dataset, processor: Any) -> Dataset:
    """The rows encoded for the task: classification text, chat messages or plain causal text."""
    if spec.model.task == "sequence-classification":
        return encode_classification(spec, rows, processor)
    if spec.dataset.fields.messages:
        return encode_chat(spec, rows, processor, spec.dataset.fields.messages)
    return encode_causal_text(spec, rows, processor)


def model_inputs(model: Any) -> set[str]:
    """Named arguments of the model's forward, as the Trainer's own column pruning sees them."""
    params = inspect.signature(model.forward).parameters
    return {name for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def drop_unused_inputs(prepared: PreparedData, model: Any) -> PreparedData:
    """Drop token columns the model does not take (e.g. ``token_type_ids`` from a BERT tokenizer on Llama).

    The Trainer's own pruning is off (``remove_unused_columns=False``: images are decoded lazily).
    """
    accepted = model_inputs(model)

    def prune(rows: Dataset | None) -> Dataset | None:
        if rows is None or "input_ids" not in rows.column_names:
            return rows
        unused = [c for c in rows.column_names if c not in accepted and c != "labels"]
        return rows.remove_columns(unused) if unused else rows

    train = prune(prepared.train)
    assert train is not None
    return replace(prepared, train=train, validation=prune(prepared.validation))


def prepare(
    spec: TrainingSpec, env: RuntimeEnv, processor: Any, model_config: Any, checked: Checked | None = None
) -> PreparedData:
    """Split, limit and encode the data ``checked`` holds (read and checked here when not given, or from the hub)."""
    ds = spec.dataset
    task = spec.model.task
    checked = checked or check_data(spec, env)
    if checked.train is None:  # a hub dataset: downloaded now, checked the same way
        checked = read_checked(spec, env, read_hub)
    train_raw, val_raw = checked.train, checked.validation
    assert train_raw is not None
    if task != "image-classification":
        spec = fit_max_seq_length(spec, processor, model_config)
    classify = task != "causal-lm"
    train = with_labels(spec, train_raw) if classify else as_dataset(train_raw)
    validation = None
    if val_raw is not None:
        validation = with_labels(spec, val_raw) if classify else as_dataset(val_raw)
    elif ds.validation_fraction is not None:
        train, validation = split_validation(train, ds.validation_fraction, spec.hyperparameters.seed, classify)
    train = limit(train, ds.max_train_samples, spec.hyperparameters.seed, shuffle=True)
    if validation is not None:
        validation = limit(validation, ds.max_eval_samples, spec.hyperparameters.seed, shuffle=False)
    digests = {
        name: rows_digest(rows) for name, rows in (("train", train), ("validation", validation)) if rows is not None
    }
    fingerprint = dataset_fingerprint(spec, digests)
    if task == "image-classification":
        train = attach_images(spec, train, train_raw.base, image_pipeline(processor, spec.augmentation))
        if validation is not None:
            base = val_raw.base if val_raw is not None else train_raw.base
            validation = attach_images(spec, validation, base, image_pipeline(processor, None))
        return PreparedData(train, validation, image_collator, fingerprint=fingerprint)
    root = local_path(spec.output.location, env.pvc_root)
    cached: list[str] = []
    encoded: dict[str, Dataset] = {}
    for name, rows in (("train", train), ("validation", validation)):
        if rows is not None:
            encoded[name], hit = cached_encode(
                root, spec, rows, processor, partial(tokenize_text, spec, rows, processor), digests[name]
            )
            cached += [name] if hit else []
    train, validation = encoded["train"], encoded.get("validation")
    if len(train) == 0:
        raise DataError("dataset.train: no training examples left after encoding")
    if task == "causal-lm" and ds.packing:
        return PreparedData(train, validation, PackingCollator(), tuple(cached), fingerprint)
    if task == "causal-lm":
        return PreparedData(
            train, validation, CausalLMCollator(int(processor.pad_token_id)), tuple(cached), fingerprint
        )
    return PreparedData(train, validation, DataCollatorWithPadding(processor), tuple(cached), fingerprint)
