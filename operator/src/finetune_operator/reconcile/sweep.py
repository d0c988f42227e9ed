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
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from finetune_operator.api import (
    API_VERSION,
    KIND,
    PRUNED,
    STOP_ANNOTATION,
    STOP_REASON_ANNOTATION,
    SWEEP_FINISHED,
    Condition,
    ConditionType,
)
from finetune_operator.reconcile.children import MANAGED_BY, MANAGED_BY_LABEL, job_label_value
from finetune_operator.reconcile.status import Event, set_condition
from finetune_operator.reconcile.trials import ObservedTrial
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
RUNG_PREFIX = "completed_rung_"
"""How Optuna's successive halving names a trial's verdict at a rung (a system attribute): pinned Optuna 5.0."""
REDUCTION_FACTOR = 3

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
    return f"{sweep_name}-t{index:03d}"


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


def _pruner(spec: FineTuneSweepSpec, max_resource: int | None = None) -> optuna.pruners.BasePruner:
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
            min_resource=warmup, reduction_factor=REDUCTION_FACTOR, min_early_stopping_rate=0, bootstrap_count=0
        )
    if pruning.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=warmup,
            max_resource=max_resource or "auto",
            reduction_factor=REDUCTION_FACTOR,
            bootstrap_count=0,
        )
    return optuna.pruners.NopPruner()


_STATES: dict[TrialPhase, TrialState] = {
    "Succeeded": TrialState.COMPLETE,
    "Pruned": TrialState.PRUNED,
    "Stopped": TrialState.PRUNED,
    "Failed": TrialState.FAIL,
    "Pending": TrialState.RUNNING,
    "Running": TrialState.RUNNING,
}
"""How trial phases map onto Optuna's states."""


def build_study(
    sweep: FineTuneSweep,
    trials: Sequence[ObservedTrial],
    system_attrs: dict[str, dict[str, float]] | None = None,
    max_resource: int | None = None,
) -> optuna.Study:
    """An in-memory study holding every trial, in index order (trial numbers follow indices)."""
    spec = sweep.spec
    distributions = {p.name: distribution(p) for p in spec.parameters}
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        sampler=_sampler(spec, 0),
        pruner=_pruner(spec, max_resource or sweep.status.hyperband_max_resource),
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


@dataclass
class Judgement:
    """What the pruner decided this reconcile."""

    prune: list[str] = field(default_factory=list)
    """Running trials to stop as unpromising."""
    rungs: dict[str, dict[str, float]] = field(default_factory=dict)
    """Trials with new rung verdicts: every verdict of the trial (rung key to the value it was judged on), to
    record on it (``RUNGS_ANNOTATION``)."""


def estimated_max_resource(sweep: FineTuneSweep, trials: Sequence[ObservedTrial]) -> int | None:
    """Hyperband's max resource: the one the sweep recorded, else Optuna's "auto" estimate (the longest
    trial that ran to its end, plus one) once there is such a trial. Recorded by the sweep the first time,
    so that brackets never move as longer trials finish."""
    if sweep.status.hyperband_max_resource is not None:
        return sweep.status.hyperband_max_resource
    ended = [max(t.intermediate) for t in trials if t.phase == "Succeeded" and t.intermediate]
    return max(ended) + 1 if ended else None


def _promotion(sweep: FineTuneSweep, rate: int, rung: int) -> int:
    minimum: int = max(1, sweep.spec.pruning.warmup_evaluations)
    return int(minimum * REDUCTION_FACTOR ** (rate + rung))


def _at_next_rung(sweep: FineTuneSweep, trial: ObservedTrial, rate: int) -> ObservedTrial:
    """A running trial as successive halving must judge it: its values up to its first evaluation at or past
    the next rung it has no verdict for, so the rung is judged on the value the trial had there (not its
    latest), and a rung judged before is never judged again (its verdict is in ``trial.rungs``)."""
    rung = sum(key.startswith(RUNG_PREFIX) for key in trial.rungs)
    reached = [key for key in sorted(trial.intermediate) if key >= _promotion(sweep, rate, rung)]
    if not reached:
        return trial
    return replace(trial, intermediate={k: v for k, v in trial.intermediate.items() if k <= reached[0]})


def rebuild_study(sweep: FineTuneSweep, trials: Sequence[ObservedTrial]) -> optuna.Study:
    """The study as the pruner needs it: with the rung verdicts successive halving and hyperband keep, and
    each running trial at its next rung (samplers ignore both, so the same study also serves ``suggest``)."""
    pruning = sweep.spec.pruning.name
    if pruning not in ("successive-halving", "hyperband"):
        return build_study(sweep, trials)
    max_resource = estimated_max_resource(sweep, trials) if pruning == "hyperband" else None
    rate_of: dict[str, int] = {}
    if pruning == "hyperband":
        if max_resource is None:
            return build_study(sweep, trials)  # no trial has ended yet: nothing to size the brackets by
        probe = build_study(sweep, trials, max_resource=max_resource)
        pruner = probe.pruner
        assert isinstance(pruner, optuna.pruners.HyperbandPruner)
        pruner._try_initialization(probe)  # pinned Optuna 5.0: how Hyperband assigns brackets
        rate_of = {t.user_attrs["name"]: pruner._get_bracket_id(probe, t) for t in probe.get_trials(deepcopy=False)}
    judged = [t if t.finished else _at_next_rung(sweep, t, rate_of.get(t.name, 0)) for t in trials]
    return build_study(sweep, judged, _rung_values(sweep, trials, rate_of), max_resource)


def judge(sweep: FineTuneSweep, trials: Sequence[ObservedTrial], study: optuna.Study | None = None) -> Judgement:
    """The pruner's verdicts on the running trials (``study``: from ``rebuild_study``, when the caller
    already has it): which to prune, and the new rung verdicts to record."""
    judgement = Judgement()
    if sweep.spec.pruning.name == "none":
        return judgement
    if study is None:
        study = rebuild_study(sweep, trials)
    by_name = {t.name: t for t in trials}
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        observed = by_name[frozen.user_attrs["name"]]
        if not frozen.intermediate_values or observed.stop_requested:
            continue
        if study.pruner.prune(study, frozen):
            judgement.prune.append(observed.name)
        after = study._storage.get_trial(frozen._trial_id).system_attrs  # the verdicts prune() just wrote
        verdicts = {k: float(v) for k, v in after.items() if k.startswith(RUNG_PREFIX)}
        if verdicts != observed.rungs:
            judgement.rungs[observed.name] = verdicts
    return judgement


def to_prune(sweep: FineTuneSweep, trials: Sequence[ObservedTrial], study: optuna.Study | None = None) -> list[str]:
    """Running trials the pruner judges unpromising at their latest evaluation."""
    return judge(sweep, trials, study).prune


def _rung_values(
    sweep: FineTuneSweep, trials: Sequence[ObservedTrial], rate_of: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Successive halving records each trial's value at each rung in the trial's system attributes as the
    trial reports; a rebuilt study has none. A running trial gets the verdicts recorded on it. A finished
    one also every rung its evaluations reach (it may have passed some between two reconciles), the
    recorded verdicts winning. Hyperband runs one successive halving per bracket: the bracket sets the
    first rung."""
    values: dict[str, dict[str, float]] = {}
    for trial in trials:
        attributes: dict[str, float] = {}
        rung, rate = 0, rate_of.get(trial.name, 0)
        while trial.finished:
            reached = [k for k in sorted(trial.intermediate) if k >= _promotion(sweep, rate, rung)]
            if not reached:
                break
            attributes[f"{RUNG_PREFIX}{rung}"] = trial.intermediate[reached[0]]
            rung += 1
        values[trial.name] = {**attributes, **trial.rungs}
    return values


# ---------------------------------------------------------------- the sweep


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
    """The Complete or Failed condition the sweep already ended with for this generation, if any."""
    if status.observed_generation != generation:
        return None
    return next(
        (c for c in status.conditions if c.type in ("Complete", "Failed") and c.status == "True"),
        None,
    )


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

    def finish(type_: ConditionType, reason: str, message: str) -> SweepDecision:
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
    study = rebuild_study(sweep, ordered) if needs_study else None  # once per reconcile: it is the cost
    judgement = judge(sweep, ordered, study)
    decision.prune, decision.rungs = judgement.prune, judgement.rungs
    if spec.pruning.name == "hyperband" and status.hyperband_max_resource is None:
        status.hyperband_max_resource = estimated_max_resource(sweep, ordered)
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
