"""FineTuneSweep objects and trial FineTuneJobs with hand-written status, shared by the plugin's unit and
integration tests. Shapes follow issue #15: ``trialCounts``, ``bestTrial``, compact ``trials``."""

from __future__ import annotations

import copy
import json
from typing import Any

from finetune_operator.api.sweep import PARAMETERS_ANNOTATION, SWEEP_LABEL, TRIAL_INDEX_LABEL
from tests.cli.jobs import T0, condition, job

Manifest = dict[str, Any]

PARAMETERS: list[Manifest] = [
    {"name": "lr", "path": "hyperparameters.learningRate", "float": {"min": 1.0e-5, "max": 3.0e-4, "log": True}},
    {"name": "decay", "path": "hyperparameters.weightDecay", "categorical": {"values": [0.0, 0.01, 0.1]}},
    {
        "name": "freeze",
        "categorical": {
            "presets": [
                {"label": "bottom-4", "set": {"freeze.strategy": "bottom-layers", "freeze.layers": 4}},
                {"label": "head-only", "set": {"freeze.strategy": "head-only"}, "unset": ["freeze.layers"]},
            ]
        },
    },
]

# name, phase, accuracy (None: no evaluation yet), parameters
TRIALS: list[tuple[str, str, float | None, Manifest]] = [
    ("tune-t000", "Succeeded", 0.81, {"lr": 2.0e-5, "decay": 0.0, "freeze": "bottom-4"}),
    ("tune-t001", "Succeeded", 0.86, {"lr": 1.1e-4, "decay": 0.01, "freeze": "bottom-4"}),
    ("tune-t002", "Pruned", 0.62, {"lr": 1.0e-5, "decay": 0.1, "freeze": "head-only"}),
    ("tune-t003", "Failed", None, {"lr": 3.0e-4, "decay": 0.0, "freeze": "head-only"}),
    ("tune-t004", "Running", 0.79, {"lr": 6.0e-5, "decay": 0.01, "freeze": "bottom-4"}),
]


def sweep_spec() -> Manifest:
    template = copy.deepcopy(job("template")["spec"])
    return {
        "objective": {"metric": "accuracy", "direction": "maximize", "goal": 0.95},
        "algorithm": {"name": "tpe", "seed": 42},
        "pruning": {"name": "median", "warmupEvaluations": 1, "startupTrials": 3},
        "parameters": copy.deepcopy(PARAMETERS),
        "trialTemplate": {"spec": template},
        "parallelism": 2,
        "maxTrials": 12,
        "maxFailedTrials": 3,
    }


def sweep_status(complete: bool = False) -> Manifest:
    conditions = [
        condition("Ready", "False", "TrialsRunning", "1 trial running"),
        condition("Reconciling", "True", "TrialsRunning", ""),
    ]
    if complete:
        conditions = [condition("Complete", "True", "MaxTrialsReached", "12 of 12 trials finished")]
    return {
        "observedGeneration": 1,
        "conditions": conditions,
        "trialCounts": {"total": 5, "running": 1, "succeeded": 2, "pruned": 1, "failed": 1},
        "bestTrial": {
            "name": "tune-t001",
            "value": 0.86,
            "step": 100,
            "checkpoint": "file:///out/tune/tune-t001/ckpt-100",
            "parameters": dict(TRIALS[1][3]),
        },
        "trials": [
            {"name": n, "phase": p, **({"value": v} if v is not None else {}), "parameters": dict(params)}
            for n, p, v, params in TRIALS
        ],
    }


def sweep(name: str = "tune", status: Manifest | None = None, namespace: str = "default") -> Manifest:
    manifest: Manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": T0},
        "spec": sweep_spec(),
    }
    if status is not None:
        manifest["status"] = status
    return manifest


def trial_status(phase: str, value: float | None) -> Manifest:
    """A trial FineTuneJob's status: its evaluations peak at ``value`` (step 100)."""
    if value is None:
        return {"phase": "Failed", "conditions": [condition("Failed", "True", "TrainerError", "exit 1")]}
    evaluations = [
        {"step": 50, "epoch": 1.0, "metrics": {"loss": 0.6, "accuracy": round(value - 0.05, 4)}},
        {"step": 100, "epoch": 2.0, "metrics": {"loss": 0.5, "accuracy": value}},
    ]
    status: Manifest = {"phase": phase, "startTime": T0, "evaluations": evaluations}
    if phase == "Pruned":
        status["phase"] = "Pruned"
        status["conditions"] = [condition("Complete", "True", "Pruned", "below the median of earlier trials")]
    elif phase == "Succeeded":
        status["conditions"] = [condition("Complete", "True", "Succeeded", "training finished")]
        status["best"] = {"metric": "accuracy", "value": value, "step": 100, "epoch": 2.0}
    else:
        status["conditions"] = [condition("Running", "True", "TrainerRunning", "training")]
    return status


def trial_jobs(sweep_name: str = "tune", namespace: str = "default") -> list[Manifest]:
    """The trial FineTuneJobs, labelled and annotated as the operator does, with their own status."""
    jobs = []
    for index, (name, phase, value, parameters) in enumerate(TRIALS):
        manifest = job(name.replace("tune", sweep_name, 1), trial_status(phase, value), namespace)
        manifest["metadata"]["labels"] = {SWEEP_LABEL: sweep_name, TRIAL_INDEX_LABEL: str(index)}
        manifest["metadata"]["annotations"] = {PARAMETERS_ANNOTATION: json.dumps(parameters)}
        jobs.append(manifest)
    return jobs
