"""The Reconciler's decisions, through the pure core: what is done to the trainer Job and Kueue's Workload,
and what is read first. No cluster: ``tests/e2e`` runs the same rules against the real control plane."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from finetune_operator.api.job import REASONS, FineTuneJob, FineTuneJobStatus, WorkloadRefs
from finetune_operator.api.sweep import FineTuneSweepStatus
from finetune_operator.reconcile import KueueWorkload, Observed, ObservedJob, ObservedPod, decide
from finetune_operator.reconcile.children import (
    batch_job,
    config_map,
    content_hash,
    content_hashes,
    desired_children,
    headless_service,
    role,
    role_binding,
)
from finetune_operator.reconcile.observe import observe_job, spec_hash_of, trainer_job_essentials
from finetune_operator.reconcile.steer import (
    children_wanted,
    content_drifted,
    kueue_wanted,
    pods_wanted,
    refused_in_operator_namespace,
    repair,
    trainer_job_patch,
    unreadable_spec,
)
from finetune_operator.reconcile.sweep import refused_sweep
from tests.unit.test_reconcile import NOW, SETTINGS, conditions, job

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKLOAD = KueueWorkload("ml", "job-sentiment-trainer-1")


def trainer_of(ftj: FineTuneJob, **status: object) -> ObservedJob:
    """The trainer Job as the operator made it for ``ftj``, with this status."""
    return observe_job(trainer_job_essentials({**batch_job(ftj, SETTINGS), "status": status}))


def desired(ftj: FineTuneJob) -> str | None:
    return spec_hash_of(batch_job(ftj, SETTINGS))


def stopped(ftj: FineTuneJob) -> FineTuneJob:
    ftj.metadata.annotations["finetune.dev/stop-requested"] = "true"
    return ftj


# --- issue 23 item 5: a finished job's Job never runs again -------------------------------------


def test_a_job_stopped_while_kueue_holds_it_deletes_its_job_once_the_result_is_recorded() -> None:
    ftj = stopped(job(queueName="q"))
    waiting = trainer_of(job(queueName="q"))  # suspended, as created: Kueue has not admitted it
    assert waiting.suspended and waiting.queue_label == "q"
    decision = decide(ftj, Observed(job=waiting, kueue_workloads=(WORKLOAD,)), NOW)
    assert conditions(decision.status)["Complete"] == ("True", "Stopped")
    assert decision.delete_trainer_job, "else Kueue admits it when quota frees and a finished job trains again"
    assert decision.kueue_active == () and decision.suspend_trainer_job is None
    ftj.status = decision.status  # replayed (the delete failed, the operator restarted): still deleted
    assert decide(ftj, Observed(job=waiting), NOW + timedelta(minutes=5)).delete_trainer_job


def test_pruned_and_sweep_finished_trials_in_a_queue_delete_their_job_too() -> None:
    for reason in ("Pruned", "SweepFinished"):
        ftj = stopped(job(queueName="q"))
        ftj.metadata.annotations["finetune.dev/stop-reason"] = reason
        assert decide(ftj, Observed(job=trainer_of(job(queueName="q"))), NOW).delete_trainer_job, reason


def test_a_finished_job_whose_job_ended_or_was_never_queued_keeps_it() -> None:
    complete = trainer_of(job(queueName="q"), succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    done = decide(job(queueName="q"), Observed(job=complete), NOW)
    assert conditions(done.status)["Complete"][0] == "True" and not done.delete_trainer_job  # the TTL's
    halted = decide(stopped(job()), Observed(job=ObservedJob(suspended=True)), NOW)
    assert conditions(halted.status)["Complete"] == ("True", "Stopped")
    assert not halted.delete_trainer_job, "nothing but a user unsuspends a Job that names no queue"


# --- issue 23 item 10: replaced only when no pod of the old Job is left; Kueue cannot admit it meanwhile ---


def test_an_edit_while_suspended_replaces_the_job_only_once_its_pods_are_gone() -> None:
    before, edited = job(suspend=True), job(suspend=True, backoffLimit=5)
    saving = ObservedPod("p", "Running", terminating=True, deletion_deadline=NOW + timedelta(seconds=30))
    old = trainer_of(before, terminating=1)
    assert pods_wanted(old, desired(edited)), "whether a pod is left is read"
    waiting = decide(edited, Observed(job=old, pods=(saving,), desired_hash=desired(edited)), NOW)
    assert not waiting.replace_trainer_job, "the old trainer is still saving its checkpoint"
    assert waiting.suspend_trainer_job is None and waiting.status.phase == "Suspended"
    counted_gone = trainer_of(before)  # the Job's count can lag the pods
    assert not decide(
        edited, Observed(job=counted_gone, pods=(saving,), desired_hash=desired(edited)), NOW
    ).replace_trainer_job
    failed_pod = ObservedPod("p0", "Failed", exit_code=1)  # an earlier attempt's: it writes nothing
    gone = decide(edited, Observed(job=counted_gone, pods=(failed_pod,), desired_hash=desired(edited)), NOW)
    assert gone.replace_trainer_job


def test_resuming_before_the_old_pods_are_gone_neither_unsuspends_nor_activates_the_old_job() -> None:
    edited = job(queueName="q", backoffLimit=5)  # resumed right after the edit
    old = trainer_of(job(queueName="q"), terminating=1)
    inactive = KueueWorkload("ml", "w", active=False)
    saving = ObservedPod("p", "Running", terminating=True)
    decision = decide(
        edited, Observed(job=old, pods=(saving,), kueue_workloads=(inactive,), desired_hash=desired(edited)), NOW
    )
    assert not decision.replace_trainer_job and decision.suspend_trainer_job is None
    assert decision.kueue_active == (), "activating the old Workload would start the old spec"
    assert decision.add_queue_label is None
    plain = job(backoffLimit=5)
    old_plain = trainer_of(job(suspend=True), terminating=1)
    assert (
        decide(plain, Observed(job=old_plain, pods=(saving,), desired_hash=desired(plain)), NOW).suspend_trainer_job
        is None
    )


def test_a_queued_job_the_user_suspended_names_no_queue_until_resumed() -> None:
    paused = batch_job(job(queueName="q", suspend=True), SETTINGS)
    assert QUEUE_LABEL not in paused["metadata"]["labels"], "no Workload that Kueue could admit"
    assert paused["spec"]["suspend"] is True
    assert spec_hash_of(paused) == desired(job(queueName="q")), "resuming is not an edit"
    assert batch_job(job(queueName="q"), SETTINGS)["metadata"]["labels"][QUEUE_LABEL] == "q"
    observed = observe_job(trainer_job_essentials(paused))
    assert observed.queue_label is None
    still = decide(
        job(queueName="q", suspend=True), Observed(job=observed, desired_hash=desired(job(queueName="q"))), NOW
    )
    assert still.add_queue_label is None and still.suspend_trainer_job is None and not still.replace_trainer_job
    resumed = decide(job(queueName="q"), Observed(job=observed, desired_hash=desired(job(queueName="q"))), NOW)
    assert resumed.add_queue_label == "q", "handed to Kueue, which unsuspends it when it admits it"
    assert resumed.suspend_trainer_job is None and not resumed.replace_trainer_job
    assert trainer_job_patch(resumed) == {"metadata": {"labels": {QUEUE_LABEL: "q"}}}


# --- The steering rules that lived in the kopf shell ----------------------------------------------


def test_the_users_suspend_of_a_running_queued_job_suspends_it_and_deactivates_its_workload() -> None:
    running = trainer_of(job(queueName="q"), active=1, ready=1)
    running = replace(running, suspended=False)
    decision = decide(job(queueName="q", suspend=True), Observed(job=running, kueue_workloads=(WORKLOAD,)), NOW)
    assert decision.suspend_trainer_job is True
    assert decision.kueue_active == ((WORKLOAD, False),)
    assert trainer_job_patch(decision) == {"spec": {"suspend": True}}
    held = trainer_of(job(queueName="q"))
    inactive = KueueWorkload("ml", "w", active=False)
    resumed = decide(job(queueName="q"), Observed(job=held, kueue_workloads=(inactive,)), NOW)
    assert resumed.kueue_active == ((inactive, True),)
    assert resumed.suspend_trainer_job is None, "a queued Job is unsuspended by Kueue alone"


def test_a_plain_job_follows_spec_suspend_and_a_stop_enforced_halts_it() -> None:
    paused = trainer_of(job(suspend=True))
    assert decide(job(), Observed(job=paused, desired_hash=desired(job())), NOW).suspend_trainer_job is False
    running = ObservedJob(active=1, ready=1)
    assert decide(job(suspend=True), Observed(job=running), NOW).suspend_trainer_job is True
    ftj = stopped(job(stopGracePeriodSeconds=30))
    ftj.status = decide(ftj, Observed(job=running), NOW).status
    late = decide(ftj, Observed(job=running), NOW + timedelta(seconds=31))
    assert late.halt_trainer_job and late.suspend_trainer_job is True
    halted_and_edited = decide(ftj, Observed(job=ObservedJob(suspended=True, terminating=1), desired_hash="x"), NOW)
    assert not halted_and_edited.replace_trainer_job, "a Job halted for a stop is not replaced"


def test_what_is_read_before_deciding() -> None:
    fresh = FineTuneJobStatus()
    recorded = FineTuneJobStatus(workload=WorkloadRefs(job="j", config_map="c", service_account="s"))
    running = ObservedJob(active=1, ready=1)
    assert children_wanted(fresh, None, ensure=False, conflicts=())
    assert not children_wanted(recorded, running, ensure=False, conflicts=())
    assert children_wanted(recorded, running, ensure=True, conflicts=())
    assert not children_wanted(recorded, ObservedJob(complete=True), ensure=True, conflicts=())
    assert not children_wanted(fresh, None, ensure=True, conflicts=("Job x: someone else's",))
    assert not pods_wanted(running, None) and pods_wanted(ObservedJob(active=1), None)
    assert pods_wanted(ObservedJob(failed_condition=True), None)
    assert not kueue_wanted(job(), fresh, ObservedJob(suspended=True))
    assert kueue_wanted(job(queueName="q"), fresh, ObservedJob(suspended=True))
    assert not kueue_wanted(job(queueName="q"), fresh, running)
    assert kueue_wanted(job(queueName="q", suspend=True), fresh, running)


def test_an_existing_child_is_adopted_repaired_or_a_conflict() -> None:
    ours = config_map(job())
    assert repair(ours, ours, job()) == "keep"
    drifted = {**ours, "metadata": {**ours["metadata"], "annotations": {"finetune.dev/spec-hash": "old"}}}
    assert repair(ours, drifted, job()) == "replace"
    other = job()
    other.metadata.uid = "uid-2"
    assert repair(config_map(other), ours, other) == "conflict"
    assert repair(batch_job(job(), SETTINGS), batch_job(job(), SETTINGS), job()) == "adopt"
    assert repair(role(job()), role(job()), job()) == "keep"


# --- issue 25 item 5: drift is judged by content, not by the spec-hash annotation --------------


def test_an_edit_that_keeps_the_spec_hash_annotation_is_still_drift() -> None:
    """`kubectl edit cm <job>-config` keeps the annotation: on main the edited config was kept ("keep"),
    so a running job's model source or trustRemoteCode could be changed around the CRD's rules."""
    ftj = job(resources={"nodes": 2})
    edited_config = config_map(ftj)
    edited_config["data"] = {"config.yaml": "model: {source: hf://evil/model, trustRemoteCode: true}\n"}
    extra_key = config_map(ftj)
    extra_key["data"] = {**extra_key["data"], "other.yaml": "x"}
    wider_role = role(ftj)
    wider_role["rules"] = [*wider_role["rules"], {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    other_subject = role_binding(ftj)
    other_subject["subjects"] = [{"kind": "ServiceAccount", "name": "someone", "namespace": "ml"}]
    exposed = headless_service(ftj, SETTINGS)
    exposed["spec"] = {**exposed["spec"], "externalIPs": ["10.0.0.1"]}
    for edited, desired_child in (
        (edited_config, config_map(ftj)),
        (extra_key, config_map(ftj)),
        (wider_role, role(ftj)),
        (other_subject, role_binding(ftj)),
        (exposed, headless_service(ftj, SETTINGS)),
    ):
        assert repair(desired_child, edited, ftj) == "replace", edited["kind"]
        ref = (edited["kind"], edited["metadata"]["name"])
        assert content_drifted({ref: str(content_hash(edited))}, content_hashes(desired_children(ftj, SETTINGS)))


def test_content_ignores_what_the_api_server_fills_in_and_labels() -> None:
    ftj = job(resources={"nodes": 2})
    service = headless_service(ftj, SETTINGS)
    stored = {**service, "spec": {**service["spec"], "clusterIPs": ["None"], "sessionAffinity": "None"}}
    stored["metadata"] = {**stored["metadata"], "resourceVersion": "7", "labels": {"x": "y"}}
    assert content_hash(stored) == content_hash(service)
    assert repair(service, {**stored, "metadata": service["metadata"]}, ftj) == "keep"
    assert not content_drifted({("Service", "x"): "h"}, {}), "a child the spec does not ask for is not ours to judge"
    assert "Job" not in {kind for kind, _ in content_hashes(desired_children(ftj, SETTINGS, trainer_job=False))}


def test_an_unreadable_spec_fails_a_new_job_spares_a_started_one_and_leaves_a_finished_one() -> None:
    new = unreadable_spec(FineTuneJobStatus(), "invalid spec: x", 1, NOW)
    assert new is not None and conditions(new.status)["Failed"] == ("True", "InvalidSpec")
    started = FineTuneJobStatus(workload=WorkloadRefs(job="j", config_map="c", service_account="s"))
    spared = unreadable_spec(started, "invalid spec: x", 1, NOW)
    assert spared is not None and "Failed" not in conditions(spared.status)
    assert unreadable_spec(new.status, "invalid spec: x", 1, NOW) is None


# --- issue 25 item 3: nothing runs in the operator's own namespace ---------------------------


def test_a_job_or_sweep_in_the_operators_namespace_fails_and_creates_nothing() -> None:
    """On main a job there ran, and `serviceAccountName: finetune-operator` gave its pod the operator's token."""
    refused = refused_in_operator_namespace(FineTuneJobStatus(), "finetune-system", "finetune-system", 1, NOW)
    assert refused is not None and not refused.trainer_job_wanted
    assert conditions(refused.status)["Failed"] == ("True", "OperatorNamespace") and "OperatorNamespace" in REASONS
    assert "operator's own namespace" in str(refused.status.message)
    assert [(e.type, e.reason) for e in refused.events] == [("Warning", "OperatorNamespace")]
    again = refused_in_operator_namespace(refused.status, "finetune-system", "finetune-system", 1, NOW)
    assert again is None, "a finished job stays as it is (and its Event is posted once)"
    assert refused_in_operator_namespace(FineTuneJobStatus(), "ml", "finetune-system", 1, NOW) is None
    assert refused_in_operator_namespace(FineTuneJobStatus(), "ml", None, 1, NOW) is None
    sweep = refused_sweep(FineTuneSweepStatus(), "finetune-system", "finetune-system", 1, NOW)
    assert sweep is not None and not sweep.create and sweep.status.phase == "Failed"
    assert [(e.type, e.reason) for e in sweep.events] == [("Warning", "OperatorNamespace")]
    assert refused_sweep(sweep.status, "finetune-system", "finetune-system", 1, NOW) is None
    assert refused_sweep(FineTuneSweepStatus(), "ml", "finetune-system", 1, NOW) is None
