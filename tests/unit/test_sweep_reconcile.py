"""The sweep's pure core: study rebuild, state mapping, samplers, pruning, grid, budget, conditions."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from optuna.trial import TrialState

from finetune_operator.api.job import REASONS
from finetune_operator.api.sweep import PARAMETERS_ANNOTATION, SWEEP_LABEL, TRIAL_INDEX_LABEL, FineTuneSweep
from finetune_operator.reconcile.sweep import FINISHED_ANNOTATIONS, decide_sweep
from finetune_operator.reconcile.sweep_engine import build_study, grid, suggest, to_prune
from finetune_operator.reconcile.trials import ObservedTrial, observe_trial
from tests.manifests import sweep_baseline

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _sweep(**spec: Any) -> FineTuneSweep:
    manifest = sweep_baseline("s")
    manifest["metadata"].update({"namespace": "ns", "uid": "u-1", "generation": 1})
    manifest["spec"]["trialTemplate"]["spec"]["evaluation"] = {
        "strategy": "steps",
        "interval": 10,
        "metrics": ["loss", "accuracy"],
    }
    manifest["spec"].update(spec)
    return FineTuneSweep.model_validate(manifest)


def _trial_body(
    index: int,
    accuracies: list[float] | None = None,
    complete: str | None = None,
    failed: bool = False,
    params: dict[str, Any] | None = None,
    first_step: int = 10,
) -> dict[str, Any]:
    conditions = []
    if complete:
        conditions.append({"type": "Complete", "status": "True", "reason": complete})
    if failed:
        conditions.append({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
    evaluations = [
        {"step": first_step + 10 * n, "metrics": {"accuracy": value, "loss": 1 - value}}
        for n, value in enumerate(accuracies or [])
    ]
    return {
        "metadata": {
            "name": f"s-t{index:03d}",
            "labels": {TRIAL_INDEX_LABEL: str(index), SWEEP_LABEL: "s"},
            "annotations": {
                PARAMETERS_ANNOTATION: json.dumps(
                    params or {"lr": 1e-4, "batch": 16, "decay": 0.0, "freeze": "bottom-4"}
                )
            },
        },
        "status": {
            "phase": "Running" if not (complete or failed) else "Succeeded",
            "conditions": conditions,
            "evaluations": evaluations,
        },
    }


def _observe(sweep: FineTuneSweep, *bodies: dict[str, Any]) -> list[ObservedTrial]:
    observed = [observe_trial(sweep, body) for body in bodies]
    assert all(o is not None for o in observed)
    return [o for o in observed if o is not None]


def test_trial_states_map_onto_optuna_states() -> None:
    sweep = _sweep()
    trials = _observe(
        sweep,
        _trial_body(0, [0.7, 0.8], complete="Succeeded"),
        _trial_body(1, [0.5], complete="Pruned"),
        _trial_body(2, [], failed=True),
        _trial_body(3, [0.6]),
        _trial_body(4, []),
        _trial_body(5, [], complete="Succeeded"),  # ended with no evaluation: counts as failed
    )
    assert [t.phase for t in trials] == ["Succeeded", "Pruned", "Failed", "Running", "Running", "Failed"]
    study = build_study(sweep, trials)
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.RUNNING,
        TrialState.FAIL,
    ]
    assert study.trials[0].value == 0.8  # the trial's best value of the objective, not its last
    assert study.best_trial.user_attrs["name"] == "s-t000"


def test_intermediate_values_are_keyed_by_absolute_evaluation_number() -> None:
    sweep = _sweep()
    full = observe_trial(sweep, _trial_body(0, [0.5, 0.6, 0.7, 0.8]))
    # The bounded history dropped the two oldest evaluations: the remaining ones keep their numbers.
    truncated = observe_trial(sweep, _trial_body(0, [0.7, 0.8], first_step=30))
    assert full is not None and truncated is not None
    assert full.intermediate == {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}
    assert truncated.intermediate == {3: 0.7, 4: 0.8}


def test_a_status_best_covers_dropped_evaluations() -> None:
    sweep = _sweep()
    body = _trial_body(0, [0.7, 0.75], complete="EarlyStopped", first_step=50)
    body["status"]["best"] = {"metric": "accuracy", "value": 0.9, "step": 20, "checkpoint": "file:///o/c-20"}
    trial = observe_trial(sweep, body)
    assert trial is not None and (trial.value, trial.step, trial.checkpoint) == (0.9, 20, "file:///o/c-20")


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_each_sampler_is_deterministic_from_its_seed(algorithm: str) -> None:
    def run(seed: int) -> list[dict[str, Any]]:
        sweep = _sweep(algorithm={"name": algorithm, "seed": seed})
        history = _observe(
            sweep,
            *(
                _trial_body(i, [0.5 + i / 100], complete="Succeeded", params=p)
                for i, p in enumerate(suggest(sweep, [], range(3)))
            ),
        )
        return suggest(sweep, history, range(3, 6))

    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other
    assert len({json.dumps(p, sort_keys=True) for p in first}) == 3  # a rebuilt sampler does not repeat itself


def test_grid_enumerates_the_product_and_completes_with_search_space_exhausted() -> None:
    sweep = _sweep(
        algorithm={"name": "grid"},
        parameters=[
            {"name": "lr", "path": "hyperparameters.learningRate", "float": {"min": 1e-4, "max": 3e-4, "step": 1e-4}},
            {"name": "decay", "path": "hyperparameters.weightDecay", "categorical": {"values": [0.0, 0.1]}},
        ],
        parallelism=10,
        maxTrials=100,
    )
    combinations = grid(sweep.spec)
    assert len(combinations) == 6 and combinations[0] == {"lr": 1e-4, "decay": 0.0}
    decision = decide_sweep(sweep, [], NOW)
    assert len(decision.create) == 6  # never more than the grid, whatever maxTrials says
    done = _observe(sweep, *(_trial_body(i, [0.6], complete="Succeeded", params=p) for i, p in enumerate(combinations)))
    finished = decide_sweep(sweep, done, NOW)
    assert finished.create == []
    complete = next(c for c in finished.status.conditions if c.type == "Complete")
    assert (complete.status, complete.reason) == ("True", "SearchSpaceExhausted")


def test_median_pruning_stops_a_trial_below_the_median_of_finished_ones() -> None:
    sweep = _sweep()  # median, warmupEvaluations 1, startupTrials 3
    finished = [_trial_body(i, [0.7, 0.8, 0.85], complete="Succeeded") for i in range(3)]
    poor, good = _trial_body(3, [0.5, 0.55]), _trial_body(4, [0.75, 0.9])
    trials = _observe(sweep, *finished, poor, good)
    assert to_prune(sweep, trials) == ["s-t003"]
    # Before startupTrials trials finished, nothing is pruned.
    assert to_prune(sweep, _observe(sweep, *finished[:2], poor)) == []
    # A trial already asked to stop is not asked again.
    asked = copy.deepcopy(poor)
    asked["status"]["stopRequest"] = {"reason": "Pruned"}
    assert to_prune(sweep, _observe(sweep, *finished, asked)) == []


def test_warmup_evaluations_protect_young_trials() -> None:
    sweep = _sweep(pruning={"name": "median", "warmupEvaluations": 3, "startupTrials": 1})
    trials = _observe(sweep, _trial_body(0, [0.8, 0.8, 0.8], complete="Succeeded"), _trial_body(1, [0.1, 0.1]))
    assert to_prune(sweep, trials) == []
    trials = _observe(sweep, _trial_body(0, [0.8, 0.8, 0.8], complete="Succeeded"), _trial_body(1, [0.1, 0.1, 0.1]))
    assert to_prune(sweep, trials) == ["s-t001"]


@pytest.mark.parametrize("pruner", ["successive-halving", "hyperband"])
def test_other_pruners_decide_from_hand_made_histories(pruner: str) -> None:
    sweep = _sweep(pruning={"name": pruner, "warmupEvaluations": 1, "startupTrials": 0})
    finished = [_trial_body(i, [0.8 + i / 100] * 9, complete="Succeeded") for i in range(6)]
    trials = _observe(sweep, *finished, _trial_body(6, [0.1] * 9), _trial_body(7, [0.99] * 9))
    pruned = to_prune(sweep, trials)
    assert "s-t006" in pruned and "s-t007" not in pruned
    assert to_prune(sweep, trials) == pruned  # deterministic


def test_trials_are_named_labelled_annotated_owned_and_written_apart() -> None:
    sweep = _sweep(parallelism=3)
    decision = decide_sweep(sweep, [], NOW)
    names = [m["metadata"]["name"] for m in decision.create]
    assert names == ["s-t000", "s-t001", "s-t002"]
    first = decision.create[0]
    assert first["metadata"]["labels"][SWEEP_LABEL] == "s" and first["metadata"]["labels"][TRIAL_INDEX_LABEL] == "0"
    assert first["metadata"]["labels"]["team"] == "ml"
    assert first["metadata"]["ownerReferences"][0]["kind"] == "FineTuneSweep"
    assert first["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert first["spec"]["output"]["location"] == "file:///out/valid/s-t000"
    parameters = json.loads(first["metadata"]["annotations"][PARAMETERS_ANNOTATION])
    assert first["spec"]["hyperparameters"]["learningRate"] == parameters["lr"]
    # Deciding again from the same (empty) history gives the same trials: a restart duplicates nothing.
    assert decide_sweep(sweep, [], NOW).create == decision.create


def test_parallelism_counts_every_created_and_unfinished_trial() -> None:
    sweep = _sweep(parallelism=3, maxTrials=12)
    trials = _observe(sweep, _trial_body(0, [0.6], complete="Succeeded"), _trial_body(1, []), _trial_body(2, [0.6]))
    trials[1] = ObservedTrial(**{**trials[1].__dict__, "phase": "Pending"})
    decision = decide_sweep(sweep, trials, NOW)
    assert [m["metadata"]["name"] for m in decision.create] == ["s-t003"]
    assert decision.status.trial_counts.model_dump() == {
        "total": 3,
        "running": 2,
        "succeeded": 1,
        "pruned": 0,
        "stopped": 0,
        "failed": 0,
    }


def test_max_trials_completes_and_raising_it_resumes() -> None:
    sweep = _sweep(maxTrials=2)
    trials = _observe(sweep, _trial_body(0, [0.6], complete="Succeeded"), _trial_body(1, [0.7], complete="Succeeded"))
    done = decide_sweep(sweep, trials, NOW)
    assert done.create == [] and done.status.phase == "Complete"
    assert done.status.best_trial is not None and done.status.best_trial.name == "s-t001"
    assert [(c.type, c.status, c.reason) for c in done.status.conditions if c.status == "True"] == [
        ("Complete", "True", "MaxTrialsReached"),
        ("Ready", "True", "MaxTrialsReached"),
    ]
    raised = _sweep(maxTrials=4, parallelism=4)
    raised.metadata.generation = 2  # the edit
    raised.status = done.status
    resumed = decide_sweep(raised, trials, NOW)
    assert [m["metadata"]["name"] for m in resumed.create] == ["s-t002", "s-t003"]
    assert resumed.status.phase == "Running"
    assert next(c for c in resumed.status.conditions if c.type == "Complete").status == "False"


def test_max_failed_trials_fails_the_sweep() -> None:
    sweep = _sweep(maxFailedTrials=2, parallelism=3)
    trials = _observe(sweep, _trial_body(0, [], failed=True), _trial_body(1, [], failed=True), _trial_body(2, [0.5]))
    decision = decide_sweep(sweep, trials, NOW)
    assert decision.create == [] and decision.status.phase == "Failed"
    failed = next(c for c in decision.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "TooManyFailedTrials")
    assert next(c for c in decision.status.conditions if c.type == "Stalled").status == "True"
    assert [e.reason for e in decision.events] == ["TooManyFailedTrials"]


def test_the_goal_completes_the_sweep() -> None:
    sweep = _sweep()  # goal 0.95
    trials = _observe(sweep, _trial_body(0, [0.96], complete="Succeeded"), _trial_body(1, [0.5]))
    decision = decide_sweep(sweep, trials, NOW)
    assert decision.create == []
    assert next(c for c in decision.status.conditions if c.type == "Complete").reason == "GoalReached"
    assert decision.stop == ["s-t001"], "a trial still running when the goal is reached must be asked to stop"


def test_a_finished_sweep_stops_its_running_trials_once() -> None:
    sweep = _sweep(maxFailedTrials=2, parallelism=3)
    running, stopping = _trial_body(2, [0.5]), _trial_body(3, [0.4])
    stopping["metadata"]["annotations"].update(FINISHED_ANNOTATIONS)
    failed = (_trial_body(i, [], failed=True) for i in range(2))
    decision = decide_sweep(sweep, _observe(sweep, *failed, running, stopping), NOW)
    assert decision.status.phase == "Failed"
    assert decision.stop == ["s-t002"]  # s-t003 was already asked: no second patch


def test_suspend_creates_nothing() -> None:
    decision = decide_sweep(_sweep(suspend=True), [], NOW)
    assert decision.create == [] and decision.status.phase == "Suspended"


def test_every_reason_the_sweep_writes_is_in_the_table() -> None:
    sweep = _sweep(maxTrials=1)
    written = set()
    for trials in (
        [],
        _observe(sweep, _trial_body(0, [0.6], complete="Succeeded")),
        _observe(sweep, *(_trial_body(i, [], failed=True) for i in range(3))),
    ):
        written |= {c.reason for c in decide_sweep(sweep, trials, NOW).status.conditions}
    written |= {"Pruned", "GoalReached", "SearchSpaceExhausted", "InvalidSpec"}
    assert written - set(REASONS) == set()


@pytest.mark.parametrize(("pruner", "builds"), [("median", 1), ("successive-halving", 1), ("hyperband", 2)])
def test_a_reconcile_that_prunes_and_creates_rebuilds_the_study_once(
    pruner: str, builds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebuilding the study is a reconcile's main cost; pruning and suggesting share one (hyperband also
    needs a probe study to place trials in its brackets)."""
    import finetune_operator.reconcile.sweep_engine as core

    sweep = _sweep(pruning={"name": pruner, "warmupEvaluations": 1, "startupTrials": 0}, parallelism=3, maxTrials=10)
    finished = [_trial_body(i, [0.7, 0.8, 0.85], complete="Succeeded") for i in range(3)]
    trials = _observe(sweep, *finished, _trial_body(3, [0.5, 0.55]))
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return build_study(*args, **kwargs)

    monkeypatch.setattr(core, "build_study", counted)
    decision = decide_sweep(sweep, trials, NOW)
    assert [m["metadata"]["name"] for m in decision.create] == ["s-t004", "s-t005"]
    assert len(calls) == builds


def _stopped_by_the_sweep(index: int, reason: str, accuracies: list[float] | None = None) -> dict[str, Any]:
    """A trial its sweep asked to stop, ended as the FineTuneJob reconciler ends it."""
    body = _trial_body(index, accuracies or [], complete="Stopped" if reason == "SweepFinished" else reason)
    body["metadata"]["annotations"].update({"finetune.dev/stop-requested": "true", "finetune.dev/stop-reason": reason})
    body["status"]["stopRequest"] = {"reason": reason, "message": "", "requestedTime": "2026-01-01T00:00:00Z"}
    return body


def test_a_sweep_that_reaches_its_goal_stays_complete_when_its_stopped_trials_end() -> None:
    """Issue 23 item 3: parallelism 4, maxFailedTrials 3, trial 0 reaches the goal; the three trials it
    stops end Complete/Stopped before their first evaluation. They are not failures."""
    sweep = _sweep(parallelism=4, maxFailedTrials=3)  # goal 0.95
    reached = _trial_body(0, [0.96], complete="Succeeded")
    first = decide_sweep(sweep, _observe(sweep, reached, *(_trial_body(i, []) for i in (1, 2, 3))), NOW)
    assert first.status.phase == "Complete" and first.stop == ["s-t001", "s-t002", "s-t003"]
    sweep.status = first.status
    ended = _observe(sweep, reached, *(_stopped_by_the_sweep(i, "SweepFinished") for i in (1, 2, 3)))
    assert [t.phase for t in ended] == ["Succeeded", "Stopped", "Stopped", "Stopped"]
    after = decide_sweep(sweep, ended, NOW)
    assert after.status.phase == "Complete", after.status.message
    assert [(c.type, c.reason) for c in after.status.conditions if c.status == "True"] == [
        ("Complete", "GoalReached"),
        ("Ready", "GoalReached"),
    ]
    assert after.status.trial_counts.failed == 0 and after.status.trial_counts.stopped == 3
    assert after.events == [] and after.create == []
    assert after.status.best_trial is not None and after.status.best_trial.name == "s-t000"


def test_a_finished_sweep_stays_finished_until_its_spec_changes() -> None:
    sweep = _sweep(parallelism=4, maxFailedTrials=2)
    reached = _trial_body(0, [0.96], complete="Succeeded")
    sweep.status = decide_sweep(sweep, _observe(sweep, reached, _trial_body(1, [0.5])), NOW).status
    # The stopped trial fails on its way out, and so does a trial the user stopped: still Complete.
    failing = [_trial_body(1, [0.5], failed=True), _trial_body(2, [], failed=True)]
    after = decide_sweep(sweep, _observe(sweep, reached, *failing), NOW)
    assert after.status.phase == "Complete" and after.events == []


def test_the_goal_is_judged_before_the_failures() -> None:
    sweep = _sweep(parallelism=4, maxFailedTrials=2)
    trials = _observe(
        sweep, _trial_body(0, [0.96], complete="Succeeded"), *(_trial_body(i, [], failed=True) for i in (1, 2))
    )
    assert decide_sweep(sweep, trials, NOW).status.phase == "Complete"


def test_a_pruned_trial_that_overran_its_grace_period_is_pruned_not_succeeded() -> None:
    """The FineTuneJob reconciler ends it Complete/StopEnforced (phase Pruned): it is Pruned, never best."""
    sweep = _sweep(pruning={"name": "none"})
    enforced = _stopped_by_the_sweep(1, "Pruned", [0.9])
    enforced["status"]["conditions"] = [{"type": "Complete", "status": "True", "reason": "StopEnforced"}]
    enforced["status"]["phase"] = "Pruned"
    trials = _observe(sweep, _trial_body(0, [0.6], complete="Succeeded"), enforced)
    assert [t.phase for t in trials] == ["Succeeded", "Pruned"]
    decision = decide_sweep(sweep, trials, NOW)
    assert decision.status.best_trial is not None and decision.status.best_trial.name == "s-t000"
    assert decision.status.trial_counts.pruned == 1 and decision.status.trial_counts.succeeded == 1


def test_stopped_trials_rebuild_as_pruned_optuna_trials() -> None:
    sweep = _sweep(algorithm={"name": "tpe", "seed": 1})
    trials = _observe(
        sweep,
        _trial_body(0, [0.6], complete="Succeeded"),
        _stopped_by_the_sweep(1, "SweepFinished"),
        _stopped_by_the_sweep(2, "SweepFinished", [0.7]),
    )
    assert [t.state for t in build_study(sweep, trials).trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.PRUNED,
    ]
    assert len(suggest(sweep, trials, [3])) == 1  # a resumed sweep still asks


def test_rungs_compare_trials_on_examples_seen_whatever_their_batch_size() -> None:
    """Issue 23 item 11: with steps evaluation, a trial with twice the template's batch (16) has seen at its
    step 10 what a template-batch trial has seen at step 20: both are at key 2."""
    sweep = _sweep()  # evaluation every 10 steps
    double = _trial_body(1, [0.5, 0.6])  # steps 10, 20
    double["spec"] = {"hyperparameters": {"batchSize": 32}}
    accumulated = _trial_body(2, [0.5])
    accumulated["spec"] = {"hyperparameters": {"batchSize": 8, "gradientAccumulationSteps": 2}, "resources": {}}
    plain, twice, same = _observe(sweep, _trial_body(0, [0.5, 0.6]), double, accumulated)
    assert plain.intermediate == {1: 0.5, 2: 0.6}
    assert twice.intermediate == {2: 0.5, 4: 0.6}
    assert same.intermediate == {1: 0.5}
    # Median pruning at key 2 compares the double-batch trial's first evaluation with the others' second.
    median = _sweep(pruning={"name": "median", "warmupEvaluations": 1, "startupTrials": 1})
    finished = _trial_body(0, [0.5, 0.9, 0.9], complete="Succeeded")
    double["status"]["evaluations"].pop()
    trials = _observe(median, finished, double)
    assert to_prune(median, trials) == ["s-t001"]  # 0.5 after 2 units of data, where the finished one had 0.9


def test_successive_halving_judges_a_rung_once_on_the_value_the_trial_had_there() -> None:
    """Issue 23 item 11: a running trial passed rung 0 (evaluation 1) at the top; its later, poorer values
    never re-judge rung 0, and its verdict is recorded so that the next reconcile keeps it."""
    sweep = _sweep(pruning={"name": "successive-halving", "warmupEvaluations": 1, "startupTrials": 0})
    finished = [_trial_body(i, [0.6 + i / 100, 0.7, 0.75], complete="Succeeded") for i in range(6)]
    climber = _trial_body(6, [0.9, 0.5])  # rung 0 at evaluation 1 (0.9, the best); evaluation 2 is no rung
    decision = decide_sweep(sweep, _observe(sweep, *finished, climber), NOW)
    assert decision.prune == []
    assert decision.rungs == {"s-t006": {"completed_rung_0": 0.9}}
    # Next reconcile: the verdict is on the trial; better trials have finished since, at rung 0 too.
    recorded = copy.deepcopy(climber)
    recorded["metadata"]["annotations"]["finetune.dev/rungs"] = json.dumps(decision.rungs["s-t006"])
    better = [_trial_body(7 + i, [0.92, 0.93, 0.94], complete="Succeeded") for i in range(4)]  # goal: 0.95
    again = decide_sweep(sweep, _observe(sweep, *finished, *better, recorded), NOW)
    assert again.prune == [] and again.rungs == {}  # rung 0 stays judged; rung 1 (evaluation 3) not reached
    # At evaluation 3 (rung 1) it is judged again, on its value there.
    recorded["status"]["evaluations"].append({"step": 30, "metrics": {"accuracy": 0.4, "loss": 0.6}})
    third = decide_sweep(sweep, _observe(sweep, *finished, *better, recorded), NOW)
    assert third.prune == ["s-t006"]
    assert third.rungs == {"s-t006": {"completed_rung_0": 0.9, "completed_rung_1": 0.4}}


def test_hyperband_sizes_its_brackets_once() -> None:
    """Issue 23 item 11: the "auto" max resource comes from the first trial that ran to its end and is kept
    in status, so a longer trial finishing later does not move trials between brackets."""
    import finetune_operator.reconcile.sweep_engine as core

    sweep = _sweep(pruning={"name": "hyperband", "warmupEvaluations": 1, "startupTrials": 0}, parallelism=1)
    short = _trial_body(0, [0.6, 0.7, 0.75], complete="Succeeded")
    running = [_trial_body(i, [0.6]) for i in range(1, 9)]

    def brackets(trials: list[ObservedTrial]) -> list[int]:
        study = core.rebuild_study(sweep, trials)
        pruner = study.pruner
        pruner._try_initialization(study)  # type: ignore[attr-defined]
        return [pruner._get_bracket_id(study, t) for t in study.trials]  # type: ignore[attr-defined]

    first = decide_sweep(sweep, _observe(sweep, short, *running), NOW)
    assert first.status.hyperband_max_resource == 4  # 3 evaluations, plus one, as Optuna's "auto"
    before = brackets(_observe(sweep, short, *running))
    sweep.status = first.status
    long = _trial_body(9, [0.6] * 27, complete="Succeeded")
    later = decide_sweep(sweep, _observe(sweep, short, *running, long), NOW)
    assert later.status.hyperband_max_resource == 4
    assert brackets(_observe(sweep, short, *running, long))[:9] == before


def test_sweep_health_comes_from_the_shared_derivation() -> None:
    """Ready / Reconciling / Stalled of a sweep in each state, as kstatus reads them (reconcile/health.py)."""
    from finetune_operator.reconcile.sweep import invalid_sweep

    def health(decision: Any) -> tuple[str, str, str]:
        found = {c.type: c.status for c in decision.status.conditions}
        return found["Ready"], found["Reconciling"], found["Stalled"]

    sweep, suspended = _sweep(), _sweep(suspend=True)
    running = _observe(sweep, _trial_body(0, [0.5]))
    idle = _observe(sweep, _trial_body(0, [0.5], complete="Succeeded"))
    failed = _observe(sweep, *(_trial_body(i, [], failed=True) for i in range(3)))
    assert health(decide_sweep(sweep, running, NOW)) == ("False", "True", "False")
    assert health(decide_sweep(suspended, running, NOW)) == ("False", "True", "False")  # trials still running
    assert health(decide_sweep(suspended, idle, NOW)) == ("True", "False", "False")
    assert health(decide_sweep(_sweep(maxTrials=1), idle, NOW)) == ("True", "False", "False")
    assert health(decide_sweep(sweep, failed, NOW)) == ("False", "False", "True")
    assert health(invalid_sweep(sweep.status, "bad", 1, NOW)) == ("False", "False", "True")


def test_an_invalid_spec_verdict_is_not_kept_once_the_spec_reads() -> None:
    """InvalidSpec may come from an older operator: a sweep this one reads runs, at the same generation."""
    from finetune_operator.reconcile.sweep import invalid_sweep

    sweep = _sweep()
    sweep.status = invalid_sweep(sweep.status, "an older operator could not read it", 1, NOW).status
    assert decide_sweep(sweep, [], NOW).status.phase == "Running"


def test_the_operator_starts_without_optuna_and_loads_it_with_the_first_sweep() -> None:
    """Optuna and numpy are about 33 MB of the operator's memory: an operator that runs only FineTuneJobs never
    loads them (the operator_scale benchmark's RSS counts on it); a sweep's first decision does."""
    probe = (
        "import sys, finetune_operator.controller.cli\n"
        "print(sorted(m for m in ('optuna', 'numpy') if m in sys.modules))\n"
        "from finetune_operator.reconcile import sweep_engine\n"
        "print(sorted(m for m in ('optuna', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "['numpy', 'optuna']"]
