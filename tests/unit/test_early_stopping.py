"""The shared early-stopping rule."""

from __future__ import annotations

import pytest

from finetune_trainer.early_stopping import EarlyStoppingState, Evaluated, explain, observe, observe_all
from finetune_trainer.spec import EarlyStopping

LOSSES = [1.0, 0.8, 0.79, 0.85, 0.9, 0.7]


def run(rule: EarlyStopping, values: list[float]) -> list[EarlyStoppingState]:
    state = EarlyStoppingState()
    states = []
    for i, value in enumerate(values, start=1):
        state = observe(rule, state, Evaluated(step=10 * i, value=value))
        states.append(state)
    return states


def test_fires_after_patience_evaluations_without_improvement() -> None:
    states = run(EarlyStopping(metric="loss", patience=2), LOSSES)
    assert [s.triggered for s in states] == [False, False, False, False, True, True]
    assert states[4].best_value == 0.79
    assert states[4].best_step == 30
    assert states[-1] == states[4], "once triggered, later evaluations change nothing"


def test_min_delta_requires_a_real_improvement() -> None:
    states = run(EarlyStopping(metric="loss", patience=2, min_delta=0.05), LOSSES)
    assert states[2].best_value == 0.8  # 0.79 is not better by more than 0.05
    assert states[3].triggered


@pytest.mark.parametrize(
    ("metric", "mode", "expected"), [("accuracy", None, "max"), ("perplexity", None, "min"), ("loss", "max", "max")]
)
def test_mode_follows_the_metric_unless_set(metric: str, mode: str | None, expected: str) -> None:
    assert EarlyStopping.model_validate({"metric": metric, "mode": mode}).effective_mode == expected


def test_max_mode() -> None:
    states = run(EarlyStopping(metric="accuracy", patience=1), [0.5, 0.6, 0.6])
    assert states[1].best_value == 0.6
    assert states[2].triggered


def test_replaying_seen_evaluations_is_idempotent() -> None:
    rule = EarlyStopping(metric="loss", patience=3)
    evaluations = [Evaluated(10 * i, v) for i, v in enumerate(LOSSES, start=1)]
    once = observe_all(rule, EarlyStoppingState(), evaluations[:4])
    again = observe_all(rule, once, evaluations[:4])
    assert again == once
    resumed = observe_all(rule, once, evaluations)
    assert resumed == observe_all(rule, EarlyStoppingState(), evaluations)


def test_state_survives_serialisation() -> None:
    state = run(EarlyStopping(metric="loss", patience=5), LOSSES[:4])[-1]
    wire = state.model_dump(by_alias=True)
    assert wire["evaluationsWithoutImprovement"] == 1
    assert EarlyStoppingState.model_validate(wire) == state


def test_explain_names_best_and_patience() -> None:
    rule = EarlyStopping(metric="loss", patience=2)
    text = explain(rule, run(rule, LOSSES)[-1])
    assert "best 0.79 at step 30" in text
    assert "2 evaluations" in text
