"""Multi-node training really run: two local nodes with one GPU each, FineTuneJobs with ``nodes: 2``, torchrun
with gloo on CPU, the real trainer. Two jobs, one per promise about the processes:

- ``strategy: fsdp`` with an ``s3://`` output (the project's S3 server: no volume shared for checkpoints, each
  pod's scratch its own): rank 1's process is SIGKILLed once the first sharded checkpoint is published (both nodes'
  shards in the bucket); the whole Job retries, both new pods restore it from the bucket and resume from its
  shards, the job completes, and the one consolidated model (from the bucket) loads and predicts.
- ``strategy: ddp``: a drain (SIGTERM) ends both pods with 75 and the Job makes new pods; torchrun's shutdown
  follows the pod's grace period.

A control plane of its own: the shared one has one node with 4 GPUs, where both pods would fit. Its state lives
outside /tmp, so that every pod's /tmp is an emptyDir of its own (the local node does not bind one over the host's
/tmp when that would hide the cluster's state): each node has its own scratch, as on a real cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
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
    state = Path(tempfile.mkdtemp(prefix="two-nodes-", dir="/var/tmp"))  # not under /tmp: see the module's doc
    try:
        with own_cluster(state, nodes=2, gpus=1) as cluster:
            with cluster.api_client() as api:
                install_objects(api, chart_api_objects())
            with running_operator(cluster, tmp_path_factory.mktemp("two-nodes-operator")) as operator:
                yield cluster, operator
    finally:
        shutil.rmtree(state, ignore_errors=True)


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


def test_a_drained_node_exits_terminated_on_every_node_index(two_nodes: tuple[LocalCluster, Operator]) -> None:
    """SIGTERM to node index 1's pod (a drain, a preemption: kubelet signals the container's process, the
    launcher) ends both pods with 75, which the podFailurePolicy ignores: with backoffLimit 0 the Job goes on
    with new pods. torchrun gives its workers the pod's grace period to save, not its default 30 s."""
    cluster, operator = two_nodes
    namespace = cluster.create_namespace("drain")
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        _shared_volumes(cluster, core, namespace)
        jobs = Jobs(api, namespace, operator)
        jobs.create(_ddp_job("drained", backoffLimit=0))
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
        deadline = time.monotonic() + 120
        while not {p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items} - {
            p.metadata.name for p in first.values()
        }:
            assert time.monotonic() < deadline, "the Job made no new pods"
            time.sleep(0.5)
        conditions = (jobs.get("drained").get("status") or {}).get("conditions", [])
        assert not [c for c in conditions if c["type"] == "Failed" and c["status"] == "True"], conditions
        jobs.delete("drained")


def _events(cluster: LocalCluster, namespace: str, pod: client.V1Pod) -> list[dict[str, Any]]:
    """The trainer's JSON event lines in ``pod``'s log (rank 0 reports; the other ranks log no events)."""
    log = cluster.kubectl("logs", "-n", namespace, pod.metadata.name, check=False).stdout
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_fsdp_on_two_nodes_with_an_s3_output_survives_a_killed_rank_resumes_from_its_shards_and_saves_one_model(
    two_nodes: tuple[LocalCluster, Operator], s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``distributed.strategy: fsdp`` with ``nodes: 2`` and an ``s3://`` output: a tiny Llama sharded across the two
    pods by torchrun, each node's shards on its own scratch and published to the bucket by their rank; rank 1 killed
    once the first checkpoint's manifest (rank 0's, written once both nodes' parts are in) is in the bucket. The
    whole Job retries, both new pods restore that checkpoint from the bucket (their scratch is new) and resume from
    its shards, the job completes, status names a published checkpoint, and the consolidated model loads with
    ``from_pretrained`` (no torch.distributed) and predicts."""
    import torch
    import transformers as tf

    cluster, operator = two_nodes
    settings = s3_test_env(monkeypatch, s3_server)
    out = f"s3://fsdp-{uuid.uuid4().hex[:10]}/fsdp"
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
            output={"location": out},
            storage={"s3": settings.to_wire()},
        )
        body["spec"]["model"] = {"source": "pvc://models/tiny-llama", "task": "causal-lm"}
        body["spec"]["dataset"] = {
            "source": "pvc://datasets/text",
            "validation": "validation.jsonl",
            "maxSeqLength": 32,
        }
        s3_secret(api, namespace, s3_server, "s3-credentials")
        store = s3.S3Location.parse(out, settings, "output").store()
        obstore.put(store, "README", b"the bucket exists: SeaweedFS creates it on the first upload\n")
        jobs = Jobs(api, namespace, operator)
        jobs.create(body)
        steps_per_epoch = 48 // (4 * 2)
        first = f"{out}/checkpoints/checkpoint-{steps_per_epoch}"
        deadline = time.monotonic() + 300
        while (published := s3.published(first, settings)) is None:
            assert time.monotonic() < deadline, f"no first checkpoint:\n{operator.tail()}"
            time.sleep(0.2)
        shards = sorted(e.path for e in published.files if e.path.endswith(".distcp"))
        assert shards == ["sharded/__0_0.distcp", "sharded/__1_0.distcp"], "both nodes' shards are in the bucket"
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
    best = status["best"]["checkpoint"]
    assert best.startswith(f"{out}/checkpoints/") and s3.published(best, settings) is not None, "named once published"
    result = json.loads(bytes(obstore.get(store, "fsdp/result.json").bytes()))
    assert result["reason"] == "Succeeded" and result["finalStep"] == steps
    events = {
        p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: _events(cluster, namespace, p) for p in pods
    }
    assert {e["event"] for e in events["0"]} >= {"log", "evaluation", "checkpoint", "result"}
    assert [e["step"] for e in events["0"] if e["event"] == "resume"] == [steps_per_epoch], "resumed from the shards"
    for index in ("0", "1"):  # each new pod's scratch is new: both nodes' shards came from the bucket
        restored = [c for e in events[index] if e["event"] == "s3_restore" for c in e["checkpoints"]]
        assert f"checkpoint-{steps_per_epoch}" in restored, (index, events[index])
    assert [e["ranks"] for e in events["0"] if e["event"] == "sharding"] == [2]
    assert not {"log", "evaluation", "checkpoint", "result"} & {e["event"] for e in events["1"]}, (
        "rank 1 reports nothing"
    )
    model_dir = s3.stage(f"{out}/model", settings, "output", tmp_path / "cache", 2**30).path
    assert not list(model_dir.glob("*.distcp")) and len(list(model_dir.glob("model*.safetensors"))) == 1
    model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        logits = model(**tokenizer(["the movie was"], return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
