"""A FineTuneSweep and its observed trials -> trials to create, trials to prune, the sweep's status.

Pure (no I/O, no clock). The search engine is Optuna, rebuilt in memory from the trials on every call:
each trial FineTuneJob carries its parameters (an annotation) and its evaluations (its status), so
there is no database and nothing that lives only in a process. Every choice is deterministic given
the trials, so an operator killed between deciding and creating makes the same choice again, and a
trial that already exists (409) is simply there.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from finetune_operator.api import API_VERSION, KIND, FineTuneJobSpec
from finetune_operator.reconcile.children import MANAGED_BY, MANAGED_BY_LABEL, bounded_name, job_label_value
from finetune_operator.reconcile.status import (
    PRUNED,
    STOP_ANNOTATION,
    STOP_REASON_ANNOTATION,
    SWEEP_FINISHED,
    Event,
    set_condition,
)
from finetune_operator.sweep_api import (
    MAX_TRIALS,
    PARAMETERS_ANNOTATION,
    SWEEP_KIND,
    SWEEP_LABEL,
    TRIAL_INDEX_LABEL,
    BestTrial,
    FineTuneSweep,
    FineTuneSweepSpec,
    FineTuneSweepStatus,
    Parameter,
    TrialCounts,
    TrialPhase,
    TrialSummary,
    choices,
    trial_spec,
)

Manifest = dict[str, Any]

GOAL_REACHED = "GoalReached"
MAX_TRIALS_REACHED = "MaxTrialsReached"
SEARCH_SPACE_EXHAUSTED = "SearchSpaceExhausted"
TOO_MANY_FAILED_TRIALS = "TooManyFailedTrials"
TRIALS_RUNNING = "TrialsRunning"
TPE_STARTUP_TRIALS = 10
"""Random trials before TPE models the history (Optuna's long-standing default, pinned)."""

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class ObservedTrial:
    """What the sweep needs of one trial FineTuneJob."""

    name: str
    index: int
    parameters: dict[str, Any]
    phase: TrialPhase
    intermediate: dict[int, float]
    """Objective value by absolute evaluation number (1, 2, ...): comparable across trials whatever
    their batch size, and stable when old evaluations drop out of the bounded status."""
    value: float | None = None
    step: int | None = None
    checkpoint: str | None = None
    stop_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Pruned", "Failed")


@dataclass
class SweepDecision:
    status: FineTuneSweepStatus
    create: list[Manifest] = field(default_factory=list)
    """Trial FineTuneJobs to create, in index order (409 means already created)."""
    prune: list[str] = field(default_factory=list)
    """Running trials to ask to stop with reason Pruned."""
    stop: list[str] = field(default_factory=list)
    """Trials still running when the sweep ended (goal reached, too many failed): ask them to stop."""
    events: list[Event] = field(default_factory=list)


PRUNE_ANNOTATIONS = {STOP_ANNOTATION: "true", STOP_REASON_ANNOTATION: PRUNED}
"""What a sweep writes on a trial to prune it: the stop-request path of every FineTuneJob, reason Pruned."""
FINISHED_ANNOTATIONS = {STOP_ANNOTATION: "true", STOP_REASON_ANNOTATION: SWEEP_FINISHED}
"""What a finished sweep writes on its still-running trials: the same stop path, reason SweepFinished."""


def trial_name(sweep_name: str, index: int) -> str:
    """``<sweep>-t<index>``, within the 253 characters of an object name for any sweep name and index."""
    suffix = f"-t{index:03d}"
    return bounded_name(sweep_name, 253 - len(f"-t{MAX_TRIALS - 1:03d}")) + suffix


def _evaluation_number(spec: FineTuneJobSpec, step: int, epoch: float | None) -> int:
    evaluation = spec.evaluation
    if evaluation.strategy == "steps" and evaluation.interval:
        return max(1, math.ceil(step / evaluation.interval))
    return max(1, math.ceil((epoch or 0.0) - 1e-6))


def _condition(status: Manifest, type_: str) -> Manifest | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def observe_trial(sweep: FineTuneSweep, body: Manifest) -> ObservedTrial | None:
    """One trial FineTuneJob as the sweep sees it; None for an object that is not a trial of this sweep."""
    metadata = body.get("metadata") or {}
    try:
        index = int((metadata.get("labels") or {})[TRIAL_INDEX_LABEL])
        parameters = json.loads((metadata.get("annotations") or {})[PARAMETERS_ANNOTATION])
    except (KeyError, ValueError, TypeError):
        return None
    if not isinstance(parameters, dict):
        return None
    metric = sweep.spec.objective.metric
    maximize = sweep.spec.objective.direction == "maximize"
    better = max if maximize else min
    status = body.get("status") or {}
    template = sweep.spec.trial_template.spec
    intermediate: dict[int, float] = {}
    value: float | None = None
    step: int | None = None
    for record in status.get("evaluations") or []:
        metrics = record.get("metrics") or {}
        if metric not in metrics or not isinstance(metrics[metric], int | float) or not math.isfinite(metrics[metric]):
            continue
        number = _evaluation_number(template, int(record.get("step", 0)), record.get("epoch"))
        intermediate[number] = float(metrics[metric])
        if value is None or better(value, float(metrics[metric])) != value:
            value, step = float(metrics[metric]), int(record.get("step", 0))
    checkpoint: str | None = None
    best = status.get("best") or {}
    reported = best.get("value") if best.get("metric") == metric else None
    # The trainer's best (what early stopping and restoreBest keep) also covers evaluations the bounded history dropped.
    if (
        isinstance(reported, int | float)
        and math.isfinite(reported)
        and (value is None or better(value, reported) == reported)
    ):
        value, step, checkpoint = float(reported), best.get("step"), best.get("checkpoint")
    complete = _condition(status, "Complete")
    phase: TrialPhase
    if _condition(status, "Failed") is not None:
        phase = "Failed"
    elif complete is not None:
        phase = "Pruned" if complete.get("reason") == PRUNED else ("Succeeded" if value is not None else "Failed")
    else:
        phase = "Running" if status.get("phase") == "Running" else "Pending"
    annotations = metadata.get("annotations") or {}
    return ObservedTrial(
        name=str(metadata.get("name")),
        index=index,
        parameters=parameters,
        phase=phase,
        intermediate=intermediate,
        value=value,
        step=step,
        checkpoint=checkpoint,
        stop_requested=annotations.get(STOP_ANNOTATION, "").lower() == "true" or bool(status.get("stopRequest")),
    )


# ---------------------------------------------------------------- the engine


def distribution(parameter: Parameter) -> BaseDistribution:
    if parameter.float_range is not None:
        r = parameter.float_range
        return FloatDistribution(r.min, r.max, log=r.log, step=r.step)
    if parameter.int_range is not None:
        i = parameter.int_range
        return IntDistribution(i.min, i.max, log=i.log, step=i.step)
    return CategoricalDistribution(choices(parameter))


def _trial_seed(seed: int, index: int) -> int:
    """A seed per trial: a rebuilt sampler must not repeat the first trial's draw for every trial."""
    return (seed * 1_000_003 + index * 7919) % (2**32)


def _sampler(spec: FineTuneSweepSpec, index: int) -> optuna.samplers.BaseSampler:
    seed = _trial_seed(spec.algorithm.seed, index)
    if spec.algorithm.name == "tpe":
        # Every argument pinned: Optuna 5.0 changed defaults, and a sweep must not change with the library.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.samplers.TPESampler(
                prior_weight=1.0,
                consider_magic_clip=True,
                consider_endpoints=False,
                n_startup_trials=TPE_STARTUP_TRIALS,
                n_ei_candidates=24,
                seed=seed,
                multivariate=True,
                group=False,
                warn_independent_sampling=False,
                constant_liar=True,
            )
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(spec: FineTuneSweepSpec) -> optuna.pruners.BasePruner:
    pruning = spec.pruning
    warmup = max(1, pruning.warmup_evaluations)
    if pruning.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruning.startup_trials,
            n_warmup_steps=pruning.warmup_evaluations,
            interval_steps=1,
            n_min_trials=1,
        )
    if pruning.name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=warmup, reduction_factor=3, min_early_stopping_rate=0, bootstrap_count=0
        )
    if pruning.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=warmup, max_resource="auto", reduction_factor=3, bootstrap_count=0
        )
    return optuna.pruners.NopPruner()


_STATES: dict[TrialPhase, TrialState] = {
    "Succeeded": TrialState.COMPLETE,
    "Pruned": TrialState.PRUNED,
    "Failed": TrialState.FAIL,
    "Pending": TrialState.RUNNING,
    "Running": TrialState.RUNNING,
}
"""How trial phases map onto Optuna's states."""


def build_study(
    sweep: FineTuneSweep, trials: Sequence[ObservedTrial], system_attrs: dict[str, dict[str, float]] | None = None
) -> optuna.Study:
    """An in-memory study holding every trial, in index order (trial numbers follow indices)."""
    spec = sweep.spec
    distributions = {p.name: distribution(p) for p in spec.parameters}
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        sampler=_sampler(spec, 0),
        pruner=_pruner(spec),
        study_name=sweep.metadata.name,
        direction=spec.objective.direction,
    )
    for trial in sorted(trials, key=lambda t: t.index):
        params = {name: value for name, value in trial.parameters.items() if name in distributions}
        if not all(
            distributions[name]._contains(distributions[name].to_internal_repr(v)) for name, v in params.items()
        ):
            continue  # a trial whose parameters no longer fit the space cannot inform the search
        state = _STATES[trial.phase]
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=trial.value if state == TrialState.COMPLETE else None,
                params=params,
                distributions={name: distributions[name] for name in params},
                intermediate_values=dict(trial.intermediate),
                user_attrs={"name": trial.name, "index": trial.index},
                system_attrs=dict((system_attrs or {}).get(trial.name, {})),
            )
        )
    return study


def grid(spec: FineTuneSweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid, in a fixed order (the first parameter varies slowest)."""
    axes: list[list[Any]] = []
    for parameter in spec.parameters:
        if parameter.int_range is not None:
            r = parameter.int_range
            axes.append(list(range(r.min, r.max + 1, r.step)))
        elif parameter.float_range is not None:
            f = parameter.float_range
            assert f.step is not None  # the spec's rules require it for grid
            count = math.floor((f.max - f.min) / f.step + 1e-9) + 1
            axes.append([round(f.min + k * f.step, 12) for k in range(count)])
        else:
            axes.append(choices(parameter))
    names = [p.name for p in spec.parameters]
    return [dict(zip(names, combination, strict=True)) for combination in itertools.product(*axes)]


def suggest(
    sweep: FineTuneSweep,
    trials: Sequence[ObservedTrial],
    indices: Iterable[int],
    study: optuna.Study | None = None,
) -> list[dict[str, Any]]:
    """Parameters of the trials with these indices, each asked of a study that holds the earlier ones
    (``study``, when the caller already rebuilt it from ``trials``; it gains the asked trials)."""
    spec = sweep.spec
    if spec.algorithm.name == "grid":
        combinations = grid(spec)
        return [combinations[index] for index in indices]
    distributions = {p.name: distribution(p) for p in spec.parameters}
    if study is None:
        study = build_study(sweep, trials)
    suggestions: list[dict[str, Any]] = []
    for index in indices:
        study.sampler = _sampler(spec, index)
        asked = study.ask(fixed_distributions=distributions)
        suggestions.append({name: asked.params[name] for name in distributions})
    return suggestions


def rebuild_study(sweep: FineTuneSweep, trials: Sequence[ObservedTrial]) -> optuna.Study:
    """The study as the pruner needs it: with the rung values successive halving and hyperband keep
    (samplers ignore them, so the same study also serves ``suggest``)."""
    pruning = sweep.spec.pruning.name
    rungs = _rung_values(sweep, trials, _pruner(sweep.spec)) if pruning not in ("none", "median") else {}
    return build_study(sweep, trials, rungs)


def to_prune(sweep: FineTuneSweep, trials: Sequence[ObservedTrial], study: optuna.Study | None = None) -> list[str]:
    """Running trials the pruner judges unpromising at their latest evaluation (``study``: from
    ``rebuild_study``, when the caller already has it)."""
    if sweep.spec.pruning.name == "none":
        return []
    pruner = _pruner(sweep.spec)
    if study is None:
        study = rebuild_study(sweep, trials)
    decisions: list[str] = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not frozen.intermediate_values:
            continue
        observed = next(t for t in trials if t.name == frozen.user_attrs["name"])
        if observed.stop_requested:
            continue
        if pruner.prune(study, frozen):
            decisions.append(observed.name)
    return decisions


def _rung_values(
    sweep: FineTuneSweep, trials: Sequence[ObservedTrial], pruner: optuna.pruners.BasePruner
) -> dict[str, dict[str, float]]:
    """Successive halving records each trial's value at each rung in the trial's system attributes as
    the trial reports; a rebuilt study has none. Recompute them for the finished trials (a trial records
    every rung its evaluations reach; a pruned one stops at the rung that pruned it), by trial name.
    Hyperband runs one successive halving per bracket: a trial's bracket sets its first rung."""
    reduction, minimum = 3, max(1, sweep.spec.pruning.warmup_evaluations)
    rate_of: dict[str, int] = {}
    if isinstance(pruner, optuna.pruners.HyperbandPruner):
        probe = build_study(sweep, trials)
        pruner._try_initialization(probe)  # pinned Optuna 5.0: how Hyperband assigns brackets
        if not pruner._pruners:
            return {}
        rate_of = {t.user_attrs["name"]: pruner._get_bracket_id(probe, t) for t in probe.get_trials(deepcopy=False)}
    values: dict[str, dict[str, float]] = {}
    for trial in trials:
        if not trial.finished or not trial.intermediate:
            continue
        attributes: dict[str, float] = {}
        rung = 0
        while True:
            promotion = minimum * reduction ** (rate_of.get(trial.name, 0) + rung)
            reached = [step for step in sorted(trial.intermediate) if step >= promotion]
            if not reached:
                break
            attributes[f"completed_rung_{rung}"] = trial.intermediate[reached[0]]
            rung += 1
        values[trial.name] = attributes
    return values


# ---------------------------------------------------------------- the sweep


def _counts(trials: Sequence[ObservedTrial]) -> TrialCounts:
    return TrialCounts(
        total=len(trials),
        running=sum(not t.finished for t in trials),
        succeeded=sum(t.phase == "Succeeded" for t in trials),
        pruned=sum(t.phase == "Pruned" for t in trials),
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


def decide_sweep(sweep: FineTuneSweep, trials: Sequence[ObservedTrial], now: datetime) -> SweepDecision:
    """The sweep's next step: which trials to create and prune, and its status."""
    spec = sweep.spec
    generation = sweep.metadata.generation
    status = sweep.status.model_copy(deep=True)
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
    space = len(grid(spec)) if spec.algorithm.name == "grid" else None
    next_index = max((t.index for t in ordered), default=-1) + 1

    def finish(type_: str, reason: str, message: str) -> SweepDecision:
        failed = type_ == "Failed"
        became = set_condition(status, "Failed" if failed else "Complete", True, reason, message, now, generation)
        set_condition(status, "Complete" if failed else "Failed", False, reason, message, now, generation)
        set_condition(status, "Ready", not failed, reason, message, now, generation)
        set_condition(status, "Reconciling", False, reason, message, now, generation)
        set_condition(status, "Stalled", failed, reason, message, now, generation)
        set_condition(status, "Suspended", False, reason, message, now, generation)
        status.phase = "Failed" if failed else "Complete"
        status.message = message
        decision.stop = [t.name for t in ordered if not t.finished and not t.stop_requested]
        if became:
            decision.events.append(Event("Warning" if failed else "Normal", reason, message))
        return decision

    if counts.failed >= spec.max_failed_trials:
        return finish(
            "Failed",
            TOO_MANY_FAILED_TRIALS,
            f"{counts.failed} trials failed (maxFailedTrials {spec.max_failed_trials}); no more trials are created",
        )
    if _goal_reached(sweep, best):
        assert best is not None
        return finish(
            "Complete",
            GOAL_REACHED,
            f"{best.name} reached {spec.objective.metric} {best.value:g} (goal {spec.objective.goal:g})",
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
    study = rebuild_study(sweep, ordered) if needs_study else None  # once per reconcile: it is the cost
    decision.prune = to_prune(sweep, ordered, study)
    decision.create = [
        trial_manifest(sweep, index, parameters)
        for index, parameters in zip(indices, suggest(sweep, ordered, indices, study), strict=True)
    ]
    running = counts.running + len(decision.create)
    set_condition(status, "Complete", False, TRIALS_RUNNING, "", now, generation)
    set_condition(status, "Failed", False, TRIALS_RUNNING, "", now, generation)
    set_condition(status, "Stalled", False, TRIALS_RUNNING, "", now, generation)
    if spec.suspend:
        message = f"suspended: no new trials; {running} still running"
        set_condition(status, "Suspended", True, "Suspended", message, now, generation)
        set_condition(status, "Ready", running == 0, "Suspended", message, now, generation)
        set_condition(status, "Reconciling", running > 0, "Suspended", message, now, generation)
        status.phase = "Suspended"
    else:
        message = f"{running} trials running, {counts.total - counts.running} finished of {spec.max_trials}"
        set_condition(status, "Suspended", False, TRIALS_RUNNING, "", now, generation)
        set_condition(status, "Ready", False, TRIALS_RUNNING, message, now, generation)
        set_condition(status, "Reconciling", True, TRIALS_RUNNING, message, now, generation)
        status.phase = "Running"
    status.message = message
    return decision


def invalid_sweep(
    sweep_status: FineTuneSweepStatus, message: str, generation: int | None, now: datetime
) -> SweepDecision:
    """A sweep the API server accepted but the models reject: fail, create nothing."""
    status = sweep_status.model_copy(deep=True)
    status.observed_generation = generation
    status.phase = "Failed"
    status.message = message
    became = set_condition(status, "Failed", True, "InvalidSpec", message, now, generation)
    set_condition(status, "Stalled", True, "InvalidSpec", message, now, generation)
    set_condition(status, "Ready", False, "InvalidSpec", message, now, generation)
    set_condition(status, "Reconciling", False, "InvalidSpec", message, now, generation)
    events = [Event("Warning", "InvalidSpec", message)] if became else []
    return SweepDecision(status=status, events=events)
