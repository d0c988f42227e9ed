"""Divergence caught early: stop at a NaN/infinite training loss or a sustained explosion, exit 6.

A diverged run never recovers on its own, and a retry diverges again: every further step is a
wasted GPU-minute, and its weights must not become a checkpoint, the best model or the final one.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from typing import Any, Final

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.callbacks import RunContext, complete_checkpoints
from finetune_trainer.errors import DivergedError

EXPLOSION_FACTOR: Final = 10.0
"""A logged training loss above this many times the first logged loss counts as exploded."""
EXPLOSION_LOGS: Final = 3
"""Exploded logs in a row that mean divergence (one spike, e.g. after a thaw or a restart, is forgiven)."""


@dataclass
class DivergenceWatch:
    """Pure rule over the logged training losses; ``observe`` returns why the run diverged, or None."""

    first_loss: float | None = None
    exploded_since: int | None = None
    """Step of the first log of the current run of exploded logs (the weights from there on are suspect)."""
    exploded: int = 0

    def observe(self, step: int, loss: float) -> str | None:
        if not math.isfinite(loss):
            self.exploded_since = step if self.exploded_since is None else self.exploded_since
            return f"the training loss is {loss}"
        if self.first_loss is None:
            self.first_loss = loss
            return None
        if self.first_loss > 0 and loss > EXPLOSION_FACTOR * self.first_loss:
            self.exploded += 1
            self.exploded_since = step if self.exploded_since is None else self.exploded_since
            if self.exploded >= EXPLOSION_LOGS:
                return (
                    f"the training loss {loss:.4g} stayed above {EXPLOSION_FACTOR:g}x the first logged loss "
                    f"{self.first_loss:.4g} for {self.exploded} logs"
                )
            return None
        self.exploded, self.exploded_since = 0, None
        return None


class DivergenceCallback(TrainerCallback):
    """Watches every logged loss; on divergence removes checkpoints written since the loss first exploded and
    raises ``DivergedError`` (exit 6, not retried) before this step is evaluated, saved or published."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.watch = DivergenceWatch()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        if "loss" not in logs:
            return
        step = state.global_step
        why = self.watch.observe(step, float(logs["loss"]))
        if why is None:
            return
        # Raising leaves the Trainer's loop here: this step is neither evaluated nor saved.
        rate = float(logs.get("learning_rate", args.learning_rate))
        peak = float(args.learning_rate)
        # the schedule's rate at this step; the user wrote the peak, so name that too when they differ
        said = f"learning rate {rate:.3g}" + (
            f" on the schedule from hyperparameters.learningRate {peak:.3g}" if f"{rate:.3g}" != f"{peak:.3g}" else ""
        )
        removed = self._remove_suspect_checkpoints(self.watch.exploded_since or step)
        self.ctx.log.emit("diverged", step=step, learningRate=rate, message=why, removedCheckpoints=removed)
        if self.ctx.reporter is not None:
            self.ctx.reporter.close()  # send the pending status before the process exits
        raise DivergedError(f"training diverged at step {step} ({said}): {why}; lower hyperparameters.learningRate")

    def _remove_suspect_checkpoints(self, since: int) -> list[str]:
        """Checkpoints saved at or after the first exploded log hold diverged weights: never resume from them."""
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
