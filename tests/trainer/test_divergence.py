"""Divergence caught early: the pure rule on hand-made loss logs, and a real tiny run at an absurd learning rate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_trainer import exitcodes
from finetune_trainer.cli import main
from finetune_trainer.divergence import EXPLOSION_FACTOR, EXPLOSION_LOGS, DivergenceWatch
from tests.trainer import tiny


def verdicts(losses: list[float]) -> list[str | None]:
    watch = DivergenceWatch()
    return [watch.observe(step, loss) for step, loss in enumerate(losses, start=1)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_diverges_at_once(bad: float) -> None:
    assert verdicts([0.7, 0.6, bad])[:2] == [None, None]
    assert verdicts([0.7, 0.6, bad])[2] is not None
    assert verdicts([bad])[0] is not None  # even the first log


def test_sustained_explosion_diverges_on_the_third_log() -> None:
    high = 0.7 * EXPLOSION_FACTOR * 1.01
    found = verdicts([0.7] + [high] * EXPLOSION_LOGS)
    assert found[:EXPLOSION_LOGS] == [None] * EXPLOSION_LOGS
    assert found[EXPLOSION_LOGS] is not None and "for 3 logs" in found[EXPLOSION_LOGS]


def test_noisy_spikes_that_recover_do_not_diverge() -> None:
    high = 0.7 * EXPLOSION_FACTOR * 2
    losses = [0.7, high, high, 0.5, high, 0.6, high, high, 0.4, 0.7 * EXPLOSION_FACTOR]  # exactly 10x: not above
    assert verdicts(losses) == [None] * len(losses)


def test_the_first_exploded_log_marks_where_weights_became_suspect() -> None:
    watch = DivergenceWatch()
    for step, loss in [(1, 0.7), (10, 8.0), (20, 0.6), (30, 9.0), (40, 9.0), (50, 9.0)]:
        watch.observe(step, loss)
    assert watch.exploded_since == 30


def test_absurd_learning_rate_exits_diverged_naming_step_and_rate(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's example, tiny: full fine-tuning at learning rate 10 explodes; the run stops, exit 6, one line,
    no final model, and no checkpoint from after the explosion to resume from."""
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={"learningRate": 10, "batchSize": 8, "epochs": 4, "seed": 0, "weightDecay": 0.0},
        evaluation={"strategy": "steps", "interval": 2, "metrics": ["loss", "accuracy"]},
    )
    config = tmp_path / "spec.json"
    config.write_text(json.dumps(wire))
    code = main(["--config", str(config)])
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert code == exitcodes.DIVERGED.code == 6
    stderr = captured.err.strip().splitlines()
    assert len(stderr) == 1, stderr
    assert stderr[0].startswith("finetune-trainer: error: training diverged at step "), stderr
    assert "(learning rate " in stderr[0] and "lower hyperparameters.learningRate" in stderr[0]
    assert "on the schedule from hyperparameters.learningRate 10)" in stderr[0], "the rate the user wrote, too"
    diverged = [e for e in events if e["event"] == "diverged"]
    assert len(diverged) == 1
    step = diverged[0]["step"]
    assert step < 48  # stopped early: 4 epochs of 12 steps would be 48
    last_log = [e for e in events if e["event"] == "log"][-1]
    assert last_log["step"] < step  # the diverged loss was never published as progress
    assert [e["reason"] for e in events if e["event"] == "error"] == ["Diverged"]
    assert not (out / "model").exists() and not (out / "result.json").exists()
    kept = [int(p.name.removeprefix("checkpoint-")) for p in (out / "checkpoints").glob("checkpoint-*")]
    assert all(k < step for k in kept)
