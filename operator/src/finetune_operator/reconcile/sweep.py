"""A FineTuneSweep and its observed trials -> trials to create, trials to prune, the sweep's status.

Pure (no I/O, no clock): the sweep's state machine. Trials are read by ``reconcile.trials`` (shared
with the CLI), the next parameters and the pruning verdicts come from ``reconcile.sweep_engine`` (Optuna,
rebuilt from the trials), and the health conditions from ``reconcile.health``. Every choice is
deterministic given the trials, so an operator killed between deciding and creating makes the same
choice again, and a trial that already exists (409) is simply there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator.api.job import (
    API_VERSION,
    KIND,
    OPERATOR_NAMESPACE,
    PRUNED,
    STOP_ANNOTATION,
    STOP_REASON_ANNOTATION,
    SWEEP_FINISHED,
    Condition,
    ConditionType,
)
from finetune_operator.api.sweep import (
    MAX_TRIALS,
    PARAMETERS_ANNOTATION,
    SWEEP_KIND,
    SWEEP_LABEL,
    TRIAL_INDEX_LABEL,
    BestTrial,
    FineTuneSweep,
    FineTuneSweepStatus,
    TrialCounts,
    TrialSummary,
    trial_spec,
)
from finetune_operator.reconcile.children import MANAGED_BY, MANAGED_BY_LABEL, bounded_name, job_label_value
from finetune_operator.reconcile.health import derive_health
from finetune_operator.reconcile.status import Event, copy_status, operator_namespace_refusal, set_condition
from finetune_operator.reconcile.trials import ObservedTrial

Manifest = dict[str, Any]

GOAL_REACHED = "GoalReached"
MAX_TRIALS_REACHED = "MaxTrialsReached"
SEARCH_SPACE_EXHAUSTED = "SearchSpaceExhausted"
TOO_MANY_FAILED_TRIALS = "TooManyFailedTrials"
TRIALS_RUNNING = "TrialsRunning"
INVALID_SPEC = "InvalidSpec"


@dataclass
class SweepDecision:
    status: FineTuneSweepStatus
    create: list[Manifest] = field(default_factory=list)
    """Trial FineTuneJobs to create, in index order (409 means already created)."""
    prune: list[str] = field(default_factory=list)
    """Running trials to ask to stop with reason Pruned."""
    stop: list[str] = field(default_factory=list)
    """Trials still running when the sweep ended (goal reached, too many failed): ask them to stop."""
    rungs: dict[str, dict[str, float]] = field(default_factory=dict)
    """New successive-halving verdicts to record on trials (``RUNGS_ANNOTATION``), by trial name."""
    events: list[Event] = field(default_factory=list)


PRUNE_ANNOTATIONS = {STOP_ANNOTATION: "true", STOP_REASON_ANNOTATION: PRUNED}
"""What a sweep writes on a trial to prune it: the stop-request path of every FineTuneJob, reason Pruned."""
FINISHED_ANNOTATIONS = {STOP_ANNOTATION: "true", STOP_REASON_ANNOTATION: SWEEP_FINISHED}
"""What a finished sweep writes on its still-running trials: the same stop path, reason SweepFinished."""


def trial_name(sweep_name: str, index: int) -> str:
    """``<sweep>-t<index>``, within the 253 characters of an object name for any sweep name and index."""
    suffix = f"-t{index:03d}"
    return bounded_name(sweep_name, 253 - len(f"-t{MAX_TRIALS - 1:03d}")) + suffix


def _counts(trials: Sequence[ObservedTrial]) -> TrialCounts:
    return TrialCounts(
        total=len(trials),
        running=sum(not t.finished for t in trials),
        succeeded=sum(t.phase == "Succeeded" for t in trials),
        pruned=sum(t.phase == "Pruned" for t in trials),
        stopped=sum(t.phase == "Stopped" for t in trials),
        failed=sum(t.phase == "Failed" for t in trials),
    )


def _best(sweep: FineTuneSweep, trials: Sequence[ObservedTrial]) -> ObservedTrial | None:
    scored = [t for t in trials if t.phase == "Succeeded" and t.value is not None]
    if not scored:
        return None
    sign = 1.0 if sweep.spec.objective.direction == "maximize" else -1.0
    return max(scored, key=lambda t: (sign * (t.value or 0.0), -t.index))


def _goal_reached(sweep: FineTuneSweep, best: ObservedTrial | None) -> bool:
    goal = sweep.spec.objective.goal
    if goal is None or best is None or best.value is None:
        return False
    return best.value >= goal if sweep.spec.objective.direction == "maximize" else best.value <= goal


def trial_manifest(sweep: FineTuneSweep, index: int, parameters: dict[str, Any]) -> Manifest:
    """The FineTuneJob of one trial: owned by the sweep, labelled, annotated with its parameters."""
    name = trial_name(sweep.metadata.name, index)
    template = sweep.spec.trial_template.metadata
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": sweep.metadata.namespace,
            "labels": {
                **template.labels,
                MANAGED_BY_LABEL: MANAGED_BY,
                SWEEP_LABEL: job_label_value(sweep.metadata.name),
                TRIAL_INDEX_LABEL: str(index),
            },
            "annotations": {**template.annotations, PARAMETERS_ANNOTATION: json.dumps(parameters, sort_keys=True)},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": SWEEP_KIND,
                    "name": sweep.metadata.name,
                    "uid": sweep.metadata.uid or "",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": trial_spec(sweep.spec, parameters, name),
    }


def _summary(trial: ObservedTrial) -> TrialSummary:
    return TrialSummary(name=trial.name, phase=trial.phase, value=trial.value, parameters=trial.parameters)


def _ended(status: FineTuneSweepStatus, generation: int | None) -> Condition | None:
    """The Complete or Failed condition the sweep already ended with for this generation, if any (not
    InvalidSpec: a spec this operator now reads was judged by another)."""
    if status.observed_generation != generation:
        return None
    ended = (c for c in status.conditions if c.type in ("Complete", "Failed") and c.status == "True")
    return next((c for c in ended if c.reason != INVALID_SPEC), None)


def decide_sweep(sweep: FineTuneSweep, trials: Sequence[ObservedTrial], now: datetime) -> SweepDecision:
    """The sweep's next step: which trials to create and prune, and its status."""
    # Optuna (with numpy, about 33 MB of the operator's memory) loads with the first sweep: an operator that
    # runs only FineTuneJobs never needs it.
    from finetune_operator.reconcile import sweep_engine as engine  # noqa: PLC0415

    spec = sweep.spec
    generation = sweep.metadata.generation
    status = copy_status(sweep.status)
    status.observed_generation = generation
    ordered = sorted(trials, key=lambda t: t.index)
    counts = _counts(ordered)
    best = _best(sweep, ordered)
    status.trial_counts = counts
    status.trials = [_summary(t) for t in ordered][-MAX_TRIALS:]
    status.best_trial = (
        BestTrial(
            name=best.name, value=best.value, step=best.step, checkpoint=best.checkpoint, parameters=best.parameters
        )
        if best is not None and best.value is not None
        else None
    )
    decision = SweepDecision(status=status)
    space = len(engine.grid(spec)) if spec.algorithm.name == "grid" else None
    next_index = max((t.index for t in ordered), default=-1) + 1

    def finish(type_: ConditionType, reason: str, message: str) -> SweepDecision:
        failed = type_ == "Failed"
        became = set_condition(status, "Failed" if failed else "Complete", True, reason, message, now, generation)
        set_condition(status, "Complete" if failed else "Failed", False, reason, "", now, generation)
        set_condition(status, "Suspended", False, reason, "", now, generation)
        status.phase = "Failed" if failed else "Complete"
        status.message = message
        derive_health(status, generation, now)
        decision.stop = [t.name for t in ordered if not t.finished and not t.stop_requested]
        if became:
            decision.events.append(Event("Warning" if failed else "Normal", reason, message))
        return decision

    ended = _ended(sweep.status, generation)
    if ended is not None:  # a finished sweep stays finished; only a spec edit (a new generation) reopens it
        return finish(ended.type, ended.reason, ended.message)
    if _goal_reached(sweep, best):  # before the failures: trials it stops on the way are not failures anyway
        assert best is not None
        return finish(
            "Complete",
            GOAL_REACHED,
            f"{best.name} reached {spec.objective.metric} {best.value:g} (goal {spec.objective.goal:g})",
        )
    if counts.failed >= spec.max_failed_trials:
        return finish(
            "Failed",
            TOO_MANY_FAILED_TRIALS,
            f"{counts.failed} trials failed (maxFailedTrials {spec.max_failed_trials}); no more trials are created",
        )
    budget = spec.max_trials - counts.total
    if space is not None:
        budget = min(budget, space - next_index)
    if budget <= 0 and counts.running == 0:
        if space is not None and next_index >= space:
            return finish("Complete", SEARCH_SPACE_EXHAUSTED, f"all {space} grid combinations were tried")
        return finish("Complete", MAX_TRIALS_REACHED, f"{counts.total} trials ran (maxTrials {spec.max_trials})")

    wanted = 0 if spec.suspend else max(0, min(spec.parallelism - counts.running, budget))
    indices = list(range(next_index, next_index + wanted))
    needs_study = spec.pruning.name != "none" or (indices and spec.algorithm.name != "grid")
    study = engine.rebuild_study(sweep, ordered) if needs_study else None  # once per reconcile: it is the cost
    judgement = engine.judge(sweep, ordered, study)
    decision.prune, decision.rungs = judgement.prune, judgement.rungs
    if spec.pruning.name == "hyperband" and status.hyperband_max_resource is None:
        status.hyperband_max_resource = engine.estimated_max_resource(sweep, ordered)
    decision.create = [
        trial_manifest(sweep, index, parameters)
        for index, parameters in zip(indices, engine.suggest(sweep, ordered, indices, study), strict=True)
    ]
    running = counts.running + len(decision.create)
    set_condition(status, "Complete", False, TRIALS_RUNNING, "", now, generation)
    set_condition(status, "Failed", False, TRIALS_RUNNING, "", now, generation)
    set_condition(status, "Stalled", False, TRIALS_RUNNING, "", now, generation)
    if spec.suspend:
        status.message = f"suspended: no new trials; {running} still running"
        set_condition(status, "Suspended", True, "Suspended", status.message, now, generation)
        status.phase = "Suspended"
    else:
        status.message = f"{running} trials running, {counts.total - counts.running} finished of {spec.max_trials}"
        set_condition(status, "Suspended", False, TRIALS_RUNNING, "", now, generation)
        status.phase = "Running"
    derive_health(status, generation, now, paused=running == 0, progressing=TRIALS_RUNNING)
    return decision


def refused_sweep(
    sweep_status: FineTuneSweepStatus,
    namespace: str,
    operator_namespace: str | None,
    generation: int | None,
    now: datetime,
) -> SweepDecision | None:
    """A sweep in the operator's own namespace fails (``OperatorNamespace``) before any trial; None elsewhere."""
    message = operator_namespace_refusal(namespace, operator_namespace, SWEEP_KIND)
    if message is None or sweep_status.phase in ("Complete", "Failed"):
        return None
    return invalid_sweep(sweep_status, message, generation, now, OPERATOR_NAMESPACE)


def invalid_sweep(
    sweep_status: FineTuneSweepStatus,
    message: str,
    generation: int | None,
    now: datetime,
    reason: str = INVALID_SPEC,
) -> SweepDecision:
    """A sweep the API server accepted but the models reject, or one the operator refuses (``reason``):
    fail, create nothing."""
    status = copy_status(sweep_status)
    status.observed_generation = generation
    status.phase = "Failed"
    status.message = message
    became = set_condition(status, "Failed", True, reason, message, now, generation)
    derive_health(status, generation, now)
    events = [Event("Warning", reason, message)] if became else []
    return SweepDecision(status=status, events=events)
