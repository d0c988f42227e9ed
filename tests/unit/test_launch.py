"""torchrun exits 1 whatever its workers did: the launcher hands the trainer's own exit code to the pod."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer import exitcodes
from finetune_trainer.contract import TERMINATION_GRACE_ENV
from finetune_trainer.launch import (
    EXIT_CODE_DIR_ENV,
    container_exit_code,
    record_exit_code,
    recorded_exit_codes,
    shutdown_timeout,
    torchrun_args,
)


@pytest.mark.parametrize(
    ("torchrun", "workers", "expected"),
    [
        (0, {0: 0, 1: 0}, 0),
        (1, {0: 3, 1: 3}, exitcodes.DATA_ERROR.code),  # bad data on every rank: not retried
        (1, {1: 2}, exitcodes.INVALID_CONFIG.code),  # rank 1 failed first, rank 0 was killed by torchrun
        (1, {0: 4, 1: 2}, exitcodes.MODEL_ERROR.code),  # lowest rank wins
        (1, {0: 75, 1: 1}, exitcodes.TERMINATED.code),  # rank 0 saved a checkpoint: resumes
        (1, {0: 1}, exitcodes.CRASHED.code),
        (1, {}, exitcodes.CRASHED.code),  # a worker killed by a signal records nothing: a crash
        (2, {}, exitcodes.CRASHED.code),  # torchrun's own usage error is not the user's bad config
        (-9, {}, exitcodes.CRASHED.code),
        (1, {1: 75}, exitcodes.CRASHED.code),  # only rank 0 checkpoints
    ],
)
def test_container_exit_code(torchrun: int, workers: dict[int, int], expected: int) -> None:
    assert container_exit_code(torchrun, workers) == expected


@pytest.mark.parametrize(
    ("torchrun", "workers", "expected"),
    [
        (1, {2: 75, 3: 75}, exitcodes.TERMINATED.code),  # node index 1 of a drained job: ranks 2 and 3 saved nothing
        (1, {}, exitcodes.TERMINATED.code),  # workers SIGKILLed at the end of the grace period
        (1, {2: 3}, exitcodes.DATA_ERROR.code),  # a permanent error still wins
        (0, {2: 0}, 0),  # finished before the signal
    ],
)
def test_a_pod_that_got_sigterm_exits_terminated_on_every_node(
    torchrun: int, workers: dict[int, int], expected: int
) -> None:
    assert container_exit_code(torchrun, workers, terminated=True) == expected


def test_torchrun_waits_for_the_workers_as_long_as_the_pod_may() -> None:
    args = ["--nnodes=2", "-m", "finetune_trainer.cli", "--config", "c.yaml"]
    assert torchrun_args(args, {TERMINATION_GRACE_ENV: "120"}) == ["--shutdown-timeout=110", *args]
    assert shutdown_timeout({TERMINATION_GRACE_ENV: "5"}) == 1
    assert shutdown_timeout({}) == 30, "torchrun's own default without a grace period"
    given = ["--shutdown-timeout=7", *args]
    assert torchrun_args(given, {TERMINATION_GRACE_ENV: "120"}) == given


def test_workers_record_their_codes(tmp_path: Path) -> None:
    record_exit_code(3, {EXIT_CODE_DIR_ENV: str(tmp_path), "RANK": "1"})
    record_exit_code(75, {EXIT_CODE_DIR_ENV: str(tmp_path), "RANK": "0"})
    record_exit_code(2, {"RANK": "2"})  # outside the launcher: nothing recorded
    (tmp_path / "rank-x").write_text("garbage")
    assert recorded_exit_codes(tmp_path) == {0: 75, 1: 3}
    assert container_exit_code(1, recorded_exit_codes(tmp_path)) == exitcodes.DATA_ERROR.code
