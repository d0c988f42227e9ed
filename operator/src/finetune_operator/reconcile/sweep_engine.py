"""The search engine of sweeps: Optuna, rebuilt in memory from the observed trials on every reconcile.

The only module that imports Optuna, and so the only one that touches its private methods (pinned to
Optuna 5.0: Hyperband's bracket assignment, successive halving's rung attributes, the in-memory
storage). Each trial FineTuneJob carries its parameters (an annotation), its evaluations (its status)
and its rung verdicts (an annotation), so there is no database and nothing that lives only in a
process. Every choice is deterministic given the trials: a restarted operator asks the same again.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from finetune_operator.api.sweep import FineTuneSweep, FineTuneSweepSpec, Parameter, TrialPhase, choices
from finetune_operator.reconcile.trials import ObservedTrial

TPE_STARTUP_TRIALS = 10
"""Random trials before TPE models the history (Optuna's long-standing default, pinned)."""
RUNG_PREFIX = "completed_rung_"
"""How Optuna's successive halving names a trial's verdict at a rung (a system attribute): pinned Optuna 5.0."""
REDUCTION_FACTOR = 3

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
