"""Divergence caught early: the pure rule on hand-made loss logs, and a real tiny run at an absurd learning rate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import exitcodes
from finetune_trainer.callbacks import RUN_STATE_FILE, RunState, load_run_state
from finetune_trainer.cli import main
from finetune_trainer.loss_watch import EXPLODED_STEPS, EXPLOSION_FACTOR, LossWatch, chance_loss
from tests.trainer import tiny
from tests.trainer.helpers import of, train

CHANCE = math.log(2)


def verdicts(losses: list[float], chance: float | None = CHANCE) -> list[str | None]:
    watch = LossWatch()
    return [watch.observe_step(step, loss, chance) for step, loss in enumerate(losses, start=1)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_diverges_at_once(bad: float) -> None:
    assert verdicts([0.7, 0.6, bad])[:2] == [None, None]
    assert verdicts([0.7, 0.6, bad])[2] is not None
    assert verdicts([bad])[0] is not None  # even the first step
    assert LossWatch().observe_evaluation(3, bad, CHANCE) is not None


def test_sustained_explosion_diverges_on_the_third_step() -> None:
    high = 0.7 * EXPLOSION_FACTOR * 1.01
    found = verdicts([0.7] + [high] * EXPLODED_STEPS)
    assert found[:EXPLODED_STEPS] == [None] * EXPLODED_STEPS
    assert found[EXPLODED_STEPS] is not None and "for 3 steps in a row" in found[EXPLODED_STEPS]


def test_noisy_spikes_that_recover_do_not_diverge() -> None:
    high = 0.7 * EXPLOSION_FACTOR * 2
    losses = [0.7, high, high, 0.5, high, 0.6, high, high, 0.4, 0.7 * EXPLOSION_FACTOR]  # exactly 10x: not above
    assert verdicts(losses) == [None] * len(losses)


def test_a_tiny_first_loss_does_not_make_ordinary_batches_exploded() -> None:
    """An already fitted model starts at 0.01: batches at 0.3 are 30x that, but better than chance."""
    assert verdicts([0.01] + [0.3] * 10) == [None] * 11
    assert verdicts([0.01] + [0.3] * 10, chance=None)[3] is not None  # what chance protects from


def test_the_first_exploded_step_marks_where_weights_became_suspect() -> None:
    watch = LossWatch()
    for step, loss in [(1, 0.7), (10, 8.0), (20, 0.6), (30, 9.0), (40, 9.0), (50, 9.0)]:
        watch.observe_step(step, loss, CHANCE)
    assert watch.exploded_since == 29, "the loss of step 30 came from the weights of step 29"


def test_an_evaluation_far_above_chance_while_training_fits_nothing_diverges() -> None:
    """The issue's 6-step MiniLM run: evaluation loss 776 at step 3; a chance predictor has 0.69."""
    watch = LossWatch()
    for step, loss in [(1, 0.69), (2, 300.0), (3, 900.0)]:
        assert watch.observe_step(step, loss, CHANCE) is None
    why = watch.observe_evaluation(3, 776.0, CHANCE)
    assert why is not None and "776" in why and "chance predictor (0.6931)" in why
    assert watch.exploded_since == 1, "step 2's loss of 300 came from the weights of step 1"


def test_an_overfitting_run_is_not_diverged() -> None:
    """Memorised noisy labels: the evaluation loss grows far above chance and above the first evaluation,
    but the training batches fit far better than chance."""
    watch = LossWatch()
    for evaluation, step in enumerate(range(10, 110, 10)):
        for s in range(step - 9, step + 1):
            assert watch.observe_step(s, max(0.69 - s * 0.01, 0.001), CHANCE) is None
        assert watch.observe_evaluation(step, 0.7 + evaluation * 2.0, CHANCE) is None
        watch.close_window()


def test_later_evaluations_are_measured_against_the_first() -> None:
    watch = LossWatch(first_loss=3.0)
    watch.observe_step(1, 3.0, None)
    assert watch.observe_evaluation(1, 2.0, None) is None
    watch.close_window()
    watch.observe_step(2, 40.0, None)
    why = watch.observe_evaluation(2, 25.0, None)
    assert why is not None and "first evaluation's loss (2)" in why


def test_the_window_mean_is_the_training_loss_since_the_previous_evaluation() -> None:
    watch = LossWatch()
    for step, loss in enumerate([1.0, 2.0, 3.0], start=1):
        watch.observe_step(step, loss, CHANCE)
    assert watch.close_window() == 2.0
    assert watch.close_window() is None
    watch.observe_step(4, 0.5, CHANCE)
    assert watch.close_window() == 0.5


def test_the_references_survive_a_resume(tmp_path: Path) -> None:
    """A resumed run measures against the first step of the whole run, never against its own first (late,
    tiny) loss, which would make ordinary batches look exploded and end a healthy run (exit 6, permanent)."""
    watch = LossWatch()
    for step, loss in enumerate([0.7, 0.3, 0.05, 0.01], start=1):
        watch.observe_step(step, loss, None)
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / RUN_STATE_FILE).write_text(json.dumps(RunState(losses=watch).to_wire()))
    resumed = load_run_state(checkpoint).losses
    assert resumed.first_loss == 0.7
    late = [resumed.observe_step(step, loss, None) for step, loss in [(5, 0.01), (6, 0.2), (7, 0.3), (8, 0.25)]]
    assert late == [None] * 4


def test_chance_is_the_uniform_prediction() -> None:
    assert chance_loss("sequence-classification", 2, 30522) == pytest.approx(math.log(2))
    assert chance_loss("image-classification", 10, None) == pytest.approx(math.log(10))
    assert chance_loss("causal-lm", None, 50257) == pytest.approx(math.log(50257))
    assert chance_loss("sequence-classification", None, 30522) is None


def short_run(model: Path, root: Path, learning_rate: float) -> dict[str, Any]:
    """The issue's shape: 40 training rows, batch 16, 2 epochs (6 steps, 2 evaluations), full fine-tuning."""
    data = tiny.write_sentiment(root / "data", 40, 40)
    hyperparameters = {"learningRate": learning_rate, "batchSize": 16, "epochs": 2, "seed": 0, "weightDecay": 0.0}
    return tiny.spec(model, data, root / "out", hyperparameters=hyperparameters)


def test_a_six_step_run_at_an_absurd_rate_diverges_at_its_first_evaluation(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logged once (every 10 steps), three steps per epoch: today's 3-logs rule never judged it and it Succeeded."""
    monkeypatch.setenv("FINETUNE_LOG_EVERY_STEPS", "10")
    config = tmp_path / "spec.json"
    config.write_text(json.dumps(short_run(assets["bert"], tmp_path, 10.0)))
    code = main(["--config", str(config)])
    captured = capsys.readouterr()
    assert code == exitcodes.DIVERGED.code
    stderr = captured.err.strip().splitlines()
    assert len(stderr) == 1, stderr
    assert stderr[0].startswith("finetune-trainer: error: training diverged at step 3 (learning rate "), stderr
    assert "the evaluation loss " in stderr[0] and "chance predictor (0.6931)" in stderr[0]
    events = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert not of(events, "evaluation"), "the diverged evaluation is never published"
    assert not (tmp_path / "out" / "model").exists()
    assert not list((tmp_path / "out" / "checkpoints").glob("checkpoint-*"))


def test_a_healthy_six_step_run_succeeds_with_a_true_training_loss_per_evaluation(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """Logged at step 1 only, each evaluation still carries the mean loss of its own steps (not the stale
    step-1 value), and the first step's loss, the divergence reference, is in every checkpoint."""
    result, events = train(short_run(assets["bert"], tmp_path, 1e-3), log_every_steps=10)
    assert (result.exit_code, result.reason) == (0, "Succeeded")
    assert [e["step"] for e in of(events, "log")] == [1]
    first = of(events, "log")[0]["loss"]
    run_state = json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-6" / RUN_STATE_FILE).read_text())
    windows = [r["trainLoss"] for r in run_state["evaluations"]]  # what status.evaluations shows
    assert len(windows) == 2 and windows[0] != first and windows[0] != windows[1], windows
    overall = of(events, "result")[0]["trainLoss"]  # the Trainer's mean over all 6 steps
    assert (windows[0] + windows[1]) / 2 == pytest.approx(overall, rel=1e-5)
    assert [e["trainLoss"] for e in of(events, "evaluation")] == windows
    assert run_state["losses"]["firstLoss"] == pytest.approx(first)


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
