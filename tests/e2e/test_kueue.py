"""Kueue, the real one (built from the Go module proxy), queues and preempts FineTuneJobs.

On a control plane of its own (``kueue_cluster``), with the operator running with the chart's
permissions and scripted trainers of 1 GPU each (with 2 GPUs per pod the operator launches
torchrun, which runs the real trainer instead of the scripted one), so the queues hold 2 and 1
GPU (tests/e2e/fake_trainer.py ``resumable``: 40 steps in ~10 s,
an evaluation every 5, a checkpoint on SIGTERM). Prints the figures the docs quote: time from
Kueue's admission to the first training step, and the steps lost to one preemption.

The five scenarios run at once (``scenarios``), each in a namespace and ClusterQueue of its own
(2 + 1 + 1 + 1 + 1 GPUs of the node's 6): the trainers only sleep, so the module takes as long as its
longest scenario rather than their sum. Each test reports its own scenario's outcome.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_localcluster.kubeconfig import install_objects
from finetune_operator.generators.crd import chart_api_objects
from finetune_operator.reconcile.children import Names
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.e2e.conftest import Jobs, Operator, fake_job, running_operator

KUEUE = ("kueue.x-k8s.io", "v1beta2")
RESUMABLE = "finetune-test/resumable"
STEADY = "finetune-test/steady:1"
STEPS, EVAL_EVERY = 40, 5
EXAMPLE_QUEUES = Path(__file__).resolve().parents[2] / "examples" / "kueue" / "queues.yaml"


@pytest.fixture(scope="module")
def kueue_operator(kueue_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator on Kueue's cluster, with the CRD and admission policy as the chart installs them, and no
    resync in the module's time: every status change Kueue causes (queued and why, inadmissible, admitted,
    preempted) must reach the job through watch events, the Workload's and the trainer Job's."""
    with kueue_cluster.api_client() as api:
        install_objects(api, chart_api_objects())
    with running_operator(kueue_cluster, tmp_path_factory.mktemp("kueue-operator"), resync_seconds=3600) as running:
        yield running


Scenario = Callable[[LocalCluster, Jobs, Path], None]


def _in_a_namespace_of_its_own(cluster: LocalCluster, operator: Operator, scenario: Scenario, tmp: Path) -> None:
    namespace = cluster.create_namespace("kueue")
    with cluster.api_client() as api:  # one client per thread
        try:
            scenario(cluster, Jobs(api, namespace, operator), tmp)
        finally:
            client.CoreV1Api(api).delete_namespace(namespace)


@pytest.fixture(scope="module")
def scenarios(
    kueue_cluster: LocalCluster, kueue_operator: Operator, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Future[None]]:
    """Every scenario below, run at once; by name, the outcome of each (its assertion error, if any)."""
    runs: dict[str, Scenario] = {
        "queueing": _queueing,
        "preemption": _preemption,
        "user-suspend": _user_suspend,
        "stopped-in-queue": _stopped_in_queue,
        "one-after-the-other": _one_after_the_other,
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {
            name: pool.submit(
                _in_a_namespace_of_its_own, kueue_cluster, kueue_operator, run, tmp_path_factory.mktemp(name)
            )
            for name, run in runs.items()
        }
        wait(futures.values())
    return futures


def kueue_objects(api: client.ApiClient, namespace: str, queue: str, gpus: int, preempt: bool = False) -> None:
    """A ResourceFlavor, a ClusterQueue with ``gpus`` GPUs (CPU and memory plenty) covering what Kueue's own
    examples cover (cpu, memory, the GPU; no ephemeral-storage), and a LocalQueue ``queue`` for it in ``namespace``."""
    custom = client.CustomObjectsApi(api)

    def create(plural: str, body: dict[str, Any], namespaced: bool = False) -> None:
        body = {"apiVersion": "/".join(KUEUE), **body}
        if namespaced:
            custom.create_namespaced_custom_object(*KUEUE, namespace, plural, body)
        else:
            custom.create_cluster_custom_object(*KUEUE, plural, body)

    flavor = f"{queue}-flavor"
    create("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": flavor}})
    resources = {"cpu": 64, "memory": "256Gi", "nvidia.com/gpu": gpus}
    spec: dict[str, Any] = {
        "namespaceSelector": {},
        "resourceGroups": [
            {
                "coveredResources": list(resources),
                "flavors": [
                    {
                        "name": flavor,
                        "resources": [{"name": name, "nominalQuota": quota} for name, quota in resources.items()],
                    }
                ],
            }
        ],
    }
    if preempt:
        spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
    create("clusterqueues", {"kind": "ClusterQueue", "metadata": {"name": f"{queue}-cq"}, "spec": spec})
    create(
        "localqueues",
        {
            "kind": "LocalQueue",
            "metadata": {"name": queue, "namespace": namespace},
            "spec": {"clusterQueue": f"{queue}-cq"},
        },
        namespaced=True,
    )


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    found = [c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == type_]
    return found[0] if found else {}


def is_running(body: dict[str, Any]) -> bool:
    return condition(body, "Running").get("status") == "True"


def runs(output: Path) -> list[dict[str, Any]]:
    """Each trainer run's start (the fake trainer appends one line per pod)."""
    path = output / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def admitted_at(api: client.ApiClient, namespace: str, job_name: str) -> datetime:
    """When Kueue admitted the Job's Workload (its Admitted condition)."""
    workloads = client.CustomObjectsApi(api).list_namespaced_custom_object(*KUEUE, namespace, "workloads")["items"]
    (workload,) = [w for w in workloads if w["metadata"]["ownerReferences"][0]["name"] == job_name]
    admitted = next(c for c in workload["status"]["conditions"] if c["type"] == "Admitted")
    return datetime.fromisoformat(admitted["lastTransitionTime"].replace("Z", "+00:00"))


def _queueing(cluster: LocalCluster, jobs: Jobs, tmp_path: Path) -> None:
    """Two run, the third waits with Kueue's reason and runs when one finishes; bad input in Kueue's words."""
    cluster.kubectl("apply", "--dry-run=server", "-n", jobs.namespace, "-f", str(EXAMPLE_QUEUES))
    kueue_objects(jobs.api, jobs.namespace, "two-gpus", gpus=2)
    names = ["first", "second", "third"]
    one = {"image": RESUMABLE, "gpusPerNode": 1}
    for name in names:
        jobs.create(fake_job(name, RESUMABLE, tmp_path, queueName="two-gpus", resources=one))
    # Bad input, said in Kueue's own words: a queue that does not exist, and a job larger than the queue.
    jobs.create(fake_job("nowhere", RESUMABLE, tmp_path, queueName="no-such-queue", resources={"image": RESUMABLE}))
    too_big = {"image": RESUMABLE, "gpusPerNode": 8}
    jobs.create(fake_job("too-big", RESUMABLE, tmp_path, queueName="two-gpus", resources=too_big))

    def split(_: object) -> bool:
        bodies = [jobs.get(n) for n in names]
        return (
            sum(map(is_running, bodies)) == 2
            and sum(condition(b, "Suspended").get("reason") == "Queued" for b in bodies) == 1
        )

    jobs.wait("first", "two running and one queued", split, timeout=60)
    (waiter,) = [n for n in names if not is_running(jobs.get(n))]
    waiting = jobs.get(waiter)
    assert "insufficient unused quota for nvidia.com/gpu" in condition(waiting, "Suspended")["message"], waiting
    assert waiting["status"]["phase"] == "Suspended" and condition(waiting, "Reconciling")["status"] == "True"
    assert runs(tmp_path / waiter) == []  # no pod while the other two hold the quota

    nowhere = jobs.wait_condition("nowhere", "Stalled", "Inadmissible", timeout=30)
    assert "LocalQueue no-such-queue doesn't exist" in nowhere["status"]["message"]
    # Kueue's new verdict lands on the Workload alone (the Job does not change): its watch keeps the status live.
    client.CustomObjectsApi(jobs.api).create_namespaced_custom_object(
        *KUEUE,
        jobs.namespace,
        "localqueues",
        {
            "apiVersion": "/".join(KUEUE),
            "kind": "LocalQueue",
            "metadata": {"name": "no-such-queue"},
            "spec": {"clusterQueue": "no-such-cluster-queue"},
        },
    )
    jobs.wait(
        "nowhere",
        "Kueue's new verdict",
        lambda b: "no-such-cluster-queue" in (b.get("status") or {}).get("message", ""),
        timeout=30,
    )
    big = jobs.wait_condition("too-big", "Stalled", "Inadmissible", timeout=30)
    assert "maximum capacity" in big["status"]["message"]
    assert condition(big, "Failed") == {} and big["status"]["phase"] == "Suspended"

    for name in names:
        done = jobs.wait_condition(name, "Complete", "Succeeded", timeout=120)
        assert [e["step"] for e in done["status"]["evaluations"]] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    (waiter_run,) = runs(tmp_path / waiter)
    first_done = min(datetime.fromisoformat(jobs.get(n)["status"]["completionTime"]) for n in names if n != waiter)
    admitted = admitted_at(jobs.api, jobs.namespace, Names.of(waiter).job)
    assert admitted >= first_done.replace(microsecond=0)  # admitted only once one of the two finished
    print(
        f"\nKueue admission -> first training step: {waiter_run['started'] + 0.25 - admitted.timestamp():.1f} s "
        "(admission time has 1 s resolution)"
    )


def _one_after_the_other(cluster: LocalCluster, jobs: Jobs, tmp_path: Path) -> None:
    """Two 1-GPU jobs on a 1-GPU ClusterQueue that covers cpu, memory and GPUs only: both run, one after the
    other (trainer pods once requested ephemeral-storage, and neither was ever admitted). A job that sets
    resources.ephemeralStorage asks for what the queue does not cover: Inadmissible, with the fix."""
    kueue_objects(jobs.api, jobs.namespace, "plain", gpus=1)
    one = {"image": RESUMABLE, "gpusPerNode": 1}
    for name in ("one", "two"):
        jobs.create(fake_job(name, RESUMABLE, tmp_path, queueName="plain", resources=one))
    scratch = {**one, "ephemeralStorage": "5Gi"}
    jobs.create(fake_job("scratch", RESUMABLE, tmp_path, queueName="plain", resources=scratch))
    stalled = jobs.wait_condition("scratch", "Stalled", "Inadmissible", timeout=60)
    assert "resource ephemeral-storage unavailable in ClusterQueue" in stalled["status"]["message"], stalled
    assert "unset spec.resources.ephemeralStorage" in stalled["status"]["message"]
    done = {n: jobs.wait_condition(n, "Complete", "Succeeded", timeout=120) for n in ("one", "two")}
    second = max(done, key=lambda n: admitted_at(jobs.api, jobs.namespace, Names.of(n).job))
    (first,) = done.keys() - {second}
    first_done = datetime.fromisoformat(done[first]["status"]["completionTime"])
    assert admitted_at(jobs.api, jobs.namespace, Names.of(second).job) >= first_done.replace(microsecond=0)
    assert runs(tmp_path / "scratch") == [] and condition(jobs.get("scratch"), "Stalled")["status"] == "True"


def _preemption(cluster: LocalCluster, jobs: Jobs, tmp_path: Path) -> None:
    """A high-priority job preempts a low one, which resumes from its checkpoint."""
    scheduling = client.SchedulingV1Api(jobs.api)
    for name, value in (("ftj-low", 10), ("ftj-high", 1000)):
        if not scheduling.list_priority_class(field_selector=f"metadata.name={name}").items:
            scheduling.create_priority_class(
                client.V1PriorityClass(metadata=client.V1ObjectMeta(name=name), value=value)
            )
    kueue_objects(jobs.api, jobs.namespace, "one-gpu", gpus=1, preempt=True)

    def resources(priority: str) -> dict[str, Any]:
        return {"image": RESUMABLE, "gpusPerNode": 1, "priorityClassName": priority}

    jobs.create(fake_job("low", RESUMABLE, tmp_path, queueName="one-gpu", resources=resources("ftj-low")))
    jobs.wait("low", "step 12", lambda b: ((b.get("status") or {}).get("progress") or {}).get("step", 0) >= 12, 60)
    jobs.create(fake_job("high", RESUMABLE, tmp_path, queueName="one-gpu", resources=resources("ftj-high")))

    preempted = jobs.wait_condition("low", "Suspended", "Preempted", timeout=60)
    assert preempted["status"]["phase"] == "Suspended" and condition(preempted, "Failed") == {}
    assert condition(preempted, "Reconciling")["status"] == "True"
    last_step = preempted["status"]["progress"]["step"]
    jobs.wait_condition("high", "Complete", "Succeeded", timeout=60)
    low = jobs.wait_condition("low", "Complete", "Succeeded", timeout=90)

    first, second = runs(tmp_path / "low")
    assert first["resumed_from"] == 0 and second["resumed_from"] > 0, (first, second)
    evaluations = [e["step"] for e in low["status"]["evaluations"]]
    assert evaluations == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)), evaluations  # none lost, none repeated
    assert low["status"]["progress"]["step"] == STEPS
    assert "Preempted" in jobs.events("low") and "Failed" not in low["status"]["phase"]
    print(
        f"\npreemption: last step reported before it {last_step}, resumed from step {second['resumed_from']}: "
        f"{max(last_step - second['resumed_from'], 0)} steps lost (checkpoint interval: on SIGTERM)"
    )


def _user_suspend(cluster: LocalCluster, jobs: Jobs, tmp_path: Path) -> None:
    """Kueue unsuspends any Job it has admitted: the operator deactivates the Workload, so the
    user's spec.suspend holds; spec.suspend: false hands the job back to Kueue."""
    kueue_objects(jobs.api, jobs.namespace, "pausable", gpus=1)
    one = {"image": RESUMABLE, "gpusPerNode": 1}
    jobs.create(fake_job("paused", RESUMABLE, tmp_path, queueName="pausable", resources=one))
    jobs.wait("paused", "step 5", lambda b: ((b.get("status") or {}).get("progress") or {}).get("step", 0) >= 5, 60)
    jobs.patch("paused", {"spec": {"suspend": True}})
    jobs.wait_condition("paused", "Suspended", "Suspended", timeout=30)
    batch, trainer = client.BatchV1Api(jobs.api), Names.of("paused").job
    deadline = time.monotonic() + 6  # long enough for Kueue to have unsuspended it, were it still admitted
    while time.monotonic() < deadline:
        job = batch.read_namespaced_job(trainer, jobs.namespace)
        assert job.spec.suspend is True, "Kueue unsuspended a Job its user suspended"
        assert condition(jobs.get("paused"), "Suspended")["reason"] == "Suspended"
        time.sleep(0.5)
    jobs.patch("paused", {"spec": {"suspend": False}})
    done = jobs.wait_condition("paused", "Complete", "Succeeded", timeout=90)
    assert [e["step"] for e in done["status"]["evaluations"]] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert len(runs(tmp_path / "paused")) == 2 and runs(tmp_path / "paused")[1]["resumed_from"] >= 5


def _kueue_workloads_of(api: client.ApiClient, namespace: str, job_name: str) -> list[dict[str, Any]]:
    workloads = client.CustomObjectsApi(api).list_namespaced_custom_object(*KUEUE, namespace, "workloads")["items"]
    return [w for w in workloads if any(r["name"] == job_name for r in w["metadata"].get("ownerReferences") or [])]


def _stopped_in_queue(cluster: LocalCluster, jobs: Jobs, tmp_path: Path) -> None:
    """A job stopped while Kueue holds it stays finished when quota frees: its Job is gone, so Kueue has
    nothing to admit (issue 23 item 5). A queued job created suspended names no queue until resumed, so
    Kueue cannot admit it meanwhile; edited while suspended it is replaced, and resumed it runs (item 10)."""
    kueue_objects(jobs.api, jobs.namespace, "one-slot", gpus=1)
    batch, one = client.BatchV1Api(jobs.api), {"image": RESUMABLE, "gpusPerNode": 1}
    jobs.create(fake_job("holder", RESUMABLE, tmp_path, queueName="one-slot", resources={**one, "image": STEADY}))
    jobs.wait("holder", "running", is_running, timeout=60)
    jobs.create(fake_job("waiter", RESUMABLE, tmp_path, queueName="one-slot", resources=one))
    jobs.wait_condition("waiter", "Suspended", "Queued", timeout=30)
    jobs.patch("waiter", {"metadata": {"annotations": {"finetune.dev/stop-requested": "true"}}})
    jobs.wait_condition("waiter", "Complete", "Stopped", timeout=30)
    jobs.create(fake_job("paused", RESUMABLE, tmp_path, queueName="one-slot", resources=one, suspend=True))
    jobs.wait_condition("paused", "Suspended", "Suspended", timeout=30)

    jobs.patch("holder", {"metadata": {"annotations": {"finetune.dev/stop-requested": "true"}}})
    jobs.wait_condition("holder", "Complete", "Stopped", timeout=60)
    deadline = time.monotonic() + 10  # the quota is free: long enough for Kueue to admit what it can
    while time.monotonic() < deadline:
        assert runs(tmp_path / "waiter") == [], "a stopped job's trainer ran when quota freed"
        assert batch.read_namespaced_job(Names.of("paused").job, jobs.namespace).spec.suspend is True
        time.sleep(0.5)
    with pytest.raises(client.ApiException) as gone:  # nothing Kueue could unsuspend
        batch.read_namespaced_job(Names.of("waiter").job, jobs.namespace)
    assert gone.value.status == 404
    deadline = time.monotonic() + 60  # its Workload follows the Job through the garbage collector
    while _kueue_workloads_of(jobs.api, jobs.namespace, Names.of("waiter").job):
        assert time.monotonic() < deadline, "the stopped job's Kueue Workload outlived its Job by a minute"
        time.sleep(0.5)
    paused = batch.read_namespaced_job(Names.of("paused").job, jobs.namespace)
    assert "kueue.x-k8s.io/queue-name" not in paused.metadata.labels, paused.metadata.labels
    assert _kueue_workloads_of(jobs.api, jobs.namespace, Names.of("paused").job) == [], "nothing Kueue could admit"
    waiter = jobs.get("waiter")
    assert condition(waiter, "Complete")["reason"] == "Stopped" and waiter["status"]["phase"] == "Succeeded"

    jobs.patch("paused", {"spec": {"backoffLimit": 2}})  # edited while suspended, then resumed at once
    jobs.patch("paused", {"spec": {"suspend": False}})
    done = jobs.wait_condition("paused", "Complete", "Succeeded", timeout=90)
    assert [e["step"] for e in done["status"]["evaluations"]] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    replaced = batch.read_namespaced_job(Names.of("paused").job, jobs.namespace)
    assert replaced.metadata.uid != paused.metadata.uid and replaced.spec.backoff_limit == 2
    assert len(runs(tmp_path / "paused")) == 1


def test_two_run_the_third_waits_with_kueues_reason_and_runs_when_one_finishes(
    scenarios: dict[str, Future[None]],
) -> None:
    scenarios["queueing"].result()


def test_a_high_priority_job_preempts_a_low_one_which_resumes_from_its_checkpoint(
    scenarios: dict[str, Future[None]],
) -> None:
    scenarios["preemption"].result()


def test_the_users_suspend_wins_over_kueue_and_resuming_continues(scenarios: dict[str, Future[None]]) -> None:
    scenarios["user-suspend"].result()


def test_a_job_stopped_in_the_queue_never_runs_and_a_suspended_one_is_not_admitted(
    scenarios: dict[str, Future[None]],
) -> None:
    scenarios["stopped-in-queue"].result()


def test_two_jobs_run_one_after_the_other_on_a_queue_without_ephemeral_storage(
    scenarios: dict[str, Future[None]],
) -> None:
    scenarios["one-after-the-other"].result()
