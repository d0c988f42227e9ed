"""Every shipped example, applied with kubectl to the real API server: what the server stores (not what
Python parses from the YAML) is a valid object for the operator's models, and for a sweep every trial it
can create is a valid FineTuneJob.

kubectl and the API server change an object on its way in (kubectl drops nulls, the server prunes and
defaults), so a test that parses the YAML in Python can pass while the stored object is something else:
a preset's ``freeze.layers: null`` never reached the server (issue 23, item 4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api.job import FineTuneJob, FineTuneJobSpec
from finetune_operator.api.sweep import FineTuneSweep, trial_spec
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import EXAMPLES, SWEEP_EXAMPLES, example, sweep_trial_values

pytestmark = pytest.mark.integration


def kubectl_apply(cluster: LocalCluster, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """``kubectl apply --dry-run=server``: the object as the API server would store it."""
    manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    applied = cluster.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump(manifest))
    stored: dict[str, Any] = json.loads(applied.stdout)
    return stored


@pytest.mark.parametrize("path", EXAMPLES + SWEEP_EXAMPLES, ids=lambda p: p.name)
def test_every_example_as_stored_by_the_api_server_is_valid(
    local_cluster: LocalCluster, sweep_crd: Any, namespace: str, path: Path
) -> None:
    stored = kubectl_apply(local_cluster, namespace, example(path))
    if stored["kind"] == "FineTuneJob":
        FineTuneJob.model_validate(stored)
        return
    spec = FineTuneSweep.model_validate(stored).spec  # every value makes a valid trial, as the operator checks
    for index, values in enumerate(sweep_trial_values(spec)):
        FineTuneJobSpec.model_validate(trial_spec(spec, values, f"{path.stem}-t{index:03d}"))


def test_a_preset_unset_survives_kubectl_and_a_null_would_not(
    local_cluster: LocalCluster, sweep_crd: Any, namespace: str
) -> None:
    manifest = example(next(p for p in SWEEP_EXAMPLES if p.name == "minilm-sweep-tpe.yaml"))
    stored = kubectl_apply(local_cluster, namespace, manifest)
    presets = {p["label"]: p for p in stored["spec"]["parameters"][2]["categorical"]["presets"]}
    assert presets["head-only"]["unset"] == ["freeze.layers"]
    spec = FineTuneSweep.model_validate(stored).spec
    assert "layers" not in trial_spec(spec, {"freeze": "head-only"}, "t")["freeze"]
    # Why not null: kubectl drops it, so the server never sees what the user wrote.
    presets_written = manifest["spec"]["parameters"][2]["categorical"]["presets"]
    presets_written[2] = {"label": "head-only", "set": {"freeze.strategy": "head-only", "freeze.layers": None}}
    dropped = kubectl_apply(local_cluster, namespace, manifest)
    assert dropped["spec"]["parameters"][2]["categorical"]["presets"][2]["set"] == {"freeze.strategy": "head-only"}
