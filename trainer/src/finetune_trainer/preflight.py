"""The first stage of a run: every check that needs neither the model nor the training stack.

Torch-free: the CLI runs it before importing torch, transformers and datasets (7-9 s), so a run-level
config error or a data error (a missing file or column, a bad row, label or image path) is reported in
about a second. It returns the splits it read, which training then uses: the data is read once.
An ``hf://datasets`` source is downloaded (and checked) later, by `data`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from finetune_trainer.config import RuntimeEnv, local_path
from finetune_trainer.errors import ConfigError
from finetune_trainer.reader import RawSplit, check_columns, check_values, is_hub, read_local
from finetune_trainer.spec import TrainingSpec


@dataclass(frozen=True)
class Checked:
    """The local splits, read and checked; both None for a hub dataset (read after the download)."""

    train: RawSplit | None
    validation: RawSplit | None


def has_validation(spec: TrainingSpec) -> bool:
    """Whether the run will have validation data: a validation split, or a fraction held out of training."""
    return bool(spec.dataset.validation) or spec.dataset.validation_fraction is not None


def check_run(spec: TrainingSpec, env: RuntimeEnv) -> None:
    """Run-level checks: the output location can be written, early stopping has something to watch."""
    checkpoints_dir = local_path(spec.output.location, env.pvc_root) / "checkpoints"
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output.location: cannot create {checkpoints_dir}: {exc.strerror}") from exc
    if not has_validation(spec) and spec.evaluation.strategy != "no" and spec.early_stopping is not None:
        raise ConfigError("dataset.validation: earlyStopping needs validation data (validation or validationFraction)")


Read = Callable[[TrainingSpec, RuntimeEnv, str, str], RawSplit]
"""Reads one split: (spec, env, file pattern or split name, the spec field named in messages)."""


def read_checked(spec: TrainingSpec, env: RuntimeEnv, read: Read) -> Checked:
    """Read both splits with ``read`` and check their columns, rows, labels and image paths."""
    ds = spec.dataset
    train = read(spec, env, ds.train, "dataset.train")
    check_columns(spec, train)
    validation = read(spec, env, ds.validation, "dataset.validation") if ds.validation else None
    if validation is not None:
        check_columns(spec, validation)
    check_values(spec, [train] if validation is None else [train, validation])
    return Checked(train, validation)


def check_data(spec: TrainingSpec, env: RuntimeEnv) -> Checked:
    """The local splits, read and checked (a hub dataset is left to `data`: it needs a download)."""
    return Checked(None, None) if is_hub(spec) else read_checked(spec, env, read_local)


def preflight(spec: TrainingSpec, env: RuntimeEnv) -> Checked:
    """Raise ConfigError or DataError (exit codes 2 and 3) for what can be known before the training stack loads."""
    check_run(spec, env)
    return check_data(spec, env)
