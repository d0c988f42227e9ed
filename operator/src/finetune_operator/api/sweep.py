"""The FineTuneSweep API (finetune.dev/v1alpha1): a hyperparameter search whose trials are FineTuneJobs.

The CRD is generated from these models by ``finetune_operator.generators.crd``, like the FineTuneJob's. Rules
that the API server can check are CEL (``Rule``); the one it cannot (does every value a parameter
may take make a valid FineTuneJob?) is ``invalid_trial_values``, which the operator turns into
``Failed/InvalidSpec`` before it creates any trial.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from finetune_operator.api.job import (
    Condition,
    FineTuneJobSpec,
    ObjectMeta,
    StatusModel,
)
from finetune_trainer import contract
from finetune_trainer.spec import Metric, Rule, SpecModel

SWEEP_KIND = contract.SWEEP_KIND
SWEEP_PLURAL = "finetunesweeps"
SWEEP_SINGULAR = "finetunesweep"
SWEEP_SHORT_NAMES = ("fts",)

SWEEP_LABEL = "finetune.dev/sweep"
"""Label on every trial: the name of its sweep (``kubectl get ftj -l finetune.dev/sweep=NAME``)."""
TRIAL_INDEX_LABEL = "finetune.dev/trial-index"
"""Label on every trial: its index in the sweep (0, 1, ...)."""
PARAMETERS_ANNOTATION = contract.PARAMETERS_ANNOTATION
"""Annotation on every trial: its parameters as JSON (the trainer logs them to MLflow too: in the contract)."""

RUNGS_ANNOTATION = "finetune.dev/rungs"
"""Annotation on a trial, written by its sweep: the successive-halving / hyperband verdicts made for it (rung
to the value it was judged on, JSON), so a rebuilt study never judges a rung twice."""

MAX_TRIALS = 1000
"""Upper bound of spec.maxTrials; status.trials holds one compact entry per trial, so it stays far
below etcd's object size limit."""
MAX_PARAMETERS = 16
MAX_CHOICES = 64
NOT_SWEEPABLE = frozenset({"output.location", "suspend"})
"""Scalar FineTuneJob fields a parameter may not set: every trial gets its own output location, and
suspension is the sweep's."""

Scalar = Annotated[
    bool | int | float | str,
    Field(
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="A number, string or boolean.",
    ),
]
ParameterName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")]
Path = Annotated[str, StringConstraints(min_length=1, max_length=128)]


def _scalar_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        else:
            options = [annotation]
        path = prefix + to_camel(name)
        if len(options) == 1 and isinstance(options[0], type) and issubclass(options[0], BaseModel):
            paths.extend(_scalar_paths(options[0], path + "."))
        elif not any(typing.get_origin(option) in (list, dict) for option in options) and path not in NOT_SWEEPABLE:
            paths.append(path)
    return paths


SWEEPABLE_PATHS: tuple[str, ...] = tuple(_scalar_paths(FineTuneJobSpec))
"""Every FineTuneJob spec field a parameter may set (camelCase, dotted): the scalar leaves."""
_CEL_PATHS = "[" + ", ".join(f"'{path}'" for path in SWEEPABLE_PATHS) + "]"


class FloatRange(SpecModel):
    """A continuous range, sampled uniformly or on a log scale; with a step it is discrete (and griddable)."""

    rules = (
        Rule("max", "max must be greater than min", "self.max > self.min", lambda r: r.max > r.min),
        Rule(
            "min",
            "min must be greater than 0 on a log scale",
            "!self.log || self.min > 0.0",
            lambda r: not r.log or r.min > 0,
        ),
        Rule(
            "step",
            "step and log cannot be combined",
            "!self.log || !has(self.step)",
            lambda r: not r.log or r.step is None,
        ),
    )

    min: float = Field(description="Smallest value.")
    max: float = Field(description="Largest value.")
    log: bool = Field(False, description="Sample on a log scale (min > 0).")
    step: float | None = Field(None, gt=0, description="Distance between values; required for the grid algorithm.")


class IntRange(SpecModel):
    """An integer range from min to max in steps of step."""

    rules = (
        Rule("max", "max must be greater than min", "self.max > self.min", lambda r: r.max > r.min),
        Rule(
            "min",
            "min must be at least 1 on a log scale",
            "!self.log || self.min >= 1",
            lambda r: not r.log or r.min >= 1,
        ),
        Rule(
            "step",
            "step must be 1 on a log scale",
            "!self.log || self.step == 1",
            lambda r: not r.log or r.step == 1,
        ),
    )

    min: int = Field(description="Smallest value.")
    max: int = Field(description="Largest value.")
    step: int = Field(1, ge=1, description="Distance between values.")
    log: bool = Field(False, description="Sample on a log scale (min >= 1, step 1).")


class Preset(SpecModel):
    """A named set of values for several paths at once (e.g. a freeze policy)."""

    label: ParameterName = Field(description="What the trial table shows for this choice.")
    set: dict[Path, Scalar | None] = Field(
        default_factory=dict,
        max_length=16,
        description="FineTuneJob spec path (e.g. freeze.strategy) to value. To remove a template field, use unset "
        "(a null here is refused: kubectl drops it on the way in).",
    )
    unset: list[Path] = Field(
        default_factory=list,
        max_length=16,
        description="FineTuneJob spec paths to remove from the template (e.g. freeze.layers for head-only).",
    )

    # A free-form map is invisible to CEL (the API server drops it from the rules' types), so the operator
    # checks these (Failed/InvalidSpec naming the field).
    @model_validator(mode="after")
    def _known_paths(self) -> Self:
        for name, paths in (("set", list(self.set)), ("unset", self.unset)):
            unknown = [key for key in paths if key not in SWEEPABLE_PATHS]
            if unknown:
                raise ValueError(
                    f"{name}: {', '.join(unknown)} is not a FineTuneJob spec field such as freeze.strategy "
                    "(output.location and suspend cannot be set)"
                )
        nulls = [key for key, value in self.set.items() if value is None]
        if nulls:
            raise ValueError(
                f"set: {', '.join(nulls)} is null; kubectl and GitOps tools drop a null before it reaches the API "
                "server, so it cannot remove a template field: list the path in unset instead"
            )
        if not self.set and not self.unset:
            raise ValueError("set: a preset must set or unset at least one path")
        both = sorted(set(self.unset) & set(self.set))
        if both:
            raise ValueError(f"unset: {', '.join(both)} cannot be both set and unset")
        return self


class Categorical(SpecModel):
    """A choice among values (of one path), or among presets (each setting several paths)."""

    rules = (
        Rule(
            "presets",
            "preset labels must be unique",
            "!has(self.presets) || self.presets.all(p, self.presets.exists_one(q, q.label == p.label))",
            lambda c: c.presets is None or len({p.label for p in c.presets}) == len(c.presets),
        ),
    )

    values: list[Scalar] | None = Field(None, min_length=1, max_length=MAX_CHOICES, description="The values to try.")
    presets: list[Preset] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES, description="Named sets of values to try."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.values is None) == (self.presets is None):
            raise ValueError("values: exactly one of values and presets must be set")
        return self


class Parameter(SpecModel):
    """One searched hyperparameter: where it goes in the FineTuneJob spec and which values it may take."""

    rules = (
        Rule(
            "float",
            "exactly one of float, int and categorical must be set",
            "(has(self.float) ? 1 : 0) + (has(self.int) ? 1 : 0) + (has(self.categorical) ? 1 : 0) == 1",
            lambda p: sum(x is not None for x in (p.float_range, p.int_range, p.categorical)) == 1,
        ),
        Rule(
            "path",
            "path is required, except for categorical presets (which name their own paths)",
            "has(self.path) != (has(self.categorical) && has(self.categorical.presets))",
            lambda p: (p.path is not None) != (p.categorical is not None and p.categorical.presets is not None),
        ),
        Rule(
            "path",
            "must be a FineTuneJob spec field such as hyperparameters.learningRate (not output.location or suspend)",
            f"!has(self.path) || self.path in {_CEL_PATHS}",
            lambda p: p.path is None or p.path in SWEEPABLE_PATHS,
        ),
    )

    name: ParameterName = Field(description="Name shown in the trial table and annotation.")
    path: Path | None = Field(
        None, description="FineTuneJob spec field the value goes into, dotted camelCase: hyperparameters.learningRate."
    )
    float_range: FloatRange | None = Field(None, alias="float", description="A continuous range.")
    int_range: IntRange | None = Field(None, alias="int", description="An integer range.")
    categorical: Categorical | None = Field(None, description="A choice among values or presets.")


class Objective(SpecModel):
    """What the search optimises: each trial's best value of one evaluation metric."""

    metric: Metric = Field(description="An evaluation metric the trial template computes (evaluation.metrics).")
    direction: Literal["minimize", "maximize"] = Field(description="minimize or maximize.")
    goal: float | None = Field(None, description="Complete the sweep (GoalReached) once a trial reaches this value.")


class Algorithm(SpecModel):
    """The search algorithm (Optuna samplers, seeded: the same history gives the same next trial)."""

    name: Literal["grid", "random", "tpe"] = Field(
        description="grid (every combination, in order), random, or tpe (Bayesian)."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the sampler.")


class Pruning(SpecModel):
    """Stop unpromising trials early (as Complete/Pruned), judged at each evaluation."""

    name: Literal["none", "median", "successive-halving", "hyperband"] = Field(
        "none", description="none, median, successive-halving or hyperband."
    )
    warmup_evaluations: int = Field(
        1, ge=0, le=1000, description="Never prune a trial before it has this many evaluations."
    )
    startup_trials: int = Field(
        3, ge=0, le=1000, description="Never prune before this many trials have finished (median)."
    )


class TrialMetadata(SpecModel):
    """Labels and annotations every trial gets."""

    labels: dict[
        Annotated[str, StringConstraints(max_length=317)], Annotated[str, StringConstraints(max_length=63)]
    ] = Field(default_factory=dict, max_length=64, description="Labels of every trial.")
    annotations: dict[
        Annotated[str, StringConstraints(max_length=317)], Annotated[str, StringConstraints(max_length=4096)]
    ] = Field(default_factory=dict, max_length=64, description="Annotations of every trial.")


class TrialTemplate(SpecModel):
    """The FineTuneJob every trial starts from; parameters overwrite fields of its spec."""

    metadata: TrialMetadata = Field(default_factory=TrialMetadata, description="Labels and annotations of trials.")
    spec: FineTuneJobSpec = Field(
        description="A FineTuneJob spec. Each trial writes to <spec.output.location>/<trial name>."
    )


def _sweep_immutable(field: str) -> Rule:
    return Rule(
        field,
        f"spec.{field} is immutable; only parallelism, maxTrials, maxFailedTrials and suspend may change",
        f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})",
        reason="FieldValueForbidden",
    )


def _evaluates(spec: FineTuneSweepSpec) -> bool:
    evaluation = spec.trial_template.spec.evaluation
    return evaluation.strategy != "no" and spec.objective.metric in evaluation.metrics


class FineTuneSweepSpec(SpecModel):
    """Desired state of a FineTuneSweep: the search space, the objective and the trial budget."""

    objective: Objective = Field(description="The metric to optimise and its direction.")
    algorithm: Algorithm = Field(description="How the next trial's parameters are chosen.")
    pruning: Pruning = Field(default_factory=Pruning, description="Early stop of unpromising trials (none by default).")
    parameters: list[Parameter] = Field(
        min_length=1, max_length=MAX_PARAMETERS, description="The hyperparameters to search."
    )
    trial_template: TrialTemplate = Field(description="The FineTuneJob each trial is made from.")
    parallelism: int = Field(1, ge=1, le=100, description="Trials created and not yet finished, at most.")
    max_trials: int = Field(10, ge=1, le=MAX_TRIALS, description="Trials to run in all; raising it resumes the sweep.")
    max_failed_trials: int = Field(
        3, ge=1, le=MAX_TRIALS, description="Fail the sweep once this many trials have failed."
    )
    suspend: bool = Field(False, description="Create no new trials (running ones go on).")


FineTuneSweepSpec.rules = (
    Rule(
        "objective.metric",
        "the trial template must evaluate the objective metric (trialTemplate.spec.evaluation.metrics, "
        "strategy not no)",
        "self.trialTemplate.spec.evaluation.strategy != 'no' && "
        "self.objective.metric in self.trialTemplate.spec.evaluation.metrics",
        _evaluates,
    ),
    Rule(
        "parameters",
        "parameter names must be unique",
        "self.parameters.all(p, self.parameters.exists_one(q, q.name == p.name))",
        lambda s: len({p.name for p in s.parameters}) == len(s.parameters),
    ),
    Rule(
        "parameters",
        "the grid algorithm needs a step on every float range",
        "self.algorithm.name != 'grid' || self.parameters.all(p, !has(p.float) || has(p.float.step))",
        lambda s: (
            s.algorithm.name != "grid"
            or all(p.float_range is None or p.float_range.step is not None for p in s.parameters)
        ),
    ),
    *(_sweep_immutable(name) for name in ("objective", "algorithm", "pruning", "parameters", "trialTemplate")),
)


TrialPhase = Literal["Pending", "Running", "Succeeded", "Pruned", "Stopped", "Failed"]
SweepPhase = Literal["Running", "Suspended", "Complete", "Failed"]


class TrialCounts(StatusModel):
    """How many trials are in each state."""

    total: int = Field(0, description="Trials created.")
    running: int = Field(0, description="Created and not finished (pending or running).")
    succeeded: int = Field(0, description="Finished with an objective value (not pruned).")
    pruned: int = Field(0, description="Stopped early as unpromising (Complete/Pruned).")
    stopped: int = Field(
        0, description="Stopped because the sweep finished (goal reached, too many failed); not failures."
    )
    failed: int = Field(
        0, description="Failed, or finished with no evaluation of the objective metric (never one the sweep stopped)."
    )


class BestTrial(StatusModel):
    """The trial with the best objective value so far."""

    name: str = Field(description="The trial FineTuneJob.")
    value: float = Field(description="Its best objective value.")
    step: int | None = Field(None, description="Step of that value.")
    checkpoint: str | None = Field(None, description="Checkpoint holding those weights.")
    parameters: dict[str, Scalar] = Field(default_factory=dict, description="Its parameters.")


class TrialSummary(StatusModel):
    """One trial, compactly."""

    name: str = Field(description="The trial FineTuneJob.")
    phase: TrialPhase = Field(
        description="Pending, Running, Succeeded, Pruned, Stopped (by its finished sweep) or Failed."
    )
    value: float | None = Field(None, description="Its best objective value so far.")
    parameters: dict[str, Scalar] = Field(default_factory=dict, description="Its parameters.")


class FineTuneSweepStatus(StatusModel):
    """Observed state of a FineTuneSweep."""

    observed_generation: int | None = Field(None, description="metadata.generation the status reflects.")
    phase: SweepPhase | None = Field(None, description="Summary for printer columns; automation reads conditions.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Complete, Failed, Suspended, Ready, Reconciling, Stalled (kstatus reads the last three).",
    )
    trial_counts: TrialCounts = Field(default_factory=TrialCounts, description="Trials by state.")
    best_trial: BestTrial | None = Field(None, description="The best trial so far.")
    trials: list[TrialSummary] = Field(
        default_factory=list, max_length=MAX_TRIALS, description="Every trial, by index (compact, bounded)."
    )
    message: str | None = Field(None, description="Latest human-readable summary.")
    hyperband_max_resource: int | None = Field(
        None,
        description="Hyperband's max resource (evaluations' worth of training), estimated once from the first "
        "trial that ran to its end and kept, so trials keep their brackets.",
    )


class FineTuneSweep(BaseModel):
    """A whole FineTuneSweep object."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", alias_generator=to_camel)

    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    kind: Literal["FineTuneSweep"] = "FineTuneSweep"
    metadata: ObjectMeta
    spec: FineTuneSweepSpec
    status: FineTuneSweepStatus = Field(default_factory=FineTuneSweepStatus)

    @model_validator(mode="after")
    def _values_make_valid_trials(self) -> Self:
        problems = invalid_trial_values(self.spec)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted camelCase path in a FineTuneJob spec dict, creating parents; None removes it (unset)."""
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def assignments(parameter: Parameter, value: Any) -> dict[str, Any]:
    """The spec paths and values one parameter value sets (a preset's label sets all its paths); None
    for a path the preset unsets."""
    if parameter.categorical is not None and parameter.categorical.presets is not None:
        preset = next(p for p in parameter.categorical.presets if p.label == value)
        return {**dict(preset.set), **dict.fromkeys(preset.unset)}
    assert parameter.path is not None
    return {parameter.path: value}


def choices(parameter: Parameter) -> list[Any]:
    """The values of a categorical parameter (preset labels for presets)."""
    assert parameter.categorical is not None
    if parameter.categorical.presets is not None:
        return [p.label for p in parameter.categorical.presets]
    return list(parameter.categorical.values or [])


def _extremes(parameter: Parameter) -> list[Any]:
    if parameter.float_range is not None:
        return [parameter.float_range.min, parameter.float_range.max]
    if parameter.int_range is not None:
        r = parameter.int_range
        return [r.min, r.min + (r.max - r.min) // r.step * r.step]
    return choices(parameter)


def trial_spec(spec: FineTuneSweepSpec, values: dict[str, Any], trial_name: str) -> dict[str, Any]:
    """The wire spec of one trial: the template with the parameters' values and its own output location."""
    job = copy.deepcopy(spec.trial_template.spec.to_wire())
    by_name = {p.name: p for p in spec.parameters}
    for name, value in values.items():
        for path, item in assignments(by_name[name], value).items():
            set_path(job, path, item)
    job["output"]["location"] = job["output"]["location"].rstrip("/") + "/" + trial_name
    job["suspend"] = False
    metrics = job["evaluation"]["metrics"]
    if not job.get("earlyStopping") and spec.objective.metric in metrics:
        # Without early stopping the trainer's best (and its checkpoint) follows the first metric listed:
        # put the objective there, so the best trial's checkpoint is the one of its objective value.
        metrics.remove(spec.objective.metric)
        metrics.insert(0, spec.objective.metric)
    return job


def invalid_trial_values(spec: FineTuneSweepSpec) -> list[str]:
    """Each parameter value (range ends, every choice) that would make an invalid FineTuneJob, with the field
    named; the API server cannot check this, so the operator fails the sweep before creating trials."""
    problems: list[str] = []
    for index, parameter in enumerate(spec.parameters):
        for value in _extremes(parameter):
            try:
                FineTuneJobSpec.model_validate(trial_spec(spec, {parameter.name: value}, "t"))
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                hint = (
                    " (a preset removes a template field by listing it in unset)"
                    if parameter.categorical is not None and parameter.categorical.presets is not None
                    else ""
                )
                problems.append(
                    f"spec.parameters[{index}] ({parameter.name}): value {json.dumps(value)} makes an invalid "
                    f"FineTuneJob: {where}: {first['msg']}{hint}"
                )
                break
    return problems
