"""Run the trainer in-process and collect its JSON lines."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from finetune_trainer.config import RuntimeEnv
from finetune_trainer.reporting import JsonLines
from finetune_trainer.run import RunResult, run
from finetune_trainer.spec import TrainingSpec


def train(wire: dict[str, Any], **env: Any) -> tuple[RunResult, list[dict[str, Any]]]:
    stream = io.StringIO()
    settings = {"metrics_port": 0, "log_every_steps": 1, **env}
    result = run(TrainingSpec.model_validate(wire), RuntimeEnv(**settings), JsonLines(stream))
    return result, [json.loads(line) for line in stream.getvalue().splitlines()]


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def result_json(output: Path) -> dict[str, Any]:
    return json.loads((output / "result.json").read_text())
