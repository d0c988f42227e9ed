"""Tokenized datasets cached on the output volume, so a restart (or a second rank) does not tokenize again.

The key is the content of the rows to encode (after reading, splitting and limiting), the tokenizer and every
dataset setting that changes the encoding (max length, fields, packing): change any of them and the key changes.
Entries are written atomically (atomic.py) and read memory-mapped (``load_from_disk``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow  # type: ignore[import-untyped]
import pyarrow.ipc  # type: ignore[import-untyped]
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher

from finetune_trainer.atomic import atomic_directory, remove_leftovers
from finetune_trainer.spec import TrainingSpec

CACHE_DIR = "cache/tokenized"
"""Under the output location, next to the checkpoints."""


def cache_key(spec: TrainingSpec, rows: Dataset, processor: Any, digest: str | None = None) -> str:
    """Content hash of the rows (``digest``: their ``rows_digest``, when known), the tokenizer (vocabulary, special
    tokens, template) and the encoding settings."""
    settings = {
        "task": spec.model.task,
        "maxSeqLength": spec.dataset.max_seq_length,
        "packing": spec.dataset.packing,
        "fields": spec.dataset.fields.model_dump(mode="json", by_alias=True),
    }
    hasher = Hasher()
    hasher.update(json.dumps(settings, sort_keys=True))
    hasher.update(type(processor).__name__)
    backend = getattr(processor, "backend_tokenizer", None)
    if backend is not None:  # its truncation/padding state is whatever the last call left: not the tokenizer
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        hasher.update(json.dumps(state, sort_keys=True))
    else:
        hasher.update(Hasher.hash(processor))
    hasher.update(json.dumps(processor.special_tokens_map, sort_keys=True, default=str))
    hasher.update(str(getattr(processor, "chat_template", None)))
    hasher.update(digest if digest is not None else rows_digest(rows))
    key: str = hasher.hexdigest()
    return key


def rows_digest(rows: Dataset) -> str:
    """Content hash of ``rows``: their features and the selected rows' values (not a shuffle's whole table)."""
    table = rows.with_format("arrow")[:].combine_chunks()
    sink = pyarrow.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, table.schema.remove_metadata()) as writer:
        writer.write_table(table.replace_schema_metadata(None))
    features = json.dumps(rows.features.to_dict(), sort_keys=True)
    return hashlib.sha256(features.encode() + sink.getvalue().to_pybytes()).hexdigest()


def dataset_fingerprint(spec: TrainingSpec, digests: dict[str, str]) -> str:
    """The data a run trained and validated on: each split's ``rows_digest`` (the content the cache keys on), the
    split names and the columns read; ``sha256:<hex>`` (``status.artifacts[].datasetFingerprint``)."""
    ds = spec.dataset
    described = {
        "splits": digests,
        "train": ds.train,
        "validation": ds.validation,
        "validationFraction": ds.validation_fraction,
        "fields": ds.fields.model_dump(mode="json", by_alias=True),
    }
    return "sha256:" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def cached_encode(
    root: Path,
    spec: TrainingSpec,
    rows: Dataset,
    processor: Any,
    encode: Callable[[], Dataset],
    digest: str | None = None,
) -> tuple[Dataset, bool]:
    """The encoded rows from the cache under ``root``, or ``encode()`` saved there. Returns (rows, was cached)."""
    parent = root / CACHE_DIR
    entry = parent / cache_key(spec, rows, processor, digest)
    if entry.is_dir():
        try:
            return load_from_disk(str(entry)), True
        except (OSError, ValueError, FileNotFoundError):
            pass  # unreadable (another version wrote it): encode again and replace it
    encoded = encode()
    try:
        remove_leftovers(parent)
        with atomic_directory(entry) as tmp:
            encoded.save_to_disk(str(tmp))
    except OSError:
        return encoded, False  # a full or read-only volume: training goes on without the cache
    try:
        return load_from_disk(str(entry)), False
    except (OSError, ValueError):  # another rank replaced the entry meanwhile (moved aside for a moment)
        return encoded, False
