"""torchrun exits 1 whatever its workers did: the launcher hands the trainer's own exit code to the pod."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer import exitcodes
from finetune_trainer.launch import EXIT_CODE_DIR_ENV, container_exit_code, record_exit_code, recorded_exit_codes


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


def test_workers_record_their_codes(tmp_path: Path) -> None:
    record_exit_code(3, {EXIT_CODE_DIR_ENV: str(tmp_path), "RANK": "1"})
    record_exit_code(75, {EXIT_CODE_DIR_ENV: str(tmp_path), "RANK": "0"})
    record_exit_code(2, {"RANK": "2"})  # outside the launcher: nothing recorded
    (tmp_path / "rank-x").write_text("garbage")
    assert recorded_exit_codes(tmp_path) == {0: 75, 1: 3}
    assert container_exit_code(1, recorded_exit_codes(tmp_path)) == exitcodes.DATA_ERROR.code
