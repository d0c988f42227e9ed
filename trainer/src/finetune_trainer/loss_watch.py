"""The divergence rule over every loss the trainer sees (pure and torch-free; its state rides in each checkpoint).

Signals: each optimizer step's training loss (logged or not) and each evaluation loss. References: the
first step's loss, the first evaluation's loss, and *chance*, the loss of predicting the uniform
distribution (ln of the number of classes; ln of the vocabulary for a causal LM), known before training.

- A non-finite loss (step or evaluation) is divergence at once.
- A step loss is *exploded* above ``EXPLOSION_FACTOR`` x max(first step's loss, chance): far above both where
  training started and a model that knows nothing. ``EXPLODED_STEPS`` in a row are divergence (a spike on one
  hard batch, or after a thaw, is forgiven). Chance bounds the reference from below: a first loss that is
  tiny (an already fitted model) cannot make an ordinary batch look exploded.
- An evaluation loss above ``EXPLOSION_FACTOR`` x max(first evaluation's loss, chance) is divergence when the
  training loss since the previous evaluation is no better than chance either. A run that merely overfits
  (its evaluation loss can grow far above chance on noisy labels) fits its training batches well below
  chance; a diverged one fits nothing. One evaluation is enough: it averages the whole validation set, so a
  6-step run that evaluates twice is judged too.

The references are persisted (``run_state.json``): after a resume, a late, small loss never becomes the
reference that healthy batches are measured against.
"""

from __future__ import annotations

import math
from typing import Final

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

EXPLOSION_FACTOR: Final = 10.0
"""How far above its reference a loss must be to count as exploded."""
EXPLODED_STEPS: Final = 3
"""Exploded step losses in a row that mean divergence."""


def chance_loss(task: str, num_labels: int | None, vocab_size: int | None) -> float | None:
    """Cross-entropy of the uniform prediction: ln(classes) for classification, ln(vocabulary) for a causal LM."""
    classes = vocab_size if task == "causal-lm" else num_labels
    return math.log(classes) if classes is not None and classes >= 2 else None


class LossWatch(BaseModel):
    """What the rule remembers; ``observe_step`` and ``observe_evaluation`` return why the run diverged, or None."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    first_loss: float | None = None
    """The first step's training loss (before any update)."""
    first_evaluation_loss: float | None = None
    exploded: int = 0
    """Exploded step losses in a row so far."""
    exploded_since: int | None = None
    """The first checkpoint step whose weights gave an exploded loss (checkpoints from there on are suspect)."""
    window_loss: float = 0.0
    """Sum of the step losses since the previous evaluation."""
    window_steps: int = 0

    def observe_step(self, step: int, loss: float, chance: float | None) -> str | None:
        """The loss of optimizer step ``step``, computed on the weights of step ``step - 1``."""
        suspect = max(step - 1, 0)
        if not math.isfinite(loss):
            self.exploded_since = suspect if self.exploded_since is None else self.exploded_since
            return f"the training loss is {loss}"
        self.window_loss += loss
        self.window_steps += 1
        if self.first_loss is None:
            self.first_loss = loss
            return None
        limit = EXPLOSION_FACTOR * max(self.first_loss, chance or 0.0)
        if limit <= 0 or loss <= limit:
            self.exploded, self.exploded_since = 0, None
            return None
        self.exploded += 1
        self.exploded_since = suspect if self.exploded_since is None else self.exploded_since
        if self.exploded < EXPLODED_STEPS:
            return None
        return (
            f"the training loss was above {EXPLOSION_FACTOR:g}x {_reference(self.first_loss, chance, 'first step')} "
            f"for {self.exploded} steps in a row (last {loss:.4g})"
        )

    def observe_evaluation(self, step: int, loss: float, chance: float | None) -> str | None:
        """The evaluation loss at ``step`` (judged before it is recorded, published or saved)."""
        if not math.isfinite(loss):
            self.exploded_since = step if self.exploded_since is None else min(self.exploded_since, step)
            return f"the evaluation loss is {loss}"
        first = self.first_evaluation_loss
        if first is None:
            self.first_evaluation_loss = loss
        limit = EXPLOSION_FACTOR * max(first or 0.0, chance or 0.0)
        train = self.window_mean()
        floor = chance if chance is not None else self.first_loss
        if limit <= 0 or loss <= limit or train is None or floor is None or train <= floor:
            return None
        self.exploded_since = step if self.exploded_since is None else min(self.exploded_since, step)
        fit = "chance" if chance is not None else "the first step's loss"
        return (
            f"the evaluation loss {loss:.4g} is above {EXPLOSION_FACTOR:g}x "
            f"{_reference(first, chance, 'first evaluation')}, and the training loss since the previous "
            f"evaluation ({train:.4g}) is no better than {fit}"
        )

    def window_mean(self) -> float | None:
        """The mean step loss since the previous evaluation (None before any step)."""
        return self.window_loss / self.window_steps if self.window_steps else None

    def close_window(self) -> float | None:
        """The window's mean, for the evaluation that ends it; the next window starts empty."""
        mean = self.window_mean()
        self.window_loss, self.window_steps = 0.0, 0
        return mean


def _reference(first: float | None, chance: float | None, what: str) -> str:
    """Names the larger reference, the one the limit came from."""
    if chance is not None and (first is None or chance >= first):
        return f"the loss of a chance predictor ({chance:.4g})"
    return f"the {what}'s loss ({first:.4g})"
