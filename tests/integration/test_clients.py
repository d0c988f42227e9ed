"""The operator's API client against the real API server: idempotent creates and deletes,
conditional status writes, and a request count for every answer."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kopf
import pytest

from finetune_localcluster.kubeconfig import service_account_kubeconfig
from finetune_operator.api.job import API_VERSION, KIND
from finetune_operator.controller.clients import ApiError, ConflictError, Kube, login

if TYPE_CHECKING:
    from finetune_testsupport.pytest_plugin import LocalCluster

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
    kube = Kube(login, on_response=lambda verb, kind, code: answers.update([(verb, kind, code)]))
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
        held = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "held", "namespace": namespace},
            "spec": {
                "suspend": True,
                "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}},
            },
        }
        job = await kube.create(held)
        assert job is not None
        with pytest.raises(ConflictError):  # decided on another Job of that name: refused, nothing deleted
            await kube.delete_job(namespace, "held", "another-uid")
        assert await kube.read_job(namespace, "held") is not None
        await kube.delete_job(namespace, "held", job["metadata"]["uid"])
        with pytest.raises(ApiError) as rejected:
            await kube.patch_job(namespace, "absent", {"spec": {"suspend": True}})
        assert rejected.value.status == 404
    finally:
        await kube.close()
    return answers


def test_creates_are_idempotent_and_status_writes_conditional(
    local_cluster: LocalCluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
    answers = asyncio.run(_exercise(local_cluster, namespace))
    assert answers[("POST", KIND, 201)] == 1 and answers[("POST", KIND, 409)] == 1
    assert answers[("PATCH", KIND, 200)] == 2 and answers[("PATCH", KIND, 409)] == 1
    assert answers[("DELETE", "Job", 404)] == 1 and answers[("PATCH", "Job", 404)] == 1


def test_a_rejected_token_is_read_again(
    local_cluster: LocalCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 401 (the service account token was rotated) makes the client ask for credentials again
    and repeat the request once, as kopf's own watches do."""
    reader = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "finetune-test-job-reader"},
        "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}],
    }
    kubeconfig = service_account_kubeconfig(local_cluster.kubeconfig, reader, namespace, tmp_path / "reader.yaml")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    fresh = login()
    rotation = iter([dataclasses.replace(fresh, token="expired-token"), fresh])  # as the kubelet rotates it

    def service_account() -> kopf.ConnectionInfo:
        return next(rotation)

    async def read() -> tuple[dict[str, Any] | None, Counter[int]]:
        codes: Counter[int] = Counter()
        kube = Kube(service_account, on_response=lambda verb, kind, code: codes.update([code]))
        try:
            return await kube.read_job(namespace, "absent"), codes
        finally:
            await kube.close()

    job, codes = asyncio.run(read())
    assert job is None  # 404 with the fresh token: authenticated and authorised
    assert codes == Counter({401: 1, 404: 1})
