"""The generated FineTuneSweep CRD on a real kube-apiserver: bad sweeps are rejected naming the field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from finetune_operator.api.job import GROUP, VERSION
from finetune_operator.api.sweep import SWEEP_PLURAL
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import Manifest, sweep_baseline

pytestmark = pytest.mark.integration


def _create(api: client.ApiClient, namespace: str, manifest: Manifest, dry_run: bool = True) -> dict[str, Any]:
    manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    result: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, SWEEP_PLURAL, manifest, dry_run="All" if dry_run else None
    )
    return result


def _parameter(index: int, **fields: Any) -> Callable[[Manifest], None]:
    def edit(manifest: Manifest) -> None:
        manifest["spec"]["parameters"][index] = {"name": f"p{index}", **fields}

    return edit


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def edit(manifest: Manifest) -> None:
        *parents, leaf = path.split(".")
        node = manifest["spec"]
        for part in parents:
            node = node[part]
        node[leaf] = value

    return edit


BAD: list[tuple[str, Callable[[Manifest], None], str]] = [
    (
        "inverted-float-range",
        _parameter(0, path="hyperparameters.learningRate", float={"min": 1e-3, "max": 1e-5}),
        "spec.parameters[0].float.max",
    ),
    (
        "empty-int-range",
        _parameter(1, path="hyperparameters.batchSize", int={"min": 8, "max": 8}),
        "spec.parameters[1].int.max",
    ),
    (
        "log-scale-min-zero",
        _parameter(0, path="hyperparameters.learningRate", float={"min": 0.0, "max": 1e-3, "log": True}),
        "spec.parameters[0].float.min",
    ),
    (
        "unknown-path",
        _parameter(0, path="hyperparameters.learningRat", float={"min": 1e-5, "max": 1e-3}),
        "spec.parameters[0].path",
    ),
    (
        "output-location-not-sweepable",
        _parameter(0, path="output.location", categorical={"values": ["/a", "/b"]}),
        "spec.parameters[0].path",
    ),
    ("unknown-algorithm", _set("algorithm.name", "bayes"), "spec.algorithm.name"),
    ("metric-not-evaluated", _set("objective.metric", "f1"), "spec.objective.metric"),
    (
        "no-evaluation",
        _set("trialTemplate.spec.evaluation", {"strategy": "no", "metrics": ["accuracy"]}),
        "spec.objective.metric",
    ),
    ("grid-without-step", _set("algorithm.name", "grid"), "spec.parameters"),
    (
        "two-kinds",
        _parameter(0, path="hyperparameters.learningRate", float={"min": 0.1, "max": 0.2}, int={"min": 1, "max": 2}),
        "spec.parameters[0].float",
    ),
    ("duplicate-names", _parameter(1, path="hyperparameters.seed", int={"min": 1, "max": 9}), "spec.parameters"),
    (
        "invalid-template",
        _set("trialTemplate.spec.hyperparameters.learningRate", -1.0),
        "spec.trialTemplate.spec.hyperparameters.learningRate",
    ),
]


def _duplicate_names(manifest: Manifest) -> None:
    manifest["spec"]["parameters"][1]["name"] = manifest["spec"]["parameters"][0]["name"]


BAD = [(case, _duplicate_names if case == "duplicate-names" else edit, field) for case, edit, field in BAD]


def test_the_issues_sweep_is_accepted_with_defaults(
    local_cluster: LocalCluster, sweep_crd: Any, namespace: str
) -> None:
    manifest = sweep_baseline()
    del manifest["spec"]["pruning"]
    with local_cluster.api_client() as api:
        created = _create(api, namespace, manifest)
    assert created["spec"]["pruning"] == {"name": "none", "warmupEvaluations": 1, "startupTrials": 3}
    assert created["spec"]["suspend"] is False
    # The template gets the FineTuneJob's defaults.
    assert created["spec"]["trialTemplate"]["spec"]["hyperparameters"]["weightDecay"] == 0.01


@pytest.mark.parametrize(("case", "edit", "field"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_sweep_is_rejected_naming_the_field(
    local_cluster: LocalCluster, sweep_crd: Any, namespace: str, case: str, edit: Callable[[Manifest], None], field: str
) -> None:
    manifest = copy.deepcopy(sweep_baseline(case))
    edit(manifest)
    with local_cluster.api_client() as api, pytest.raises(client.ApiException) as error:
        _create(api, namespace, manifest)
    assert error.value.status == 422, error.value.body
    message = json.loads(error.value.body)["message"]
    assert field in message, message


def test_only_the_budget_and_suspend_may_change(local_cluster: LocalCluster, sweep_crd: Any, namespace: str) -> None:
    with local_cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        _create(api, namespace, sweep_baseline("edits"), dry_run=False)
        for edit in ({"parallelism": 3}, {"maxTrials": 20}, {"maxFailedTrials": 5}, {"suspend": True}):
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, SWEEP_PLURAL, "edits", {"spec": edit})
        for edit, field in (
            ({"objective": {"direction": "minimize"}}, "spec.objective"),
            ({"algorithm": {"seed": 7}}, "spec.algorithm"),
            ({"trialTemplate": {"spec": {"hyperparameters": {"learningRate": 1e-4}}}}, "spec.trialTemplate"),
        ):
            with pytest.raises(client.ApiException) as error:
                custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, SWEEP_PLURAL, "edits", {"spec": edit})
            message = json.loads(error.value.body)["message"]
            assert field in message and "immutable" in message, message


def test_short_name_category_and_columns(local_cluster: LocalCluster, sweep_crd: Any) -> None:
    names = sweep_crd["spec"]["names"]
    assert names["shortNames"] == ["fts"] and names["categories"] == ["finetune"]
    columns = [c["name"] for c in sweep_crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:6] == ["Phase", "Trials", "Running", "Metric", "Best", "Best Trial"]
