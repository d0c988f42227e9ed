"""FineTuneJob objects with hand-written status, shared by the unit and integration tests of the plugin."""

from __future__ import annotations

import copy
from typing import Any

from finetune_trainer.early_stopping import EarlyStoppingState, Evaluated, explain, observe_all
from finetune_trainer.spec import TrainingSpec
from tests.manifests import baseline

Manifest = dict[str, Any]
T0 = "2026-01-01T00:00:00Z"


def condition(type_: str, status: str, reason: str, message: str = "", time: str = T0) -> Manifest:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": time}


def evaluations() -> list[Manifest]:
    """Three evaluations of the baseline job (monitors accuracy, max): the best is at step 100."""
    return [
        {"step": 50, "epoch": 0.5, "metrics": {"loss": 0.62, "accuracy": 0.71, "f1": 0.69}},
        {"step": 100, "epoch": 1.0, "metrics": {"loss": 0.41, "accuracy": 0.86, "f1": 0.85}},
        {"step": 150, "epoch": 1.5, "metrics": {"loss": 0.45, "accuracy": 0.84, "f1": 0.83}},
    ]


def running_status() -> Manifest:
    return {
        "phase": "Running",
        "conditions": [condition("Running", "True", "TrainerRunning", "training")],
        "startTime": T0,
        "progress": {
            "step": 150,
            "totalSteps": 300,
            "epoch": 1.5,
            "totalEpochs": 3,
            "percent": 50.0,
            "etaSeconds": 200,
            "samplesPerSecond": 42.5,
            "trainLoss": 0.3812,
            "learningRate": 2e-5,
            "lastHeartbeatTime": T0,
        },
        "evaluations": evaluations(),
        "best": {"metric": "accuracy", "value": 0.86, "step": 100, "epoch": 1.0, "checkpoint": "file:///out/ckpt-100"},
        "earlyStopping": {
            "metric": "accuracy",
            "mode": "max",
            "patience": 2,
            "bestValue": 0.86,
            "bestStep": 100,
            "evaluationsWithoutImprovement": 1,
        },
        "workload": {"job": "demo-trainer"},
    }


def _stopped_reason() -> str:
    """What the operator writes when the baseline's rule fires: the shared rule's own words."""
    rule = TrainingSpec.model_validate(baseline("demo")["spec"]).early_stopping
    assert rule is not None
    evaluated = [Evaluated(r["step"], r["metrics"]["accuracy"]) for r in evaluations()]
    evaluated.append(Evaluated(200, 0.85))
    state = observe_all(rule, EarlyStoppingState(), evaluated)
    assert state.triggered
    return explain(rule, state)


def early_stopped_status() -> Manifest:
    status = running_status()
    reason = _stopped_reason()
    status["phase"] = "EarlyStopped"
    status["conditions"] = [
        condition("Running", "False", "EarlyStopped", reason),
        condition("Complete", "True", "EarlyStopped", reason),
    ]
    status["earlyStopping"].update(triggered=True, reason=reason, evaluationsWithoutImprovement=2)
    status["progress"].update(step=200, percent=66.7, epoch=2.0)
    status["evaluations"].append({"step": 200, "epoch": 2.0, "metrics": {"loss": 0.47, "accuracy": 0.85, "f1": 0.84}})
    return status


def failed_status() -> Manifest:
    status = running_status()
    status["phase"] = "Failed"
    status["conditions"] = [condition("Failed", "True", "TrainerError", "trainer exited with code 1: CUDA OOM")]
    return status


def job(name: str = "demo", status: Manifest | None = None, namespace: str = "default") -> Manifest:
    """The shared baseline manifest as the API server returns it (with metadata and optional status)."""
    manifest = copy.deepcopy(baseline(name))
    manifest["metadata"].update(namespace=namespace, creationTimestamp=T0)
    if status is not None:
        manifest["status"] = status
    return manifest
