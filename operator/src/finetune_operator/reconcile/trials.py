"""How a sweep reads one trial FineTuneJob: its phase, its objective value, its intermediate values.

Pure, on the API server's JSON (plain dicts), and free of Optuna: the operator's sweep core and the
CLI (``sweep describe``, ``sweep plot``, ``sweep dashboard``) read trials through these same
functions, so they can never disagree about what a trial is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, cast

from finetune_operator.api.job import PRUNED, STOP_ANNOTATION, STOP_REASON_ANNOTATION, SWEEP_FINISHED, FineTuneJobSpec
from finetune_operator.api.sweep import (
    PARAMETERS_ANNOTATION,
    RUNGS_ANNOTATION,
    TRIAL_INDEX_LABEL,
    FineTuneSweep,
    TrialPhase,
)

Manifest = dict[str, Any]
FINISHED_PHASES: tuple[TrialPhase, ...] = ("Succeeded", "Pruned", "Stopped", "Failed")


@dataclass(frozen=True)
class ObservedTrial:
    """What the sweep needs of one trial FineTuneJob."""

    name: str
    index: int
    parameters: dict[str, Any]
    phase: TrialPhase
    intermediate: dict[int, float]
    """Objective value by training amount (``evaluation_key``): comparable across trials whatever their
    batch size, and stable when old evaluations drop out of the bounded status."""
    value: float | None = None
    step: int | None = None
    checkpoint: str | None = None
    stop_requested: bool = False
    rungs: dict[str, float] = field(default_factory=dict)
    """Successive-halving verdicts already made for this trial (rung key to the value judged): kept, never
    made again."""

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


def _dict(value: object) -> Manifest:
    return cast(Manifest, value) if isinstance(value, dict) else {}


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _true(status: Manifest, type_: str) -> Manifest | None:
    conditions = status.get("conditions")
    for condition in conditions if isinstance(conditions, list) else []:
        if isinstance(condition, dict) and condition.get("type") == type_ and condition.get("status") == "True":
            return condition
    return None


def stop_reason(body: Manifest) -> str | None:
    """Why the trial was asked to stop: the recorded stop request, else the stop annotation's reason."""
    reason = _dict(_dict(body.get("status")).get("stopRequest")).get("reason")
    if isinstance(reason, str) and reason:
        return reason
    annotations = _dict(_dict(body.get("metadata")).get("annotations"))
    if str(annotations.get(STOP_ANNOTATION, "")).lower() == "true":
        return str(annotations.get(STOP_REASON_ANNOTATION) or "UserRequested")
    return None


def read_value(status: Manifest, metric: str, maximize: bool) -> tuple[float | None, int | None, str | None]:
    """A trial's objective value, its step and checkpoint: its best value of ``metric``, over the kept
    evaluations and the trainer's ``status.best`` (what early stopping and restoreBest keep, which also
    covers evaluations the bounded history dropped)."""
    better = max if maximize else min
    value: float | None = None
    step: int | None = None
    evaluations = status.get("evaluations")
    for item in evaluations if isinstance(evaluations, list) else []:
        record = _dict(item)
        found = _finite(_dict(record.get("metrics")).get(metric))
        if found is not None and (value is None or better(value, found) != value):
            value, step = found, int(record.get("step") or 0)
    best = _dict(status.get("best"))
    reported = _finite(best.get("value")) if best.get("metric") == metric else None
    if reported is not None and (value is None or better(value, reported) == reported):
        checkpoint, best_step = best.get("checkpoint"), best.get("step")
        return (
            reported,
            best_step if isinstance(best_step, int) else None,
            checkpoint if isinstance(checkpoint, str) else None,
        )
    return value, step, None


def read_phase(body: Manifest, has_value: bool) -> TrialPhase:
    """A trial's phase. A trial its sweep stopped (Pruned, SweepFinished) is Pruned or Stopped however it
    ended, even StopEnforced or failed on the way out: the sweep's own stop is never the trial's failure.
    Otherwise a finished trial without an objective value is Failed."""
    status = _dict(body.get("status"))
    failed, complete = _true(status, "Failed"), _true(status, "Complete")
    if failed is not None or complete is not None:
        reason = stop_reason(body)
        if reason == PRUNED or (complete is not None and complete.get("reason") == PRUNED):
            return "Pruned"
        if reason == SWEEP_FINISHED:
            return "Stopped"
        return "Succeeded" if failed is None and has_value else "Failed"
    return "Running" if status.get("phase") == "Running" else "Pending"


def read_parameters(body: Manifest) -> dict[str, Any] | None:
    """The trial's parameters (its annotation), or None when missing or malformed."""
    raw = _dict(_dict(body.get("metadata")).get("annotations")).get(PARAMETERS_ANNOTATION)
    try:
        found = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def read_rungs(body: Manifest) -> dict[str, float]:
    """The pruner verdicts recorded on the trial (annotation ``finetune.dev/rungs``): rung key to the
    value it was judged on; empty when none was recorded."""
    raw = _dict(_dict(body.get("metadata")).get("annotations")).get(RUNGS_ANNOTATION)
    try:
        found = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return {}
    rungs = {str(key): _finite(value) for key, value in _dict(found).items()}
    return {key: value for key, value in rungs.items() if value is not None}


def examples_per_step(spec: Manifest, template: FineTuneJobSpec) -> int:
    """Training examples one optimizer step consumes: per-device batch x accumulation x processes (one per
    GPU, one per CPU pod). ``spec`` is the trial's wire spec; what it lacks comes from the template."""
    hyper, resources = _dict(spec.get("hyperparameters")), _dict(spec.get("resources"))

    def count(found: object, default: int, least: int = 1) -> int:
        ok = isinstance(found, int) and not isinstance(found, bool) and found >= least
        return cast(int, found) if ok else default

    batch = count(hyper.get("batchSize"), template.hyperparameters.batch_size)
    accumulation = count(hyper.get("gradientAccumulationSteps"), template.hyperparameters.gradient_accumulation_steps)
    nodes = count(resources.get("nodes"), template.resources.nodes)
    gpus = count(resources.get("gpusPerNode"), template.resources.gpus_per_node, least=0)
    return batch * accumulation * nodes * max(gpus, 1)


def evaluation_key(template: FineTuneJobSpec, trial_examples_per_step: int, step: int, epoch: float | None) -> int:
    """The intermediate-value key of one evaluation: how much the trial has trained, in a unit all trials
    share, so that pruners compare trials at the same amount of training whatever their batch size.

    ``strategy: epoch`` counts epochs (a pass over the data is the same for every batch size).
    ``strategy: steps`` counts examples seen, in units of the template's evaluation interval (interval x
    the template's examples per step): a trial with the template's batch gets 1, 2, 3, ...; one with twice
    the batch 2, 4, 6. Keys come from the evaluation itself, never from its place in the bounded history."""
    evaluation = template.evaluation
    if evaluation.strategy == "steps" and evaluation.interval:
        unit = evaluation.interval * examples_per_step({}, template)
        return max(1, math.ceil(step * trial_examples_per_step / unit - 1e-9))
    return max(1, math.ceil((epoch or 0.0) - 1e-6))


def observe_trial(sweep: FineTuneSweep, body: Manifest) -> ObservedTrial | None:
    """One trial FineTuneJob as the sweep sees it; None for an object that is not a trial of this sweep."""
    metadata = _dict(body.get("metadata"))
    try:
        index = int(_dict(metadata.get("labels"))[TRIAL_INDEX_LABEL])
    except (KeyError, ValueError, TypeError):
        return None
    parameters = read_parameters(body)
    if parameters is None:
        return None
    metric = sweep.spec.objective.metric
    status = _dict(body.get("status"))
    template = sweep.spec.trial_template.spec
    per_step = examples_per_step(_dict(body.get("spec")), template)
    intermediate: dict[int, float] = {}
    evaluations = status.get("evaluations")
    for item in evaluations if isinstance(evaluations, list) else []:
        record = _dict(item)
        found = _finite(_dict(record.get("metrics")).get(metric))
        if found is None:
            continue
        key = evaluation_key(template, per_step, int(record.get("step") or 0), _finite(record.get("epoch")))
        intermediate[key] = found
    value, step, checkpoint = read_value(status, metric, sweep.spec.objective.direction == "maximize")
    annotations = _dict(metadata.get("annotations"))
    return ObservedTrial(
        name=str(metadata.get("name")),
        index=index,
        parameters=parameters,
        phase=read_phase(body, value is not None),
        intermediate=intermediate,
        value=value,
        step=step,
        checkpoint=checkpoint,
        stop_requested=str(annotations.get(STOP_ANNOTATION, "")).lower() == "true" or bool(status.get("stopRequest")),
        rungs=read_rungs(body),
    )
