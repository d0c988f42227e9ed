"""The generated CRD on a real kube-apiserver: bad manifests are rejected naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import INVALID, Invalid, baseline, invalid_manifest

pytestmark = pytest.mark.integration


def _create(api: client.ApiClient, namespace: str, manifest: dict[str, Any], dry_run: bool = True) -> dict[str, Any]:
    manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    result: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest, dry_run="All" if dry_run else None
    )
    return result


def _rejection(api: client.ApiClient, namespace: str, manifest: dict[str, Any]) -> str:
    with pytest.raises(client.ApiException) as error:
        _create(api, namespace, manifest)
    assert error.value.status == 422, error.value.body
    message: str = json.loads(error.value.body)["message"]
    return message


def test_valid_manifest_gets_the_model_defaults(local_cluster: LocalCluster, crd: Any, namespace: str) -> None:
    with local_cluster.api_client() as api:
        created = _create(api, namespace, baseline("defaults"))
    spec = created["spec"]
    assert spec["hyperparameters"]["weightDecay"] == 0.01
    assert spec["earlyStopping"]["patience"] == 2
    assert spec["earlyStopping"]["restoreBest"] is True
    assert spec["resources"]["gpuResourceName"] == "nvidia.com/gpu"
    assert spec["suspend"] is False


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_invalid_manifest_is_rejected_naming_the_field(
    local_cluster: LocalCluster, crd: Any, namespace: str, case: Invalid
) -> None:
    with local_cluster.api_client() as api:
        message = _rejection(api, namespace, invalid_manifest(case))
    assert f"spec.{case.field}" in message, message


def test_training_spec_is_immutable_unless_suspended(local_cluster: LocalCluster, crd: Any, namespace: str) -> None:
    with local_cluster.api_client() as api:
        custom_api = client.CustomObjectsApi(api)
        _create(api, namespace, baseline("immutable"), dry_run=False)
        edit = {"spec": {"hyperparameters": {"learningRate": 1e-3}}}
        with pytest.raises(client.ApiException) as error:
            custom_api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "immutable", edit)
        message = json.loads(error.value.body)["message"]
        assert "spec.hyperparameters" in message and "immutable" in message, message

        # Operational fields stay editable, and suspending unlocks the training spec.
        custom_api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "immutable", {"spec": {"suspend": True}}
        )
        custom_api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "immutable", edit)
        current = custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "immutable")
        assert current["spec"]["hyperparameters"]["learningRate"] == 1e-3


def test_every_spec_field_but_suspend_and_ttl_waits_for_a_suspension(
    local_cluster: LocalCluster, crd: Any, namespace: str
) -> None:
    """Edits of resources, image or backoffLimit used to be accepted on a running job and wait
    silently; now they are refused until the job is suspended (and then applied on resume)."""
    with local_cluster.api_client() as api:
        custom_api = client.CustomObjectsApi(api)
        _create(api, namespace, baseline("operational"), dry_run=False)
        for edit, field in (
            ({"backoffLimit": 7}, "spec.backoffLimit"),
            ({"resources": {"image": "other:1"}}, "spec.resources"),
            ({"stallTimeoutSeconds": 60}, "spec.stallTimeoutSeconds"),
        ):
            with pytest.raises(client.ApiException) as error:
                custom_api.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, "operational", {"spec": edit}
                )
            message = json.loads(error.value.body)["message"]
            assert field in message and "immutable" in message, message
        for edit in ({"ttlSecondsAfterFinished": 30}, {"suspend": True}, {"backoffLimit": 7, "resources": {"cpu": 2}}):
            custom_api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "operational", {"spec": edit})


def test_a_multi_node_name_must_start_with_a_letter(local_cluster: LocalCluster, crd: Any, namespace: str) -> None:
    with local_cluster.api_client() as api:
        manifest = baseline("1st-run")
        manifest["spec"]["resources"] = {"nodes": 2}
        assert "must start with a letter" in _rejection(api, namespace, manifest)
        manifest["spec"]["resources"] = {"nodes": 1}
        _create(api, namespace, manifest)


def test_kubectl_explain_and_printer_columns(local_cluster: LocalCluster, crd: Any, namespace: str) -> None:
    explained = local_cluster.kubectl("explain", "ftj.spec.freeze").stdout
    assert "bottom-layers" in explained
    assert "layers" in explained and "trainableModules" in explained
    local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(baseline("columns")))
    table = local_cluster.kubectl("get", "ftj", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "PROGRESS", "METRIC", "BEST", "REASON"], table
    wide = local_cluster.kubectl("get", "finetune", "-n", namespace, "-o", "wide").stdout
    assert "MESSAGE" in wide.splitlines()[0]
