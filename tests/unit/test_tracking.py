"""spec.tracking and status.tracking (issue 28): the pure parts. The MLflow side runs against a real server in
tests/e2e/test_tracking.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_operator.api.job import FineTuneJob, TrackingStatus
from finetune_operator.api.sweep import NOT_SWEEPABLE, SWEEPABLE_PATHS
from finetune_operator.reconcile import Observed, ObservedJob, Settings, decide
from finetune_operator.reconcile.children import batch_job
from finetune_trainer.contract import TRACKING_SECRET_KEYS
from finetune_trainer.tracking import JobIdentity, flatten
from tests.manifests import baseline

NOW = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
TRACKING = {"uri": "http://mlflow.ml:5000", "registerAs": "sentiment", "credentialsSecretRef": {"name": "mlflow"}}


def job(**spec: Any) -> FineTuneJob:
    manifest = baseline("sentiment")
    manifest["metadata"].update({"namespace": "ml", "uid": "uid-1", "generation": 1})
    manifest["spec"].update(spec)
    return FineTuneJob.model_validate(manifest)


def test_the_trainer_gets_only_the_mlflow_keys_of_the_credentials_secret_each_optional() -> None:
    env = batch_job(job(tracking=TRACKING), Settings())["spec"]["template"]["spec"]["containers"][0]["env"]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert from_secret == {key: {"name": "mlflow", "key": key, "optional": True} for key in TRACKING_SECRET_KEYS}
    plain = batch_job(job(tracking={"uri": "http://mlflow.ml:5000"}), Settings())
    assert not any("MLFLOW" in e["name"] for e in plain["spec"]["template"]["spec"]["containers"][0]["env"])


def test_register_as_needs_a_saved_model() -> None:
    with pytest.raises(ValidationError, match=r"tracking\.registerAs needs output\.saveFinalModel"):
        job(tracking=TRACKING, output={"location": "pvc://out/x", "saveFinalModel": False})
    with pytest.raises(ValidationError, match="uri"):
        job(tracking={"uri": "mlflow.ml:5000"})


def test_tracking_behind_is_a_condition_and_a_warning_even_after_the_job_finished() -> None:
    ftj = job(tracking=TRACKING)
    ftj.status.tracking = TrackingStatus(run_id="r1", behind=True, message="MLflow at http://mlflow: refused")
    running = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW)
    behind = next(c for c in running.status.conditions if c.type == "TrackingBehind")
    assert (behind.status, behind.reason, behind.message) == (
        "True",
        "TrackingBehind",
        "MLflow at http://mlflow: refused",
    )
    assert [(e.type, e.reason) for e in running.events if e.reason.startswith("Tracking")] == [
        ("Warning", "TrackingBehind")
    ]
    ftj.status = running.status
    again = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW)
    assert not [e for e in again.events if e.reason.startswith("Tracking")], "one Event per fall"
    ftj.status = decide(ftj, Observed(job=ObservedJob(succeeded=1, complete=True)), NOW).status
    assert any(c.type == "Complete" and c.status == "True" for c in ftj.status.conditions)
    ftj.status.tracking = TrackingStatus(run_id="r1", behind=False)  # caught up while finishing
    synced = decide(ftj, Observed(job=ObservedJob(succeeded=1, complete=True)), NOW).status
    assert [(c.status, c.reason) for c in synced.conditions if c.type == "TrackingBehind"] == [
        ("False", "TrackingSynced")
    ]


def test_params_are_the_spec_fields_by_the_paths_a_sweep_sets() -> None:
    spec = job(tracking=TRACKING).spec.to_wire()
    flat = flatten(spec)
    lists = {key for key, value in flat.items() if value.startswith("[")}
    assert set(flat) - lists <= set(SWEEPABLE_PATHS) | NOT_SWEEPABLE, "every scalar param is a sweepable path"
    assert {"hyperparameters.learningRate", "freeze.strategy", "tracking.registerAs"} <= set(flat)
    assert flat["hyperparameters.learningRate"] == str(spec["hyperparameters"]["learningRate"])
    assert flat["evaluation.metrics"] == '["loss", "accuracy"]'


def test_a_trial_knows_its_sweep_from_its_owner() -> None:
    trial = {
        "metadata": {
            "uid": "t-uid",
            "annotations": {"finetune.dev/parameters": '{"lr": 0.001}'},
            "ownerReferences": [{"kind": "FineTuneSweep", "name": "lr", "uid": "s-uid", "controller": True}],
        },
        "spec": {"a": 1},
    }
    who = JobIdentity.of(trial, "lr-t000", "ml", "t-uid", {})
    assert (who.sweep_name, who.sweep_uid, dict(who.trial_parameters), who.spec) == (
        "lr",
        "s-uid",
        {"lr": 0.001},
        {"a": 1},
    )
    alone = JobIdentity.of({"metadata": {}, "spec": {"a": 1}}, "j", "ml", "u", {})
    assert alone.sweep_uid is None and not alone.trial_parameters
