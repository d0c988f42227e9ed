"""A real two-process torchrun on CPU: the pod exits with the trainer's exit code, not torchrun's 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from finetune_trainer import exitcodes


def test_a_config_error_under_torchrun_exits_2_not_1(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        "model: {source: file:///nowhere, task: sequence-classification}\nhyperparameters: {learningRate: -1}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_METRICS_PORT": "0"}
    launch = [sys.executable, "-m", "finetune_trainer.launch", "--nnodes=1", "--standalone", "--nproc-per-node=2"]
    direct = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *launch[3:],
            "-m",
            "finetune_trainer.cli",
            "--config",
            str(config),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert direct.returncode == 1, "plain torchrun hides the code (what this launcher is for)"
    result = subprocess.run(
        [*launch, "-m", "finetune_trainer.cli", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == exitcodes.INVALID_CONFIG.code, result.stderr[-3000:]
    assert "finetune-trainer: error: dataset: Field required" in result.stderr
