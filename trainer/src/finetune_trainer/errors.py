"""Errors that end a run with a specific exit code from the one table in `exitcodes`."""

from __future__ import annotations

from finetune_trainer import exitcodes
from finetune_trainer.exitcodes import ExitCode


class TrainerError(Exception):
    """A bad input the run cannot recover from: one clear message and a distinct exit code."""

    code: ExitCode = exitcodes.CRASHED

    @property
    def exit_code(self) -> int:
        return self.code.code

    @property
    def reason(self) -> str:
        return self.code.reason


class ConfigError(TrainerError):
    """The spec cannot work with this model (unknown field, pattern matching nothing, nothing trainable)."""

    code = exitcodes.INVALID_CONFIG


class DataError(TrainerError):
    """Dataset files missing or empty, a column missing, a bad row, label or image (file and row named)."""

    code = exitcodes.DATA_ERROR


class ModelError(TrainerError):
    """Pretrained model missing or not loadable."""

    code = exitcodes.MODEL_ERROR


class NoAcceleratorError(TrainerError):
    """The pod was given GPUs, but CUDA sees none."""

    code = exitcodes.NO_ACCELERATOR


class MetricsUnavailableError(TrainerError):
    """The trainer cannot serve /metrics (its port is taken): raised before training starts."""

    code = exitcodes.METRICS_UNAVAILABLE


class DivergedError(TrainerError):
    """The training loss became NaN, infinite or exploded."""

    code = exitcodes.DIVERGED
