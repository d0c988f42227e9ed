"""A run killed mid-way (SIGTERM, then SIGKILL) resumes from its newest complete checkpoint with the same
early-stopping state and does not redo finished steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from finetune_trainer import exitcodes
from finetune_trainer.callbacks import COMPLETE_MARKER, EARLY_STOPPING_FILE
from tests.trainer import tiny


def launch(config: Path, stderr: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "FINETUNE_LOG_EVERY_STEPS": "1", "FINETUNE_METRICS_PORT": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer.cli", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )


def run_until(config: Path, sig: signal.Signals | None, after_step: int) -> tuple[int, list[dict[str, Any]]]:
    """Run; once a checkpoint at or after ``after_step`` is announced, send ``sig``."""
    log = config.with_suffix(".stderr")
    with log.open("w") as stderr:
        proc = launch(config, stderr)
    events: list[dict[str, Any]] = []
    assert proc.stdout is not None
    sent = False
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        events.append(event)
        if sig is not None and not sent and event["event"] == "checkpoint" and event["step"] >= after_step:
            proc.send_signal(sig)
            sent = True
    proc.wait(timeout=300)
    assert sig is None or sent, f"the run ended before step {after_step}: {log.read_text()[-2000:]}"
    return proc.returncode, events


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def test_killed_run_resumes_with_its_patience_state(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={"maxSteps": 120, "batchSize": 8, "learningRate": 1e-3, "seed": 0},
        evaluation={"strategy": "steps", "interval": 10, "metrics": ["loss"]},
        # a min delta this large makes every evaluation after the first a miss: the count must survive restarts
        earlyStopping={"metric": "loss", "patience": 1000, "minDelta": 5.0},
        output={"location": str(out), "keepCheckpoints": 2, "checkpointIntervalSteps": 10},
    )
    config = tmp_path / "job.yaml"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "t"},
                "spec": {**wire, "suspend": False, "backoffLimit": 3},
            }
        )
    )

    code, first = run_until(config, signal.SIGTERM, after_step=40)
    assert code == exitcodes.TERMINATED.code
    stopped = of(first, "terminated")[0]["step"]
    checkpoint = out / "checkpoints" / f"checkpoint-{stopped}"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    saved_state = json.loads((checkpoint / EARLY_STOPPING_FILE).read_text())
    assert saved_state["evaluationsWithoutImprovement"] >= 1
    assert not (out / "result.json").exists()

    code, second = run_until(config, signal.SIGKILL, after_step=stopped + 20)
    assert code == -signal.SIGKILL
    resumed = of(second, "resume")[0]
    assert resumed["step"] == stopped and resumed["earlyStopping"] == saved_state
    assert of(second, "log")[0]["step"] == stopped + 1  # no finished step is redone
    killed_at = max(e["step"] for e in of(second, "log"))
    (out / "checkpoints" / f"checkpoint-{killed_at + 1000}").mkdir()  # what a kill during a save leaves behind

    code, third = run_until(config, None, 0)
    assert code == 0
    resumed = of(third, "resume")[0]
    newest = max(e["step"] for e in of(second, "checkpoint"))
    assert resumed["step"] == newest and newest > stopped
    assert of(third, "log")[0]["step"] == newest + 1
    assert not (out / "checkpoints" / f"checkpoint-{killed_at + 1000}").exists()
    evaluations = [e for run in (first, second, third) for e in of(run, "evaluation")]
    steps = [e["step"] for e in evaluations if e["step"] <= newest or e in of(third, "evaluation")]
    unique = sorted(set(steps))
    assert unique == list(range(10, 121, 10))
    final = of(third, "evaluation")[-1]["earlyStopping"]
    assert final["bestStep"] == 10 and final["evaluationsWithoutImprovement"] == len(unique) - 1
    assert json.loads((out / "result.json").read_text())["finalStep"] == 120
