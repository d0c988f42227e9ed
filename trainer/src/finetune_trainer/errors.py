"""Exit codes the operator maps to reasons. Config errors (2) are not retried."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INVALID_CONFIG = 2
EXIT_DATA_NOT_FOUND = 3
EXIT_MODEL_NOT_FOUND = 4
EXIT_TERMINATED = 75
"""SIGTERM received and a checkpoint saved: the run can resume (distinct from 143, a kill without saving)."""


class TrainerError(Exception):
    """A bad input the run cannot recover from: one clear message and a distinct exit code."""

    exit_code = 1
    reason = "Crashed"


class ConfigError(TrainerError):
    """The spec or the data does not fit the spec (unknown field, label out of range, pattern matching nothing)."""

    exit_code = EXIT_INVALID_CONFIG
    reason = "InvalidConfig"


class DataError(TrainerError):
    """Dataset files missing or empty."""

    exit_code = EXIT_DATA_NOT_FOUND
    reason = "DataNotFound"


class ModelError(TrainerError):
    """Pretrained model missing or not loadable."""

    exit_code = EXIT_MODEL_NOT_FOUND
    reason = "ModelLoadFailed"
