"""The early-stopping rule: one pure function shared by the trainer and the operator.

The trainer applies it to stop promptly; the operator applies it to the evaluations the
trainer reports, so a trainer image that ignores the rule is still stopped. The state is a
plain serialisable value (it lives in checkpoints and in the FineTuneJob status), so it
survives restarts — unlike an in-memory callback counter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from finetune_trainer.spec import EarlyStopping


class EarlyStoppingState(BaseModel):
    """What the rule remembers between evaluations."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    best_value: float | None = None
    best_step: int | None = None
    evaluations_without_improvement: int = 0
    last_step: int | None = None
    """Step of the last evaluation applied; evaluations at or before it are ignored (idempotent replay)."""
    triggered: bool = False


@dataclass(frozen=True)
class Evaluated:
    """One evaluation result as the rule sees it."""

    step: int
    value: float


def improves(rule: EarlyStopping, value: float, best: float | None) -> bool:
    """True when ``value`` beats ``best`` by more than ``min_delta`` in the rule's direction."""
    if best is None:
        return True
    if rule.effective_mode == "min":
        return value < best - rule.min_delta
    return value > best + rule.min_delta


def observe(rule: EarlyStopping, state: EarlyStoppingState, evaluation: Evaluated) -> EarlyStoppingState:
    """Apply one evaluation. Re-applying an evaluation already seen changes nothing."""
    if state.triggered or (state.last_step is not None and evaluation.step <= state.last_step):
        return state
    if improves(rule, evaluation.value, state.best_value):
        return EarlyStoppingState(
            best_value=evaluation.value,
            best_step=evaluation.step,
            evaluations_without_improvement=0,
            last_step=evaluation.step,
            triggered=False,
        )
    misses = state.evaluations_without_improvement + 1
    return EarlyStoppingState(
        best_value=state.best_value,
        best_step=state.best_step,
        evaluations_without_improvement=misses,
        last_step=evaluation.step,
        triggered=misses >= rule.patience,
    )


def observe_all(rule: EarlyStopping, state: EarlyStoppingState, evaluations: Iterable[Evaluated]) -> EarlyStoppingState:
    """Apply evaluations in step order; those already seen are skipped."""
    for evaluation in sorted(evaluations, key=lambda e: e.step):
        state = observe(rule, state, evaluation)
    return state


def explain(rule: EarlyStopping, state: EarlyStoppingState) -> str:
    """A one-line human reason, for conditions, events and logs: each says it is early stopping (a reason
    EarlyStopped, a label), so the text does not repeat it."""
    if not state.triggered:
        return (
            f"{rule.metric} best {state.best_value} at step {state.best_step}; "
            f"{state.evaluations_without_improvement}/{rule.patience} evaluations without improvement"
        )
    return (
        f"{rule.metric} did not improve by more than {rule.min_delta} "
        f"({rule.effective_mode}) for {rule.patience} evaluations; "
        f"best {state.best_value:.6g} at step {state.best_step}"
    )
