"""The operator/trainer contract is stated once, and both sides keep to it: the status the trainer
writes is what the operator's status model and the admission policy accept, the key split is the
same in the policy, the operator's writes and the contract, and every environment name one side
sets the other reads."""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from finetune_operator.api.job import OPERATOR_STATUS_KEYS, FineTuneJob, FineTuneJobStatus
from finetune_operator.generators.crd import build_crd, render_policy
from finetune_operator.reconcile import Settings
from finetune_operator.reconcile.children import TERMINATION_GRACE_SECONDS, batch_job
from finetune_operator.reconcile.observe import OPERATOR_WRITES, status_patch
from finetune_trainer import contract
from finetune_trainer.config import RuntimeEnv
from finetune_trainer.contract import (
    MAX_ARTIFACTS,
    MAX_CHECKPOINT_URI_LENGTH,
    MAX_EVALUATIONS,
    MAX_METRIC_NAME_LENGTH,
    MAX_METRICS_PER_EVALUATION,
    OPERATOR_ENV,
    SHARED_STATUS_KEYS,
    TRAINER_STATUS_KEYS,
    USER_ENV,
    TrainerStatus,
    wire_keys,
)
from finetune_trainer.launch import GRACE_MARGIN_SECONDS, shutdown_timeout
from finetune_trainer.reporting import merge
from tests.manifests import baseline, trainer_status_at_the_bounds


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def test_what_the_trainer_writes_round_trips_through_the_operator_status() -> None:
    patch = trainer_status_at_the_bounds("pvc://runs/job").to_patch()
    assert set(patch) == set(TRAINER_STATUS_KEYS)
    old_best = {"metric": "old", "value": 1, "step": 1, "checkpoint": "x", "majorityBaseline": 0.3}
    stored: dict[str, Any] = {"phase": "Running", "best": old_best}
    merge(stored, patch)
    stored = _without_nulls(stored)  # what a JSON merge patch leaves: a null deletes
    status = FineTuneJobStatus.model_validate(stored)
    assert {key: status.to_wire()[key] for key in TRAINER_STATUS_KEYS} == {
        key: stored[key] for key in TRAINER_STATUS_KEYS
    }
    assert "majorityBaseline" not in status.to_wire()["best"]  # the trainer's null deleted the stale value


def _models(annotation: Any) -> set[type[BaseModel]]:
    """The pydantic models an annotation names (``list[X] | None`` -> {X})."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return {model for arg in typing.get_args(annotation) for model in _models(arg)}


def test_the_operator_status_embeds_the_trainers_models_and_bounds() -> None:
    for name in TrainerStatus.model_fields:
        trainer, operator = TrainerStatus.model_fields[name], FineTuneJobStatus.model_fields[name]
        assert _models(operator.annotation) == _models(trainer.annotation) != set(), name
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert schema["evaluations"]["maxItems"] == MAX_EVALUATIONS
    assert TrainerStatus.model_fields["evaluations"].metadata[0].max_length == MAX_EVALUATIONS


def test_the_key_split_is_the_contracts_in_the_policy_and_in_the_operators_writes() -> None:
    every = set(wire_keys(FineTuneJobStatus))
    assert set(TRAINER_STATUS_KEYS) <= every and set(SHARED_STATUS_KEYS) <= set(TRAINER_STATUS_KEYS)
    policy = next(yaml.safe_load_all(render_policy()))
    guarded = {
        v["message"].split(" ", 1)[0].removeprefix("status.")
        for v in policy["spec"]["validations"]
        if "is the operator's" in v["message"]
    }
    assert guarded == every - set(TRAINER_STATUS_KEYS) == set(OPERATOR_STATUS_KEYS)
    assert set(OPERATOR_WRITES) == (every - set(TRAINER_STATUS_KEYS)) | set(SHARED_STATUS_KEYS)
    bounds = " ".join(v["expression"] + v["message"] for v in policy["spec"]["validations"])
    for bound in (
        MAX_EVALUATIONS,
        MAX_METRICS_PER_EVALUATION,
        MAX_METRIC_NAME_LENGTH,
        MAX_CHECKPOINT_URI_LENGTH,
        MAX_ARTIFACTS,
    ):
        assert str(bound) in bounds


def test_the_operator_never_writes_the_trainers_own_keys() -> None:
    before = FineTuneJobStatus()
    trainer = trainer_status_at_the_bounds("pvc://runs/job").to_wire()
    after = FineTuneJobStatus.model_validate(trainer | {"phase": "Running"})
    patch = status_patch(before, after)
    assert set(patch) == {"phase", "best"}


class Recording(Mapping[str, str]):
    """An environment that remembers which names were looked up."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.read = values, set[str]()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the trainer looks names up; it never lists the environment")

    def __len__(self) -> int:
        return len(self.values)


def _trainer_env(settings: Settings) -> list[dict[str, Any]]:
    manifest = baseline("envs")
    manifest["metadata"].update({"namespace": "ml", "uid": "uid-1"})
    manifest["spec"]["model"].update({"source": "hf://org/model", "tokenSecretRef": {"name": "hf"}})
    manifest["spec"]["dataset"].update({"source": "hf://datasets/org/data", "tokenSecretRef": {"name": "hf-data"}})
    manifest["spec"]["resources"] = {"cpu": 4, "gpuMemory": "24Gi"}
    env: list[dict[str, Any]] = batch_job(FineTuneJob.model_validate(manifest), settings)["spec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    return env


def test_every_env_name_the_operator_sets_the_trainer_reads_and_back() -> None:
    settings = Settings(trainer_metrics_port=9911, report_interval_seconds=7, pvc_root="/claims")
    rendered = _trainer_env(settings)
    ours = {e["name"] for e in rendered if e["name"].startswith("FINETUNE_") or e["name"] in OPERATOR_ENV}
    assert ours == OPERATOR_ENV
    values = {e["name"]: e.get("value", f"<{e['name']}>") for e in rendered} | {contract.CPU_REQUEST_ENV: "4"}
    environ = Recording(values)
    env = RuntimeEnv.from_environ(environ)
    assert shutdown_timeout(environ) == TERMINATION_GRACE_SECONDS - GRACE_MARGIN_SECONDS  # the torchrun launcher's
    # FINETUNE_CPU_REQUEST is the data loaders' (finetune_trainer.speed.available_cpus, tests/trainer/test_speed.py)
    assert environ.read | {contract.CPU_REQUEST_ENV} == OPERATOR_ENV | USER_ENV
    assert (env.job_name, env.job_namespace, env.job_uid) == ("envs", f"<{contract.JOB_NAMESPACE_ENV}>", "uid-1")
    assert (env.metrics_port, env.report_interval_seconds, env.pvc_root) == (9911, 7.0, Path("/claims"))
    assert env.gpu_memory == 24 * 2**30  # the memory plan's GPU, from resources.gpuMemory


def test_both_sides_default_alike() -> None:
    settings, env = Settings(), RuntimeEnv()
    assert settings.trainer_metrics_port == env.metrics_port == contract.DEFAULT_METRICS_PORT
    assert settings.report_interval_seconds == env.report_interval_seconds == contract.DEFAULT_REPORT_INTERVAL_SECONDS
    assert Path(settings.pvc_root) == env.pvc_root == Path(contract.DEFAULT_PVC_ROOT)
    assert RuntimeEnv.from_environ({}) == env
    chart = yaml.safe_load((Path(__file__).resolve().parents[2] / "charts/finetune-operator/values.yaml").read_text())
    assert chart["trainerMetricsPort"] == contract.DEFAULT_METRICS_PORT
