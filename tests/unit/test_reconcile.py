"""The pure reconcile core: children from a spec, status from what is observed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from finetune_operator.api.job import EvaluationRecord, FineTuneJob, FineTuneJobStatus, Progress, read_stored
from finetune_operator.reconcile import Observed, ObservedJob, ObservedPod, Settings, decide, desired_children
from finetune_operator.reconcile.children import (
    JOB_LABEL,
    Names,
    batch_job,
    config_map,
    headless_service,
    owned_by,
    owner_name,
    role,
)
from finetune_operator.reconcile.observe import (
    LAST_APPLIED_ANNOTATION,
    finetunejob_essentials,
    observe_job,
    observe_pod,
    spec_hash_of,
    status_patch,
    trainer_job_essentials,
)
from finetune_operator.reconcile.status import copy_status, not_understood, set_condition
from finetune_trainer.contract import TERMINATION_GRACE_ENV
from finetune_trainer.launch import GRACE_MARGIN_SECONDS, shutdown_timeout
from finetune_trainer.reporting import stop_request_of
from finetune_trainer.spec import TrainingSpec
from tests.manifests import baseline, trainer_status_at_the_bounds

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SETTINGS = Settings()


def job(**spec: Any) -> FineTuneJob:
    manifest = baseline("sentiment")
    manifest["metadata"].update({"namespace": "ml", "uid": "uid-1", "generation": 1})
    manifest["spec"].update(spec)
    return FineTuneJob.model_validate(manifest)


def kinds(children: list[dict[str, Any]]) -> list[str]:
    return [c["kind"] for c in children]


def test_children_are_owned_deterministic_and_ordered() -> None:
    first = desired_children(job(), SETTINGS)
    assert kinds(first) == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]
    assert first == desired_children(job(), SETTINGS)
    for child in first:
        owner = child["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "FineTuneJob"
        assert owner["uid"] == "uid-1"
        assert owner["controller"] is True
        assert child["metadata"]["namespace"] == "ml"


def test_config_map_holds_exactly_the_training_spec() -> None:
    data = yaml.safe_load(config_map(job())["data"]["config.yaml"])
    assert TrainingSpec.model_validate(data).freeze.layers == 2
    assert "resources" not in data
    assert "suspend" not in data


def test_role_names_only_its_own_job() -> None:
    rules = role(job())["rules"]
    assert all(rule["resourceNames"] == ["sentiment"] for rule in rules)
    verbs = {verb for rule in rules for verb in rule["verbs"]}
    assert verbs == {"get", "patch"}
    assert {r for rule in rules for r in rule["resources"]} == {"finetunejobs", "finetunejobs/status"}


def test_pod_meets_the_restricted_pod_security_standard() -> None:
    pod = batch_job(job(), SETTINGS)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    allowed = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected", "downwardAPI"}
    assert all(set(volume) - {"name"} <= allowed for volume in pod["volumes"])


def test_job_does_not_retry_configuration_errors() -> None:
    spec = batch_job(job(backoffLimit=5), SETTINGS)["spec"]
    assert spec["backoffLimit"] == 5
    fail_rule = spec["podFailurePolicy"]["rules"][0]
    assert fail_rule["action"] == "FailJob"
    assert fail_rule["onExitCodes"]["values"] == [2, 3, 4, 5, 6, 7]
    container = spec["template"]["spec"]["containers"][0]
    assert "command" not in container, "single-process pods run the image's entrypoint"
    assert container["args"] == ["--config", "/etc/finetune/config.yaml"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_pvc_sources_are_mounted_and_token_comes_from_the_secret() -> None:
    manifest = baseline("hub")
    manifest["spec"]["model"] = {
        "source": "hf://org/model",
        "task": "sequence-classification",
        "numLabels": 2,
        "tokenSecretRef": {"name": "hf"},
    }
    manifest["spec"]["dataset"]["source"] = "pvc://data/rt"
    manifest["spec"]["output"]["location"] = "pvc://models/out"
    pod = batch_job(FineTuneJob.model_validate(manifest), SETTINGS)["spec"]["template"]["spec"]
    claims = sorted(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claims == ["data", "models"]
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert "value" not in env["HF_TOKEN"]
    assert "FINETUNE_DATASET_HF_TOKEN" not in env, "no dataset token Secret: the model's token serves both"


def test_a_hub_dataset_gets_a_token_of_its_own() -> None:
    manifest = baseline("hubdata")
    manifest["spec"]["dataset"] = {
        "source": "hf://datasets/org/private",
        "subset": "sst2",
        "revision": "v1.0",
        "tokenSecretRef": {"name": "data-token", "key": "hf"},
        "train": "train",
    }
    pod = batch_job(FineTuneJob.model_validate(manifest), SETTINGS)["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["FINETUNE_DATASET_HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "data-token", "key": "hf"}
    assert "HF_TOKEN" not in env and "value" not in env["FINETUNE_DATASET_HF_TOKEN"]


@pytest.mark.parametrize(
    ("model", "dataset", "output", "read_only"),
    [
        ("pvc://models/base", "pvc://data/rt", "pvc://runs/out", {"models": True, "data": True, "runs": False}),
        ("pvc://shared/base", "pvc://shared/rt", "pvc://shared/out", {"shared": False}),  # source and output
        ("pvc://models/base", "file:///data/rt", "pvc://models/out", {"models": False}),
    ],
    ids=["sources-read-only", "one-claim-for-all", "model-claim-is-the-output"],
)
def test_a_claim_only_read_is_mounted_read_only(
    model: str, dataset: str, output: str, read_only: dict[str, bool]
) -> None:
    """On main every claim was mounted read-write: a trainer could alter its (and its neighbours') sources."""
    manifest = baseline("claims")
    manifest["spec"]["model"]["source"] = model
    manifest["spec"]["dataset"]["source"] = dataset
    manifest["spec"]["output"]["location"] = output
    pod = batch_job(FineTuneJob.model_validate(manifest), SETTINGS)["spec"]["template"]["spec"]
    volumes = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    mounts = {
        volumes[m["name"]]: m.get("readOnly", False)
        for m in pod["containers"][0]["volumeMounts"]
        if m["name"] in volumes
    }
    assert mounts == read_only


def test_s3_credentials_come_from_each_roles_secret_and_the_cache_claim_is_mounted() -> None:
    manifest = baseline("s3")
    manifest["spec"]["model"]["source"] = "s3://models/bert"
    manifest["spec"]["dataset"].update({"source": "s3://data/rt", "s3": {"credentialsSecretRef": {"name": "data"}}})
    manifest["spec"]["output"]["location"] = "s3://runs/out"
    manifest["spec"]["storage"] = {
        "s3": {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "s3"}},
        "cache": {"location": "pvc://shared-cache/s3"},
    }
    pod = batch_job(FineTuneJob.model_validate(manifest), SETTINGS)["spec"]["template"]["spec"]
    claims = sorted(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claims == ["shared-cache"], "an s3:// output needs no volume; the shared cache is a claim"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"] if "AWS_" in e["name"]}
    assert env["FINETUNE_S3_MODEL_AWS_ACCESS_KEY_ID"] == {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["FINETUNE_S3_DATASET_AWS_SECRET_ACCESS_KEY"] == {"name": "data", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["FINETUNE_S3_OUTPUT_AWS_SESSION_TOKEN"] == {"name": "s3", "key": "AWS_SESSION_TOKEN", "optional": True}
    assert len(env) == 9


def test_s3_without_a_secret_uses_the_pods_identity() -> None:
    manifest = baseline("irsa")
    manifest["spec"]["output"]["location"] = "s3://runs/out"
    pod = batch_job(FineTuneJob.model_validate(manifest), SETTINGS)["spec"]["template"]["spec"]
    assert not [e for e in pod["containers"][0]["env"] if "AWS_" in e["name"]]


def test_multi_node_is_an_indexed_job_with_a_headless_service() -> None:
    multi = job(resources={"nodes": 3, "gpusPerNode": 8})
    children = desired_children(multi, SETTINGS)
    assert "Service" in kinds(children)
    spec = batch_job(multi, SETTINGS)["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "finetune_trainer.launch"], "torchrun, keeping the exit codes"
    assert "--node-rank=$(NODE_RANK)" in container["args"]
    assert spec["template"]["spec"]["subdomain"] == Names.of("sentiment").service


def test_the_trainer_knows_its_grace_period() -> None:
    """torchrun's shutdown timeout comes from the pod's own grace period (one value, not two)."""
    pod = batch_job(job(resources={"nodes": 2}), SETTINGS)["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env[TERMINATION_GRACE_ENV] == str(pod["terminationGracePeriodSeconds"])
    assert shutdown_timeout(env) == pod["terminationGracePeriodSeconds"] - GRACE_MARGIN_SECONDS


def test_long_names_stay_valid() -> None:
    names = Names.of("x" * 120)
    assert len(names.job) <= 63
    assert names.job != Names.of("x" * 119).job


def test_suspend_toggles_the_job_without_changing_its_hash() -> None:
    running = batch_job(job(), SETTINGS)
    suspended = batch_job(job(suspend=True), SETTINGS)
    assert suspended["spec"]["suspend"] is True
    assert running["metadata"]["annotations"] == suspended["metadata"]["annotations"]


def _with_evals(ftj: FineTuneJob, values: list[float]) -> FineTuneJob:
    ftj.status.evaluations = [
        EvaluationRecord(step=10 * i, metrics={"loss": 1.0, "accuracy": v}, time=NOW) for i, v in enumerate(values, 1)
    ]
    return ftj


def conditions(decision_status: Any) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in decision_status.conditions}


def test_pending_then_running_with_progress() -> None:
    ftj = job()
    pending = decide(ftj, Observed(job=ObservedJob()), NOW)
    assert pending.status.phase == "Pending"
    ftj.status = pending.status
    ftj.status.progress = Progress(step=5, total_steps=50, epoch=0.5, train_loss=0.7, last_heartbeat_time=NOW)
    running = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW)
    assert running.status.phase == "Running"
    assert conditions(running.status)["Running"] == ("True", "TrainerRunning")
    assert [e.reason for e in running.events] == ["TrainerRunning"]
    assert running.status.message == "training; no evaluation yet"
    assert running.status.observed_generation == 1


def test_progress_reports_alone_cause_no_status_write() -> None:
    """Every trainer report is a watch event; only a new best result changes what the operator owns."""
    ftj = job()
    ftj.status.progress = Progress(step=5, total_steps=50, train_loss=0.7, last_heartbeat_time=NOW)
    ftj.status = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW).status
    later = NOW + timedelta(seconds=5)
    ftj.status.progress = Progress(step=6, total_steps=50, train_loss=0.6, last_heartbeat_time=later)
    assert (
        status_patch(
            ftj.status, decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), later).status
        )
        == {}
    )

    _with_evals(ftj, [0.7])
    improved = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), later).status
    assert improved.message == "training; best accuracy 0.7 at step 10"
    assert set(status_patch(ftj.status, improved)) == {"earlyStopping", "best", "message", "conditions"}


def test_cached_essentials_observe_the_same() -> None:
    """The caches keep only what a reconcile reads; a reconcile must not tell the difference."""
    ftj = job()
    wire = ftj.model_dump(mode="json", by_alias=True, exclude_none=True)
    wire["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    wire["metadata"]["annotations"] = {LAST_APPLIED_ANNOTATION: "{}", "finetune.dev/stop-requested": "true"}
    slim = finetunejob_essentials(wire)
    assert "managedFields" not in slim["metadata"] and "managedFields" in wire["metadata"]
    assert FineTuneJob.model_validate(slim).metadata.annotations == {"finetune.dev/stop-requested": "true"}
    assert FineTuneJob.model_validate(slim).spec == ftj.spec

    trainer = batch_job(ftj, SETTINGS, suspend=True)
    trainer["status"] = {"active": 1, "startTime": "2026-11-23T12:00:00Z", "conditions": []}
    assert observe_job(trainer_job_essentials(trainer)) == observe_job(trainer)
    assert spec_hash_of(trainer_job_essentials(trainer)) == spec_hash_of(trainer) is not None


def test_stalled_when_heartbeats_stop() -> None:
    ftj = job(stallTimeoutSeconds=60)
    ftj.status.progress = Progress(step=5, last_heartbeat_time=NOW - timedelta(seconds=61))
    decision = decide(ftj, Observed(job=ObservedJob(active=1, ready=1)), NOW)
    assert decision.status.phase == "Stalled"
    assert conditions(decision.status)["Stalled"] == ("True", "NoProgress")


def test_early_stopping_requests_stop_then_enforces_after_grace() -> None:
    ftj = _with_evals(job(stopGracePeriodSeconds=30), [0.6, 0.7, 0.65, 0.66])
    first = decide(ftj, Observed(job=ObservedJob(active=1, ready=1)), NOW)
    assert first.status.early_stopping is not None
    assert first.status.early_stopping.triggered
    assert first.status.early_stopping.best_step == 20
    assert first.status.stop_request is not None
    assert first.status.stop_request.reason == "EarlyStopped"
    assert not first.halt_trainer_job
    assert "EarlyStopped" in [e.reason for e in first.events]

    ftj.status = first.status
    later = decide(ftj, Observed(job=ObservedJob(active=1, ready=1)), NOW + timedelta(seconds=31))
    assert later.halt_trainer_job
    assert "StopEnforced" in [e.reason for e in later.events]

    ftj.status = later.status
    saving = decide(
        ftj, Observed(job=ObservedJob(suspended=True, active=0, terminating=1)), NOW + timedelta(seconds=35)
    )
    assert "Complete" not in conditions(saving.status), "a halted trainer still saving is not the end yet"
    assert saving.trainer_job_wanted and "waiting for the trainer's pods" in (saving.status.message or "")
    assert saving.halt_trainer_job, "the halted Job must stay suspended while its pods terminate"

    ftj.status = saving.status
    halted = decide(ftj, Observed(job=ObservedJob(suspended=True, active=0)), NOW + timedelta(seconds=40))
    assert halted.status.phase == "EarlyStopped"
    assert conditions(halted.status)["Complete"] == ("True", "StopEnforced"), "halted, not stopped by itself"
    complete = next(c for c in halted.status.conditions if c.type == "Complete")
    assert "final model may not have been written" in complete.message
    assert not halted.trainer_job_wanted


def test_a_finalizing_trainer_gets_twice_the_grace() -> None:
    ftj = _with_evals(job(stopGracePeriodSeconds=30), [0.6, 0.7, 0.65, 0.66])
    ftj.status = decide(ftj, Observed(job=ObservedJob(active=1, ready=1)), NOW).status
    ftj.status.progress = Progress(step=40, finalizing=True)
    assert not decide(ftj, Observed(job=ObservedJob(active=1, ready=1)), NOW + timedelta(seconds=45)).halt_trainer_job
    assert decide(ftj, Observed(job=ObservedJob(active=1, ready=1)), NOW + timedelta(seconds=61)).halt_trainer_job


def test_trainer_that_stops_itself_completes_as_early_stopped() -> None:
    ftj = _with_evals(job(), [0.6, 0.7, 0.65, 0.66])
    decision = decide(ftj, Observed(job=ObservedJob(complete=True, succeeded=1)), NOW)
    assert conditions(decision.status)["Complete"] == ("True", "EarlyStopped")
    assert "best 0.7 at step 20" in (decision.status.message or "")


def test_success_and_terminal_states_are_sticky() -> None:
    ftj = job()
    done = decide(ftj, Observed(job=ObservedJob(complete=True, succeeded=1)), NOW)
    assert conditions(done.status)["Complete"] == ("True", "Succeeded")
    ftj.status = done.status
    replay = decide(ftj, Observed(job=None), NOW + timedelta(hours=1))
    assert replay.status.phase == "Succeeded"
    assert not replay.trainer_job_wanted
    assert replay.events == []


def test_permanent_exit_code_is_the_failure_reason() -> None:
    pods = (
        ObservedPod(
            "p1", "Failed", exit_code=3, reason="Error", message="dataset.train: no such file", finished_at=NOW
        ),
    )
    failed = ObservedJob(failed=1, failed_condition=True, failed_reason="PodFailurePolicy")
    decision = decide(job(), Observed(job=failed, pods=pods), NOW)
    assert conditions(decision.status)["Failed"] == ("True", "DataError")
    assert "no such file" in (decision.status.message or "")
    assert decision.events[0].type == "Warning"


def test_backoff_limit_reports_the_last_exit() -> None:
    pods = tuple(
        ObservedPod(
            f"p{i}", "Failed", exit_code=1, reason="Error", message=f"crash {i}", finished_at=NOW + timedelta(seconds=i)
        )
        for i in range(3)
    )
    failed = ObservedJob(failed=3, failed_condition=True, failed_reason="BackoffLimitExceeded")
    decision = decide(job(), Observed(job=failed, pods=pods), NOW)
    assert conditions(decision.status)["Failed"] == ("True", "BackoffLimitExceeded")
    assert "crash 2" in (decision.status.message or "")
    assert decision.status.restarts == 3


def test_suspended() -> None:
    decision = decide(job(suspend=True), Observed(job=ObservedJob(suspended=True)), NOW)
    assert decision.status.phase == "Suspended"
    assert conditions(decision.status)["Suspended"] == ("True", "Suspended")


def test_user_stop_annotation() -> None:
    ftj = job()
    ftj.metadata.annotations["finetune.dev/stop-requested"] = "true"
    decision = decide(ftj, Observed(job=ObservedJob(active=1)), NOW)
    assert decision.status.stop_request is not None
    assert decision.status.stop_request.reason == "UserRequested"
    ftj.status = decision.status
    done = decide(ftj, Observed(job=ObservedJob(complete=True)), NOW)
    assert conditions(done.status)["Complete"] == ("True", "Stopped")


def test_a_sweep_prunes_a_trial_through_the_stop_request_path() -> None:
    ftj = job()
    ftj.metadata.annotations.update({"finetune.dev/stop-requested": "true", "finetune.dev/stop-reason": "Pruned"})
    decision = decide(ftj, Observed(job=ObservedJob(active=1)), NOW)
    assert decision.status.stop_request is not None and decision.status.stop_request.reason == "Pruned"
    ftj.status = decision.status
    done = decide(ftj, Observed(job=ObservedJob(complete=True)), NOW)
    assert conditions(done.status)["Complete"] == ("True", "Pruned")
    assert done.status.phase == "Pruned"
    # The trainer honours a stop request whatever its reason.
    assert stop_request_of({"status": done.status.to_wire()}) == {
        "reason": "Pruned",
        "message": "its sweep judged it unpromising",
    }


def test_a_finished_sweep_stops_a_running_trial_which_completes_stopped() -> None:
    ftj = job()
    ftj.metadata.annotations.update(
        {"finetune.dev/stop-requested": "true", "finetune.dev/stop-reason": "SweepFinished"}
    )
    decision = decide(ftj, Observed(job=ObservedJob(active=1)), NOW)
    assert decision.status.stop_request is not None
    assert (decision.status.stop_request.reason, decision.status.stop_request.message) == (
        "SweepFinished",
        "its sweep has finished",
    )
    ftj.status = decision.status
    done = decide(ftj, Observed(job=ObservedJob(complete=True)), NOW)
    assert conditions(done.status)["Complete"] == ("True", "Stopped")
    assert done.status.message == "stopped on request: its sweep has finished"


def test_backoff_failure_counts_the_failed_pod_before_the_job_does() -> None:
    """The Job's FailureTarget condition comes before its status.failed counts the pod; the
    message is final (terminal states are sticky), so it must not say "failed 0 times"."""
    pods = (ObservedPod("p0", "Failed", exit_code=1, reason="Error", message="crash", finished_at=NOW),)
    target = ObservedJob(failed=0, failed_condition=True, failed_reason="BackoffLimitExceeded")
    decision = decide(job(backoffLimit=0), Observed(job=target, pods=pods), NOW)
    assert (decision.status.message or "").startswith("trainer failed 1 time; last trainer exit code 1")


# --- Hardening (issue #12) ---------------------------------------------------------------


def test_a_config_edited_while_suspended_changes_the_job_hash() -> None:
    """The Job is replaced on resume only when its hash moves; the config must move it."""
    before = batch_job(job(), SETTINGS)
    edited = job(hyperparameters={"learningRate": 1e-3, "batchSize": 8, "epochs": 1})
    after = batch_job(edited, SETTINGS)
    assert spec_hash_of(before) != spec_hash_of(after)
    assert spec_hash_of(config_map(job())) != spec_hash_of(config_map(edited))


def test_stored_objects_are_read_tolerantly_new_ones_strictly() -> None:
    manifest = baseline("skewed")
    manifest["metadata"].update({"namespace": "ml", "uid": "uid-1"})
    manifest["spec"]["someNewField"] = {"a": 1}  # a newer CRD's defaulted field
    manifest["spec"]["hyperparameters"]["newKnob"] = 3
    with pytest.raises(ValidationError):
        FineTuneJob.model_validate(manifest)
    assert read_stored(manifest).spec.hyperparameters.learning_rate > 0
    manifest["spec"]["hyperparameters"]["learningRate"] = -1  # wrong, not newer
    with pytest.raises(ValidationError):
        read_stored(manifest)


def test_a_started_job_the_operator_cannot_read_is_left_alone() -> None:
    ftj = job()
    ftj.status = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW).status
    first = not_understood(ftj.status, "spec.x: bad", NOW)
    assert first.status.conditions == ftj.status.conditions, "no Failed, nothing abandoned"
    assert [e.reason for e in first.events] == ["SpecNotUnderstood"]
    assert not_understood(first.status, "spec.x: bad", NOW).events == [], "said once"


def test_a_child_owned_by_someone_else_stalls_the_job() -> None:
    conflict = "Job sentiment-trainer exists and is controlled by FineTuneJob sentiment (uid old)"
    decision = decide(job(), Observed(job=None, conflicts=(conflict,)), NOW)
    assert conditions(decision.status)["Stalled"] == ("True", "OwnershipConflict")
    assert "Complete" not in conditions(decision.status)
    assert decision.events[0].type == "Warning"
    assert conflict in (decision.status.message or "")
    resolved = job()
    resolved.status = decision.status
    running = decide(resolved, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW)
    assert conditions(running.status)["Stalled"][0] == "False"
    resolved.spec.suspend = True
    suspended = decide(resolved, Observed(job=ObservedJob(suspended=True)), NOW)
    assert conditions(suspended.status)["Stalled"][0] == "False"


def test_ownership_is_the_controllers_uid() -> None:
    ours = config_map(job())
    assert owned_by(ours, job())
    other = job()
    other.metadata.uid = "uid-2"  # same name, a new object (deleted and applied again)
    assert not owned_by(ours, other)
    assert owner_name(ours) == "sentiment"


def test_a_refused_child_is_a_condition_with_the_api_message() -> None:
    message = "ConfigMap sentiment-config: exceeded quota: q, requested: count/configmaps=1"
    decision = decide(job(), Observed(job=None, create_errors=(message,)), NOW)
    assert conditions(decision.status)["Stalled"] == ("True", "CreateFailed")
    assert decision.events[0].type == "Warning" and message in decision.events[0].message


def test_the_ttl_is_set_on_the_job_only_after_its_result_is_recorded() -> None:
    ftj = job(ttlSecondsAfterFinished=0)
    trainer = batch_job(ftj, SETTINGS)
    assert "ttlSecondsAfterFinished" not in trainer["spec"], "the Job controller must not delete an unread result"

    def observed(status: dict[str, Any]) -> Observed:
        return Observed(job=observe_job(trainer_job_essentials({**trainer, "status": status})))

    running = decide(ftj, observed({"active": 1, "ready": 1}), NOW)
    assert running.ttl_seconds_after_finished is None
    complete = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    done = decide(ftj, observed(complete), NOW)
    assert done.ttl_seconds_after_finished == 0 and not done.delete_trainer_job
    trainer["spec"]["ttlSecondsAfterFinished"] = 0
    assert decide(ftj, observed(complete), NOW).ttl_seconds_after_finished is None, "set once"
    assert decide(job(), observed(complete), NOW).ttl_seconds_after_finished is None, "no TTL asked for"


def test_running_means_a_ready_pod_and_pending_says_why() -> None:
    unschedulable = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes: gpu"}
            ],
        },
    }
    pod = observe_pod(unschedulable)
    ftj = job(stallTimeoutSeconds=60)
    waiting = decide(ftj, Observed(job=ObservedJob(active=1, start_time=NOW), pods=(pod,)), NOW)
    assert waiting.status.phase == "Pending"
    assert conditions(waiting.status)["Running"] == ("False", "Unschedulable")
    assert "0/1 nodes" in (waiting.status.message or "")
    ftj.status = waiting.status
    later = decide(ftj, Observed(job=ObservedJob(active=1, start_time=NOW), pods=(pod,)), NOW + timedelta(seconds=61))
    assert conditions(later.status)["Stalled"] == ("True", "Unschedulable")
    assert later.status.phase == "Pending"


def test_image_pull_backoff_is_the_pending_reason() -> None:
    pulling = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff"}}}],
        },
    }
    decision = decide(job(), Observed(job=ObservedJob(active=1, start_time=NOW), pods=(observe_pod(pulling),)), NOW)
    assert conditions(decision.status)["Running"] == ("False", "ImagePullBackOff")


def test_the_stall_clock_restarts_with_the_job() -> None:
    ftj = job(stallTimeoutSeconds=60)
    ftj.status.progress = Progress(step=5, last_heartbeat_time=NOW - timedelta(hours=3))  # before a suspension
    resumed = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW - timedelta(seconds=10))), NOW)
    assert resumed.status.phase == "Running"


def test_a_stop_on_a_pending_job_completes() -> None:
    ftj = job()
    ftj.metadata.annotations["finetune.dev/stop-requested"] = "true"
    first = decide(ftj, Observed(job=ObservedJob(active=1, start_time=NOW)), NOW)
    assert first.halt_trainer_job, "nothing runs that could save: no grace period to wait"
    ftj.status = first.status
    done = decide(ftj, Observed(job=ObservedJob(suspended=True)), NOW)
    assert conditions(done.status)["Complete"] == ("True", "Stopped")


def test_never_suspended_jobs_have_no_suspended_condition() -> None:
    decision = decide(job(), Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW)
    assert "Suspended" not in conditions(decision.status)
    ftj = job(suspend=True)
    ftj.status = decide(ftj, Observed(job=ObservedJob(suspended=True)), NOW).status
    ftj.spec.suspend = False
    resumed = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW)
    assert conditions(resumed.status)["Suspended"] == ("False", "Resumed")


def test_long_and_dotted_names_make_valid_children() -> None:
    long = job()
    long.metadata.name = "a" * 80
    for child in desired_children(long, SETTINGS):
        assert all(len(value) <= 63 for value in child["metadata"]["labels"].values())
        assert owner_name(child) == "a" * 80
    dotted = job(resources={"nodes": 2, "gpusPerNode": 1})
    dotted.metadata.name = "team.sentiment"
    names = Names.for_job(dotted)
    assert "." not in names.service and "." not in names.job
    assert names.service != Names.for_job(job(resources={"nodes": 2})).service
    assert headless_service(dotted, SETTINGS)["spec"]["selector"][JOB_LABEL] == "team.sentiment"
    assert Names.of("team.sentiment").job == "team.sentiment-trainer", "single-node names are unchanged"


def test_pods_of_a_lost_node_are_deleted_so_the_job_can_replace_them() -> None:
    lost = {
        "metadata": {"name": "p1", "deletionTimestamp": "2026-11-23T11:50:00Z"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]},
    }
    fresh = {"metadata": {"name": "p2", "deletionTimestamp": "2026-11-23T11:59:30Z"}, "status": {"phase": "Running"}}
    observed = Observed(job=ObservedJob(active=1, start_time=NOW), pods=(observe_pod(lost), observe_pod(fresh)))
    decision = decide(job(), observed, NOW)
    assert decision.stuck_pods == ("p1",)
    assert "PodsLost" in [e.reason for e in decision.events]
    assert decision.status.phase == "Pending"


def test_status_names_the_children_that_exist() -> None:
    dotted = job(resources={"nodes": 2, "gpusPerNode": 1})
    dotted.metadata.name = "team.sentiment"
    refs = decide(dotted, Observed(job=None), NOW).status.workload
    assert refs is not None
    assert (refs.job, refs.service) == (Names.for_job(dotted).job, Names.for_job(dotted).service)


def test_the_trainer_learns_its_cpu_request_for_data_loader_workers() -> None:
    def env(resources: dict[str, Any]) -> dict[str, Any]:
        pod = batch_job(job(resources=resources), SETTINGS)["spec"]["template"]["spec"]
        return {e["name"]: e for e in pod["containers"][0]["env"]}

    cpu = env({"cpu": "7500m"})["FINETUNE_CPU_REQUEST"]
    assert cpu["valueFrom"] == {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}  # rounds up: 8
    assert "FINETUNE_CPU_REQUEST" not in env({})  # no request: the trainer counts the CPUs it may use


def test_a_status_copy_is_equal_and_shares_nothing() -> None:
    """``copy_status`` (a dump validated afresh: ~5x faster than ``model_copy(deep=True)``) is a faithful copy,
    conditions filled in place on a fresh status included (they never count as set)."""
    status = FineTuneJobStatus.model_validate(trainer_status_at_the_bounds("pvc://runs/job").to_wire())
    status.phase = "Running"
    set_condition(status, "Running", True, "Started", "training", NOW, 3)
    before = status.to_wire()
    copy = copy_status(status)
    assert copy == status and copy.to_wire() == before and copy.conditions
    copy.conditions[0].status = "False"
    copy.evaluations.pop()
    assert copy.best is not None and copy.progress is not None
    copy.best.value, copy.progress.step = 0.0, 0
    assert status.to_wire() == before, "the original is untouched"
