"""The operator's API client against the real API server: idempotent creates and deletes,
conditional status writes, and a request count for every answer."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes_asyncio import client, config

from finetune_operator.api import API_VERSION, KIND
from finetune_operator.clients import ApiError, ConflictError, Kube

if TYPE_CHECKING:
    from finetune_localcluster.pytest_plugin import LocalCluster

pytestmark = pytest.mark.usefixtures("crd")


def _finetunejob(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "file:///models/m", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "file:///data/d"},
            "output": {"location": "file:///out/o"},
        },
    }


async def _exercise(local_cluster: LocalCluster, namespace: str) -> Counter[tuple[str, str, int]]:
    answers: Counter[tuple[str, str, int]] = Counter()
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(local_cluster.kubeconfig), client_configuration=configuration)
    kube = Kube(configuration, on_response=lambda verb, kind, code: answers.update([(verb, kind, code)]))
    try:
        stored = await kube.create(_finetunejob("cond", namespace))
        assert stored is not None and stored["metadata"]["uid"]
        assert await kube.create(_finetunejob("cond", namespace)) is None  # 409: already there

        version = stored["metadata"]["resourceVersion"]
        written = await kube.patch_status(namespace, "cond", {"phase": "Pending"}, version)
        assert written is not None and written["status"]["phase"] == "Pending"
        with pytest.raises(ConflictError):  # decided on the old version: refused, nothing written
            await kube.patch_status(namespace, "cond", {"phase": "Running"}, version)
        current = await kube.read_finetunejob(namespace, "cond")
        assert current is not None and current["status"]["phase"] == "Pending"
        assert await kube.patch_status(namespace, "cond", {"message": "unconditional"}) is not None

        assert await kube.read_finetunejob(namespace, "absent") is None
        assert await kube.patch_status(namespace, "absent", {"phase": "Pending"}) is None
        assert await kube.read_job(namespace, "absent") is None
        await kube.delete_job(namespace, "absent")  # already gone is fine
        with pytest.raises(ApiError) as rejected:
            await kube.patch_job(namespace, "absent", {"spec": {"suspend": True}})
        assert rejected.value.status == 404
    finally:
        await kube.close()
    return answers


def test_creates_are_idempotent_and_status_writes_conditional(local_cluster: LocalCluster, namespace: str) -> None:
    answers = asyncio.run(_exercise(local_cluster, namespace))
    assert answers[("POST", KIND, 201)] == 1 and answers[("POST", KIND, 409)] == 1
    assert answers[("PATCH", KIND, 200)] == 2 and answers[("PATCH", KIND, 409)] == 1
    assert answers[("DELETE", "Job", 404)] == 1 and answers[("PATCH", "Job", 404)] == 1
