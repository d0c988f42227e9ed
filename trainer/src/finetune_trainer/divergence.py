"""Divergence caught early: stop at a NaN/infinite loss or an explosion (see ``loss_watch``), exit 6.

A diverged run never recovers on its own, and a retry diverges again: every further step is a
wasted GPU-minute, and its weights must not become a checkpoint, the best model or the final one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.callbacks import RunContext, complete_checkpoints
from finetune_trainer.errors import DivergedError


class DivergenceCallback(TrainerCallback):
    """Judges every step's training loss (logged or not) and every evaluation loss; on divergence removes the
    checkpoints written since the loss first exploded and raises ``DivergedError`` (exit 6, not retried) before
    the step is logged, evaluated, saved or published.

    ``step_loss`` returns the loss of the step that just ended, the same on every rank (see
    ``FineTuneTrainer.take_step_loss``), so every rank reaches the same verdict at the same step.
    """

    def __init__(self, ctx: RunContext, step_loss: Callable[[], float | None]) -> None:
        self.ctx = ctx
        self.step_loss = step_loss
        self.rate: float | None = None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        scheduler = kwargs.get("lr_scheduler")
        if scheduler is not None:  # before the scheduler steps: the rate this step used
            self.rate = float(scheduler.get_last_lr()[0])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        loss = self.step_loss()
        if loss is None:
            return
        why = self.ctx.state.losses.observe_step(state.global_step, loss, self.ctx.chance_loss)
        if why is not None:
            self._stop(args, state.global_step, why)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        loss = (kwargs.get("metrics") or {}).get("eval_loss")
        if not isinstance(loss, int | float):
            return
        why = self.ctx.state.losses.observe_evaluation(state.global_step, float(loss), self.ctx.chance_loss)
        if why is not None:
            self._stop(args, state.global_step, why)

    def _stop(self, args: TrainingArguments, step: int, why: str) -> None:
        # Raising leaves the Trainer's loop here: this step is neither logged, evaluated nor saved.
        peak = float(args.learning_rate)
        rate = self.rate if self.rate is not None else peak
        # the schedule's rate at this step; the user wrote the peak, so name that too when they differ
        said = f"learning rate {rate:.3g}" + (
            f" on the schedule from hyperparameters.learningRate {peak:.3g}" if f"{rate:.3g}" != f"{peak:.3g}" else ""
        )
        since = self.ctx.state.losses.exploded_since
        removed = self._remove_suspect_checkpoints(step if since is None else since)
        self.ctx.log.emit("diverged", step=step, learningRate=rate, message=why, removedCheckpoints=removed)
        if self.ctx.reporter is not None:
            self.ctx.reporter.close()  # send the pending status before the process exits
        raise DivergedError(f"training diverged at step {step} ({said}): {why}; lower hyperparameters.learningRate")

    def _remove_suspect_checkpoints(self, since: int) -> list[str]:
        """Checkpoints saved at or after the first exploded loss hold diverged weights: never resume from them."""
        if not self.ctx.is_main:
            return []
        removed = []
        for step, path in complete_checkpoints(self.ctx.checkpoints_dir):
            if step >= since:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        best = self.ctx.state.best
        if best is not None and best.step >= since:
            self.ctx.state.best = None
        return removed
