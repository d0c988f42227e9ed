"""Splits as ``datasets`` rows: hub downloads, labels as a ClassLabel column, held-out validation, limits."""

from __future__ import annotations

import pyarrow  # type: ignore[import-untyped]
from datasets import ClassLabel, Dataset, load_dataset

from finetune_trainer.config import RuntimeEnv
from finetune_trainer.errors import DataError
from finetune_trainer.reader import RawSplit, is_hub, label_ids, read_local, require_rows
from finetune_trainer.spec import TrainingSpec


def read_hub(spec: TrainingSpec, env: RuntimeEnv, split: str, where: str) -> RawSplit:
    """One split of an ``hf://datasets`` source (downloaded), with at least one row."""
    ds = spec.dataset
    repo = ds.source[len("hf://datasets/") :]
    try:
        rows = load_dataset(
            repo, ds.subset, split=split, revision=ds.revision, token=env.dataset_hf_token or env.hf_token
        )
    except Exception as exc:  # hub, network and format errors all mean "cannot get this data"
        raise DataError(
            f"{where}: cannot load split {split!r} of {spec.dataset.source}: {str(exc).splitlines()[0]}"
        ) from exc
    return require_rows(RawSplit(rows, f"{split} split", None), where)


def read_split(spec: TrainingSpec, env: RuntimeEnv, pattern: str, where: str) -> RawSplit:
    """One split, from the hub or the local files."""
    return (read_hub if is_hub(spec) else read_local)(spec, env, pattern, where)


def as_dataset(split: RawSplit) -> Dataset:
    """The split's rows as a ``datasets.Dataset`` (a local table is wrapped in memory, not copied)."""
    return Dataset(split.rows) if isinstance(split.rows, pyarrow.Table) else split.rows


def with_labels(spec: TrainingSpec, split: RawSplit) -> Dataset:
    """The rows with their labels as class indices in a ``labels`` ClassLabel column."""
    ids = split.labels if split.labels is not None else label_ids(spec, split)
    rows = as_dataset(split)
    if spec.dataset.fields.label != "labels":
        rows = rows.remove_columns([spec.dataset.fields.label])
    if "labels" in rows.column_names:
        rows = rows.remove_columns(["labels"])
    names = spec.model.label_names or [str(i) for i in range(spec.model.effective_num_labels or 0)]
    return rows.add_column("labels", ids).cast_column("labels", ClassLabel(names=names))


def limit(rows: Dataset, most: int | None, seed: int, shuffle: bool) -> Dataset:
    if shuffle and most is not None and most < len(rows):
        return rows.shuffle(seed=seed).select(range(most))
    if most is not None and most < len(rows):
        return rows.select(range(most))
    return rows


def split_validation(rows: Dataset, fraction: float, seed: int, stratify: bool) -> tuple[Dataset, Dataset]:
    if len(rows) < 2:
        raise DataError("dataset.validationFraction: need at least two rows to hold some out")
    if stratify:
        try:
            parts = rows.train_test_split(test_size=fraction, seed=seed, stratify_by_column="labels")
            return parts["train"], parts["test"]
        except ValueError:
            pass  # a class too small to stratify: fall back to a plain seeded split
    parts = rows.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
