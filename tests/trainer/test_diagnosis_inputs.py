"""What the operator's diagnosis reads, reported by a real (tiny) run: the training loss at each evaluation
and the majority-class baseline of the validation labels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from finetune_trainer.baseline import majority_baseline
from tests.trainer import tiny
from tests.trainer.helpers import of, result_json, train


def test_baseline_is_the_most_frequent_label_share() -> None:
    assert majority_baseline([0, 1, 1, 1]) == 0.75
    assert majority_baseline(["a", "b"]) == 0.5
    assert majority_baseline([]) is None


def test_evaluations_carry_the_training_loss_and_best_carries_the_baseline(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={"learningRate": 1e-3, "batchSize": 16, "epochs": 2, "seed": 0, "weightDecay": 0.0},
    )
    result, events = train(wire)
    assert result.exit_code == 0
    rows = [json.loads(line) for line in (assets["sentiment"] / "validation.jsonl").read_text().splitlines()]
    expected = max(Counter(r["label"] for r in rows).values()) / len(rows)
    assert result_json(out)["best"]["majorityBaseline"] == expected
    checkpoint = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    evaluations = json.loads((checkpoint / "run_state.json").read_text())["evaluations"]
    assert len(evaluations) == 2
    # each carries the mean loss of its own epoch's steps: together they average to the Trainer's overall loss
    windows = [e["trainLoss"] for e in evaluations]
    assert sum(windows) / 2 == pytest.approx(of(events, "result")[0]["trainLoss"], rel=1e-5), windows
