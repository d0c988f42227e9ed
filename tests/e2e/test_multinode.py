"""Multi-node training really run: two local nodes with one GPU each, FineTuneJobs with ``nodes: 2``, torchrun
with gloo on CPU, the real trainer. Two jobs, one per promise about the processes:

- ``strategy: fsdp``: rank 1's process is SIGKILLed after the first (sharded) checkpoint; the whole Job retries,
  every rank resumes from its shards, the job completes, and the one consolidated model loads and predicts.
- ``strategy: ddp`` with an ``s3://`` output (the project's S3 server: no volume shared for checkpoints): a drain
  (SIGTERM) ends both pods with 75, the Job makes new pods, and they resume from the checkpoint the stop published
  to the bucket. (fsdp on several nodes with an s3:// output is refused by the API: each node's shards stay on its
  own scratch.)

A control plane of its own: the shared one has one node with 4 GPUs, where both pods would fit.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
from kubernetes import client

from finetune_devtools.seaweedfs import S3Endpoint
from finetune_localcluster import procs
from finetune_localcluster.kubeconfig import install_objects
from finetune_operator.generators.crd import chart_api_objects
from finetune_testsupport.pytest_plugin import LocalCluster, own_cluster
from finetune_trainer import exitcodes, s3
from finetune_trainer.launch import GRACE_MARGIN_SECONDS
from tests.e2e.conftest import (
    Jobs,
    Operator,
    container_pid,
    real_job,
    running_operator,
    s3_secret,
    s3_test_env,
)
from tests.trainer import tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Operator]]:
    with own_cluster(tmp_path_factory.mktemp("two-nodes"), nodes=2, gpus=1) as cluster:
        with cluster.api_client() as api:
            install_objects(api, chart_api_objects())
        with running_operator(cluster, tmp_path_factory.mktemp("two-nodes-operator")) as operator:
            yield cluster, operator


def _kill_rank(cluster: LocalCluster, core: client.CoreV1Api, namespace: str, index: str, job: str = "ddp") -> str:
    """SIGKILL the trainer process (the rank, not torchrun) in the Job's pod ``index``, as the OOM killer would."""
    (pod,) = [
        p
        for p in core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}-trainer").items
        if p.metadata.annotations["batch.kubernetes.io/job-completion-index"] == index and p.status.phase == "Running"
    ]
    container = container_pid(cluster, pod)
    rank = [pid for pid in procs.descendants(container) if _is_rank(pid)]  # torchrun: own session
    assert rank, f"{pod.metadata.name}: no trainer process under torchrun"
    for pid in rank:  # the rank and any helper it forked (data loader workers)
        os.kill(pid, signal.SIGKILL)
    return str(pod.metadata.name)


def _group_commands(pgid: int) -> list[list[str]]:
    """The command lines of process group ``pgid`` (a container's: the launcher and torchrun)."""
    commands = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                commands.append((d / "cmdline").read_bytes().decode().split("\0"))
        except OSError:
            continue
    return commands


def _is_rank(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"finetune_trainer.cli" in argv and not {b"torch.distributed.run", b"finetune_trainer.launch"} & set(argv)


def _shared_volumes(cluster: LocalCluster, core: client.CoreV1Api, namespace: str) -> Path:
    """ReadWriteMany claims models (tiny-bert), datasets (sentiment) and outputs; their host directory."""
    volumes = cluster.state_dir / "volumes" / namespace
    for claim in ("models", "datasets", "outputs"):
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
            },
        )
    tiny.save_model(volumes / "models" / "tiny-bert")
    tiny.write_sentiment(volumes / "datasets" / "sentiment", n_train=64, n_val=32)
    return volumes


def _ddp_job(name: str, **spec: Any) -> dict[str, Any]:
    """``real_job`` on two nodes, four epochs, thawing a layer an epoch from the second."""
    return real_job(
        name,
        freeze={"strategy": "head-only", "layers": None, "gradualUnfreezing": {"startEpoch": 2, "layersPerEpoch": 1}},
        hyperparameters={"epochs": 4},
        resources={"nodes": 2, "gpusPerNode": 1},
        **spec,
    )


def test_a_drained_node_exits_terminated_on_every_node_index_and_both_resume_from_the_bucket(
    two_nodes: tuple[LocalCluster, Operator], s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to node index 1's pod (a drain, a preemption: kubelet signals the container's process, the
    launcher) ends both pods with 75, which the podFailurePolicy ignores: with backoffLimit 0 the Job goes on
    with new pods. torchrun gives its workers the pod's grace period to save, not its default 30 s. The output is
    s3:// (no volume shared for checkpoints): the stop's checkpoint is published to the bucket before the pods end,
    and the new pods on both nodes restore it from there and resume from it."""
    cluster, operator = two_nodes
    settings = s3_test_env(monkeypatch, s3_server)
    out = f"s3://ddp-{uuid.uuid4().hex[:10]}/ddp"
    namespace = cluster.create_namespace("drain")
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        _shared_volumes(cluster, core, namespace)
        s3_secret(api, namespace, s3_server, "s3-credentials")
        store = s3.S3Location.parse(out, settings, "output").store()
        obstore.put(store, "README", b"the bucket exists: SeaweedFS creates it on the first upload\n")
        jobs = Jobs(api, namespace, operator)
        jobs.create(_ddp_job("drained", backoffLimit=0, output={"location": out}, storage={"s3": settings.to_wire()}))
        jobs.wait(
            "drained", "training", lambda j: ((j.get("status") or {}).get("progress") or {}).get("step", 0) >= 1, 300
        )
        selector = "batch.kubernetes.io/job-name=drained-trainer"
        first = {
            p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p
            for p in core.list_namespaced_pod(namespace, label_selector=selector).items
        }
        launcher = container_pid(cluster, first["1"])
        grace = first["1"].spec.termination_grace_period_seconds
        torchrun = [argv for argv in _group_commands(launcher) if "torch.distributed.run" in argv]
        assert [a for argv in torchrun for a in argv if a.startswith("--shutdown")] == [
            f"--shutdown-timeout={grace - GRACE_MARGIN_SECONDS}"
        ], "torchrun SIGKILLs its workers when the pod's grace period ends, not after its default 30 s"
        os.kill(launcher, signal.SIGTERM)

        def exit_codes() -> dict[str, int | None]:
            codes: dict[str, int | None] = {}
            for index, pod in first.items():
                (status,) = core.read_namespaced_pod(pod.metadata.name, namespace).status.container_statuses
                codes[index] = status.state.terminated.exit_code if status.state.terminated else None
            return codes

        deadline = time.monotonic() + 200
        while None in exit_codes().values():
            assert time.monotonic() < deadline, f"pods still running: {exit_codes()}\n{operator.tail()}"
            time.sleep(0.5)
        assert exit_codes() == {"0": exitcodes.TERMINATED.code, "1": exitcodes.TERMINATED.code}
        stopped = [e for e in _events(cluster, namespace, first["0"]) if e["event"] == "checkpoint"][-1]["step"]
        assert s3.published(f"{out}/checkpoints/checkpoint-{stopped}", settings) is not None, "the stop's checkpoint"
        olds = {p.metadata.name for p in first.values()}

        def resumed() -> list[int]:
            """The resume events of the new pod of node index 0 (rank 0), once it runs."""
            new = [
                p
                for p in core.list_namespaced_pod(namespace, label_selector=selector).items
                if p.metadata.name not in olds
                and p.metadata.annotations["batch.kubernetes.io/job-completion-index"] == "0"
            ]
            return [e["step"] for p in new for e in _events(cluster, namespace, p) if e["event"] == "resume"]

        deadline = time.monotonic() + 300
        while not (steps := resumed()):
            assert time.monotonic() < deadline, f"the new pods did not resume:\n{operator.tail()}"
            time.sleep(1)
        assert steps == [stopped], "the new pods resumed from the stop's checkpoint in the bucket"
        # Both ranks restored it from the bucket: ranks that saw different checkpoints would refuse to train.
        jobs.wait(
            "drained",
            "a step after the resume",
            lambda j: ((j.get("status") or {}).get("progress") or {}).get("step", 0) > stopped,
            120,
        )
        conditions = (jobs.get("drained").get("status") or {}).get("conditions", [])
        assert not [c for c in conditions if c["type"] == "Failed" and c["status"] == "True"], conditions
        jobs.delete("drained")


def _events(cluster: LocalCluster, namespace: str, pod: client.V1Pod) -> list[dict[str, Any]]:
    """The trainer's JSON event lines in ``pod``'s log (rank 0 reports; the other ranks log no events)."""
    log = cluster.kubectl("logs", "-n", namespace, pod.metadata.name, check=False).stdout
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_fsdp_on_two_nodes_survives_a_killed_rank_resumes_from_its_shards_and_saves_one_model(
    two_nodes: tuple[LocalCluster, Operator],
) -> None:
    """``distributed.strategy: fsdp`` with ``nodes: 2``: a tiny Llama sharded across the two pods by torchrun, rank 1
    killed once the first (sharded) checkpoint is complete; the whole Job retries, resumes from both ranks' shards,
    completes, and the consolidated model loads with ``from_pretrained`` (no torch.distributed) and predicts."""
    import torch
    import transformers as tf

    cluster, operator = two_nodes
    nodes = client.CoreV1Api(cluster.api_client()).list_node().items
    assert sorted((n.metadata.name, n.status.allocatable["nvidia.com/gpu"]) for n in nodes) == [
        ("local-node", "1"),
        ("local-node-2", "1"),
    ]
    namespace = cluster.create_namespace("fsdp")
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        volumes = _shared_volumes(cluster, core, namespace)
        tiny.save_model(volumes / "models" / "tiny-llama", "llama", "causal-lm")
        tiny.write_text(volumes / "datasets" / "text")
        body = real_job(
            "fsdp",
            hyperparameters={"epochs": 2, "batchSize": 4, "learningRate": 1e-2},
            evaluation={"strategy": "epoch", "metrics": ["loss"]},
            resources={"nodes": 2, "gpusPerNode": 1},
            distributed={"strategy": "fsdp"},
        )
        body["spec"]["model"] = {"source": "pvc://models/tiny-llama", "task": "causal-lm"}
        body["spec"]["dataset"] = {
            "source": "pvc://datasets/text",
            "validation": "validation.jsonl",
            "maxSeqLength": 32,
        }
        jobs = Jobs(api, namespace, operator)
        jobs.create(body)
        steps_per_epoch = 48 // (4 * 2)
        first = volumes / "outputs" / "fsdp" / "checkpoints" / f"checkpoint-{steps_per_epoch}"
        deadline = time.monotonic() + 300
        while not (first / "finetune-complete").exists():
            assert time.monotonic() < deadline, f"no first checkpoint:\n{operator.tail()}"
            time.sleep(0.2)
        assert sorted(p.name for p in (first / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        killed = _kill_rank(cluster, core, namespace, index="1", job="fsdp")
        done = jobs.wait_condition("fsdp", "Complete", "Succeeded", timeout=400)
        pods = core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=fsdp-trainer").items
    pods = [p for p in pods if p.status.phase == "Succeeded"]
    assert killed not in {p.metadata.name for p in pods}
    assert sorted(p.spec.node_name for p in pods) == ["local-node", "local-node-2"], "one pod per node"
    status = done["status"]
    steps = 2 * steps_per_epoch
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == steps
    assert [e["step"] for e in status["evaluations"]] == [steps_per_epoch, steps], "no evaluation lost or repeated"
    assert status["restarts"] >= 1
    result = json.loads((volumes / "outputs" / "fsdp" / "result.json").read_text())
    assert result["reason"] == "Succeeded" and result["finalStep"] == steps
    events = {
        p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: _events(cluster, namespace, p) for p in pods
    }
    assert {e["event"] for e in events["0"]} >= {"log", "evaluation", "checkpoint", "result"}
    assert [e["step"] for e in events["0"] if e["event"] == "resume"] == [steps_per_epoch], "resumed from the shards"
    assert [e["ranks"] for e in events["0"] if e["event"] == "sharding"] == [2]
    assert not {"log", "evaluation", "checkpoint", "result"} & {e["event"] for e in events["1"]}, (
        "rank 1 reports nothing"
    )
    model_dir = volumes / "outputs" / "fsdp" / "model"
    assert not list(model_dir.glob("*.distcp")) and len(list(model_dir.glob("model*.safetensors"))) == 1
    model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        logits = model(**tokenizer(["the movie was"], return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
