"""Every exit code a retry cannot fix reaches the pod's exit status and fails the Job at its first pod.

The real trainer in real pods on the local control plane, one job per code, all created at once in
one namespace (each trainer spends ~10 s of a core on imports: they overlap). Each error comes as
early as the trainer can find it: before the model loads (4, 5), while the data loads (3), after
the model loaded (2, 7), while training (6). A pod that gets SIGTERM while the model loads exits 75, Terminated,
which is not counted against backoffLimit. A trainer whose exit code was lost (the status
reporter's thread aborting the interpreter's shutdown: exit 134) is retried to BackoffLimitExceeded.
One more case runs in the trainer image, as a podman container: the container runtime's path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_devtools import images
from finetune_localcluster import mountns
from finetune_localcluster.containers import podman_env
from finetune_testsupport.pytest_plugin import LocalCluster
from finetune_trainer import exitcodes
from finetune_trainer.exitcodes import ExitCode
from tests.e2e.conftest import Jobs, RealNamespace, container_pid, real_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASES: dict[str, tuple[ExitCode, dict[str, Any]]] = {
    "model-error": (exitcodes.MODEL_ERROR, {"model": {"source": "pvc://models/missing"}}),
    "no-accelerator": (
        exitcodes.NO_ACCELERATOR,
        {"resources": {"image": "finetune-test/real-no-cuda:1", "gpusPerNode": 1}},
    ),
    "data-error": (exitcodes.DATA_ERROR, {"dataset": {"fields": {"text": "txt"}}}),
    "config-error": (
        exitcodes.INVALID_CONFIG,
        {"freeze": {"strategy": "modules", "layers": None, "frozenModules": [r"encoder\.nope"]}},
    ),
    "metrics-taken": (exitcodes.METRICS_UNAVAILABLE, {"resources": {"image": "finetune-test/real-port-taken:1"}}),
    "diverged": (
        exitcodes.DIVERGED,
        {
            "freeze": {"strategy": "none", "layers": None},
            "hyperparameters": {"learningRate": 10, "batchSize": 2, "maxGradNorm": None, "scheduler": "constant"},
        },
    ),
}


def test_every_code_that_is_not_retried_has_a_case() -> None:
    assert {row.code for row, _ in CASES.values()} == set(exitcodes.PERMANENT)


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_sigterm_while_loading_exits_terminated(started: RealNamespace, local_cluster: LocalCluster) -> None:
    """SIGTERM (a preemption, a drain: kubelet signals the container's process) while the trainer still imports
    and loads: nothing to save, exit 75 at once, ignored by the podFailurePolicy (backoffLimit 0 survives it)."""
    jobs = started.jobs
    jobs.create(real_job("preempted", backoffLimit=0))
    core = client.CoreV1Api(jobs.api)
    selector = "batch.kubernetes.io/job-name=preempted-trainer"
    deadline = time.monotonic() + 120
    while True:
        pods = [
            p
            for p in core.list_namespaced_pod(jobs.namespace, label_selector=selector).items
            if p.status.phase == "Running"
        ]
        if pods:
            break
        assert time.monotonic() < deadline, "the trainer pod never ran"
        time.sleep(0.2)
    (pod,) = pods
    pid = container_pid(local_cluster, pod)
    deadline = time.monotonic() + 60
    while not _catches_sigterm(pid):  # the trainer's handler, there before anything heavy is imported
        assert time.monotonic() < deadline, "the trainer never handles SIGTERM"
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while not (
        state := core.read_namespaced_pod(pod.metadata.name, jobs.namespace).status.container_statuses[0].state
    ).terminated:
        assert time.monotonic() < deadline, "the trainer did not stop"
        time.sleep(0.2)
    assert state.terminated.exit_code == exitcodes.TERMINATED.code
    events = [
        json.loads(line)
        for line in core.read_namespaced_pod_log(pod.metadata.name, jobs.namespace).splitlines()
        if line.startswith("{")
    ]
    assert [e["step"] for e in events if e["event"] == "terminated"] == [None], "stopped while loading, before step 1"
    deadline = time.monotonic() + 120
    while len(core.list_namespaced_pod(jobs.namespace, label_selector=selector).items) < 2:
        assert time.monotonic() < deadline, "the Job made no new pod"
        time.sleep(0.5)
    conditions = (jobs.get("preempted").get("status") or {}).get("conditions", [])
    assert not [c for c in conditions if c["type"] == "Failed" and c["status"] == "True"], conditions
    jobs.delete("preempted")


@pytest.fixture(scope="module")
def trainer_image() -> str | None:
    """The trainer image in the local podman store (a cache hit unless the trainer changed), or None
    where the local node cannot run containers."""
    if not mountns.available():
        return None
    (built,) = [image for image in images.build_images(("trainer",)) if image.target == "trainer"]
    return built.ref


@pytest.fixture(scope="module")
def started(real_namespace: RealNamespace) -> Iterator[RealNamespace]:
    jobs = real_namespace.jobs
    for name, (_, spec) in CASES.items():
        jobs.create(real_job(name, backoffLimit=2, **spec))
    yield real_namespace


def _one_failed_pod(jobs: Jobs, name: str, row: ExitCode) -> client.V1Pod:
    """The FineTuneJob failed with the code's reason; its Job had exactly one pod, which exited with the code."""
    status = jobs.wait_condition(name, "Failed", row.reason, timeout=400)["status"]
    job_name = status["workload"]["job"]
    batch, core = client.BatchV1Api(jobs.api), client.CoreV1Api(jobs.api)
    deadline = time.monotonic() + 60
    while not (job := batch.read_namespaced_job(job_name, jobs.namespace)).status.failed:  # counted a moment later
        assert time.monotonic() < deadline, f"{name}: the Job counted no failed pod: {job.status}"
        time.sleep(0.2)
    pods = core.list_namespaced_pod(jobs.namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items
    codes = [
        (p.metadata.name, s.state.terminated.exit_code if s.state.terminated else None)
        for p in pods
        for s in p.status.container_statuses or []
    ]
    assert codes and all(code == row.code for _, code in codes), f"{name}: pods exited {codes}, not {row.code}"
    assert len(pods) == 1 and job.status.failed == 1, f"{name}: {len(pods)} pods, {job.status.failed} failed"
    return pods[0]


@pytest.mark.parametrize("name", list(CASES))
def test_the_trainers_exit_code_fails_the_job_at_once(started: RealNamespace, name: str) -> None:
    _one_failed_pod(started.jobs, name, CASES[name][0])


def test_the_exit_code_survives_the_container_runtime(started: RealNamespace, trainer_image: str | None) -> None:
    if trainer_image is None:
        pytest.skip("the local node runs containers only with mount namespaces (root, unshare)")
    missing = {"source": "pvc://models/missing"}
    started.jobs.create(real_job("in-image", backoffLimit=2, model=missing, resources={"image": trainer_image}))
    pod = _one_failed_pod(started.jobs, "in-image", exitcodes.MODEL_ERROR)
    assert pod.status.container_statuses[0].image == trainer_image


def test_the_trainer_image_carries_bitsandbytes_for_qlora(trainer_image: str | None) -> None:
    """``freeze.lora.quantization: 4bit`` on a GPU node needs bitsandbytes in the image the chart ships, not only in
    the trainer's optional extra: without it every QLoRA job would fail its preflight on the cluster."""
    if trainer_image is None:
        pytest.skip("the local node runs containers only with mount namespaces (root, unshare)")
    probe = "import importlib.metadata as m; print(m.version('bitsandbytes'))"
    done = subprocess.run(
        [images.podman(), "run", "--rm", "--network=none", "--entrypoint", "python3", trainer_image, "-c", probe],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
