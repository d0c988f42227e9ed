"""The trainer's exit codes: the one table the trainer exits with and the operator reads.

Torch-free, so the operator imports it. The Job's podFailurePolicy is rendered from it
(codes that are not retried fail the Job at once), and the operator turns a code into the
`Failed` condition's reason. Other work extends this table; it never keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class ExitCode:
    """One row of the table: the process exit code, the condition reason, and whether a retry can help."""

    code: int
    reason: str
    retried: bool
    meaning: str


OK: Final = ExitCode(0, "Succeeded", False, "finished; the result says Succeeded or EarlyStopped")
CRASHED: Final = ExitCode(1, "Crashed", True, "an unexpected error: retried up to backoffLimit, resuming")
INVALID_CONFIG: Final = ExitCode(
    2, "InvalidConfig", False, "the spec cannot work with this model (e.g. maxSeqLength, nothing trainable)"
)
DATA_ERROR: Final = ExitCode(
    3, "DataError", False, "dataset files missing or empty, a column missing, a bad row, label or image"
)
MODEL_ERROR: Final = ExitCode(4, "ModelError", False, "the model is missing or cannot be loaded")
NO_ACCELERATOR: Final = ExitCode(5, "NoAccelerator", False, "the pod was given GPUs but CUDA is unavailable")
DIVERGED: Final = ExitCode(6, "Diverged", False, "the training loss became NaN, infinite or exploded")
METRICS_UNAVAILABLE: Final = ExitCode(
    7, "MetricsUnavailable", False, "/metrics cannot listen on its port (taken): no curve would reach Prometheus"
)
TERMINATED: Final = ExitCode(
    75, "Terminated", True, "stopped by SIGTERM (after saving a checkpoint, if it was training); resumes"
)

TABLE: Final[tuple[ExitCode, ...]] = (
    OK,
    CRASHED,
    INVALID_CONFIG,
    DATA_ERROR,
    MODEL_ERROR,
    NO_ACCELERATOR,
    DIVERGED,
    METRICS_UNAVAILABLE,
    TERMINATED,
)
BY_CODE: Final[dict[int, ExitCode]] = {row.code: row for row in TABLE}
PERMANENT: Final[dict[int, str]] = {row.code: row.reason for row in TABLE if row.code != OK.code and not row.retried}
"""Non-zero codes a retry cannot fix, with their `Failed` reasons: the Job fails at once on these."""


def reason_for(code: int) -> str:
    """The condition reason for an exit code; unknown non-zero codes are crashes."""
    row = BY_CODE.get(code)
    return row.reason if row is not None else CRASHED.reason
