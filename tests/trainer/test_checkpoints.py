"""Checkpoints are written atomically and once per step, stops do not evaluate, and between
``checkpointIntervalSteps`` an evaluation keeps only the weights of a new best."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from finetune_operator.api.job import FineTuneJobStatus
from finetune_trainer import callbacks, exitcodes
from finetune_trainer.callbacks import (
    COMPLETE_MARKER,
    FULL,
    WEIGHTS,
    EarlyStoppingCallback,
    RunContext,
    checkpoint_kind,
)
from finetune_trainer.contract import MAX_EVALUATIONS, EvaluationRecord
from finetune_trainer.reporting import JsonLines
from finetune_trainer.spec import TrainingSpec
from finetune_trainer.trainer import FineTuneTrainer
from tests.trainer import tiny
from tests.trainer.helpers import of, train


@pytest.fixture
def sigterm_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Steps at whose end a SIGTERM "arrives" (the flag the real handler sets)."""
    steps: list[int] = []
    original = callbacks.StopCallback.on_step_end

    def on_step_end(self: Any, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step in steps:
            self.ctx.terminating = True
        original(self, args, state, control, **kwargs)

    monkeypatch.setattr(callbacks.StopCallback, "on_step_end", on_step_end)
    yield steps


def checkpoint_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_a_stop_at_the_end_of_an_epoch_saves_that_step_once(
    assets: dict[str, Path], tmp_path: Path, sigterm_at: list[int]
) -> None:
    out = tmp_path / "out"
    sigterm_at.append(12)  # 96 examples / batch 8: the last step of epoch 1
    wire = tiny.spec(assets["bert"], assets["sentiment"], out, evaluation={"strategy": "no", "metrics": ["loss"]})
    result, events = train(wire)
    assert result.exit_code == exitcodes.TERMINATED.code and result.final_step == 12
    assert [e["step"] for e in of(events, "checkpoint")] == [12]
    assert checkpoint_kind(out / "checkpoints" / "checkpoint-12") == FULL


def test_no_evaluation_in_the_stop_grace_period(assets: dict[str, Path], tmp_path: Path, sigterm_at: list[int]) -> None:
    sigterm_at.append(4)
    wire = tiny.spec(
        assets["bert"], assets["sentiment"], tmp_path / "out", evaluation={"strategy": "steps", "interval": 4}
    )
    result, events = train(wire)
    assert result.exit_code == exitcodes.TERMINATED.code
    assert of(events, "evaluation") == []
    assert [e["step"] for e in of(events, "checkpoint")] == [4]


def test_an_interrupted_save_leaves_nothing_that_looks_like_a_checkpoint(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(assets["bert"], assets["sentiment"], out, hyperparameters={"maxSteps": 4})

    def disk_full(self: Any, output_dir: str) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(FineTuneTrainer, "_save_rng_state", disk_full)
        with pytest.raises(OSError, match="No space left"):
            train(wire)
    assert checkpoint_dirs(out) == []  # the weights and optimizer were written, but never under the real name

    # a kill during a save leaves a hidden temporary directory, even one holding a marker: never resumed from
    leftover = out / "checkpoints" / ".tmp-checkpoint-99-0badf00d"
    leftover.mkdir()
    (leftover / COMPLETE_MARKER).write_text("99 full\n")
    result, events = train(wire)
    assert result.exit_code == 0 and of(events, "resume") == []
    assert not leftover.exists()
    assert all(not name.startswith(".tmp-") for name in checkpoint_dirs(out))


def test_between_checkpoint_intervals_an_evaluation_keeps_only_the_weights_of_a_new_best(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["noisy"],  # random labels: the validation loss rises after a while, so not every evaluation is best
        out,
        hyperparameters={"maxSteps": 12, "batchSize": 4, "learningRate": 3e-3},
        evaluation={"strategy": "steps", "interval": 2, "metrics": ["loss", "accuracy"]},
        earlyStopping={"metric": "loss", "patience": 100, "restoreBest": True},
        output={"location": str(out), "checkpointIntervalSteps": 6, "keepCheckpoints": 5},
    )
    result, events = train(wire)
    assert result.exit_code == 0
    saved = {e["step"]: e["kind"] for e in of(events, "checkpoint")}
    best_steps = []
    best = None
    for evaluation in of(events, "evaluation"):
        if best is None or evaluation["metrics"]["loss"] < best:
            best = evaluation["metrics"]["loss"]
            best_steps.append(evaluation["step"])
    expected = {step: WEIGHTS for step in best_steps if step % 6}
    expected.update({6: FULL, 12: FULL})
    assert saved == expected
    assert len(best_steps) < 6, "every evaluation improved: the test shows nothing"
    for step, kind in saved.items():
        directory = out / "checkpoints" / f"checkpoint-{step}"
        if not directory.exists():
            continue  # a former best, rotated away
        assert checkpoint_kind(directory) == kind
        assert (directory / "model.safetensors").is_file()
        assert (directory / "optimizer.pt").is_file() == (kind == FULL)
    kept = {p.name for p in (out / "checkpoints").iterdir()}
    assert kept == {"checkpoint-6", "checkpoint-12", f"checkpoint-{best_steps[-1]}"}
    assert result.best is not None and result.best["step"] == best_steps[-1]


def test_evaluation_history_is_keyed_by_step(assets: dict[str, Path], tmp_path: Path) -> None:
    """A resumed run re-evaluates steps its lost predecessor had recorded: those records are replaced."""
    out = tmp_path / "out"
    spec = TrainingSpec.model_validate(tiny.spec(assets["bert"], assets["sentiment"], out))
    ctx = RunContext(spec, out, out / "checkpoints", tmp_path, JsonLines(io.StringIO()))
    ctx.state.evaluations = [EvaluationRecord(step=s, epoch=s / 10, metrics={"loss": 1.0}) for s in (10, 20, 30)]
    state = TrainerState(global_step=20, epoch=2.0)
    control = TrainerControl()
    EarlyStoppingCallback(ctx).on_evaluate(
        TrainingArguments(output_dir=str(tmp_path)), state, control, metrics={"eval_loss": 0.5}
    )
    assert [(e.step, e.metrics["loss"]) for e in ctx.state.evaluations] == [(10, 1.0), (20, 0.5)]


def test_the_trainer_keeps_and_reports_as_many_evaluations_as_the_api_holds(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """One bound on both sides: the trainer kept 50 where the API holds 200 (finetune_trainer.contract)."""
    out = tmp_path / "out"
    spec = TrainingSpec.model_validate(tiny.spec(assets["bert"], assets["sentiment"], out))
    ctx = RunContext(spec, out, out / "checkpoints", tmp_path, JsonLines(io.StringIO()))
    callback, args = EarlyStoppingCallback(ctx), TrainingArguments(output_dir=str(tmp_path))
    for step in range(1, MAX_EVALUATIONS + 6):
        callback.on_evaluate(args, TrainerState(global_step=step, epoch=step / 10), TrainerControl(), metrics={})
    assert len(ctx.state.evaluations) == MAX_EVALUATIONS  # what a resumed run starts from
    history = callbacks.history_status(ctx).to_patch()
    assert [e["step"] for e in history["evaluations"]] == list(range(6, MAX_EVALUATIONS + 6))
    assert len(FineTuneJobStatus.model_validate(history).evaluations) == MAX_EVALUATIONS
