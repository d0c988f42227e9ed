"""Multi-node training really run: two local nodes with one GPU each, a FineTuneJob with
``nodes: 2``, torchrun with gloo on CPU, the real trainer, to Complete.

A control plane of its own: the shared one has one node with 4 GPUs, where both pods would fit.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from finetune_localcluster.cluster import free_port
from finetune_localcluster.kubeconfig import install_admission_policy, install_crd, service_account_kubeconfig
from finetune_localcluster.pytest_plugin import LocalCluster, own_cluster
from finetune_operator import admission
from finetune_operator.api import GROUP, VERSION
from finetune_operator.crd import build_crd
from finetune_operator.rbac import cluster_role
from tests.e2e.conftest import Jobs, Operator
from tests.trainer import tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Operator]]:
    with own_cluster(tmp_path_factory.mktemp("two-nodes"), nodes=2, gpus=1) as cluster:
        with cluster.api_client() as api:
            install_crd(api, build_crd())
            install_admission_policy(api, admission.manifests())
        directory = tmp_path_factory.mktemp("two-nodes-operator")
        operator = Operator(
            kubeconfig=service_account_kubeconfig(
                cluster.kubeconfig, cluster_role(), "finetune-system", directory / "operator-kubeconfig.yaml"
            ),
            log=directory / "operator.log",
            metrics_port=free_port(),
            health_port=free_port(),
        )
        operator.start()
        try:
            yield cluster, operator
        finally:
            operator.kill(signal.SIGTERM)


def test_two_nodes_train_one_job_with_torchrun(two_nodes: tuple[LocalCluster, Operator]) -> None:
    cluster, operator = two_nodes
    nodes = client.CoreV1Api(cluster.api_client()).list_node().items
    assert sorted((n.metadata.name, n.status.allocatable["nvidia.com/gpu"]) for n in nodes) == [
        ("local-node", "1"),
        ("local-node-2", "1"),
    ]
    namespace = cluster.create_namespace("multinode")
    volumes = cluster.state_dir / "volumes" / namespace
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
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
        jobs = Jobs(api, namespace, operator)
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": "ddp"},
            "spec": {
                "model": {"source": "pvc://models/tiny-bert", "task": "sequence-classification", "numLabels": 2},
                "dataset": {"source": "pvc://datasets/sentiment", "validation": "validation.jsonl", "maxSeqLength": 32},
                "freeze": {"strategy": "head-only", "gradualUnfreezing": {"startEpoch": 2, "layersPerEpoch": 1}},
                "hyperparameters": {"learningRate": 1e-3, "batchSize": 8, "epochs": 2, "weightDecay": 0.0},
                "evaluation": {"strategy": "epoch", "metrics": ["loss", "accuracy"]},
                "output": {"location": "pvc://outputs/ddp"},
                "resources": {"nodes": 2, "gpusPerNode": 1},
            },
        }
        jobs.create(body)
        done = jobs.wait_condition("ddp", "Complete", "Succeeded", timeout=300)
        pods = core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=ddp-trainer").items
    assert sorted(p.spec.node_name for p in pods) == ["local-node", "local-node-2"], "one pod per node"
    status = done["status"]
    steps = 64 // (8 * 2) * 2  # 2 ranks share each batch of 8 per rank: 4 steps an epoch
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == steps
    assert [e["step"] for e in status["evaluations"]] == [steps // 2, steps]
    output = volumes / "outputs" / "ddp"
    result = json.loads((output / "result.json").read_text())
    assert result["reason"] == "Succeeded" and result["finalStep"] == steps
    assert (output / "model" / "config.json").exists()
    logs = {
        p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: cluster.kubectl(
            "logs", "-n", namespace, p.metadata.name
        ).stdout
        for p in pods
    }
    events = {
        index: [json.loads(line) for line in text.splitlines() if line.startswith("{")] for index, text in logs.items()
    }
    assert {e["event"] for e in events["0"]} >= {"log", "evaluation", "checkpoint", "result"}
    assert not {"log", "evaluation", "checkpoint", "result"} & {e["event"] for e in events["1"]}, (
        "rank 1 reports nothing"
    )
