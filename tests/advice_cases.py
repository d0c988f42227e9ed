"""FineTuneJob manifests that each deserve exactly one apply-time warning, shared by the unit test (pydantic)
and the integration test (the generated ValidatingAdmissionPolicy on a real API server)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import yaml

from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import Manifest, baseline


@dataclass(frozen=True)
class Case:
    id: str
    edit: Callable[[Manifest], None]
    reason: str
    """The one warning expected (``Advice.reason``); empty when none is."""


def _spec(**changes: object) -> Callable[[Manifest], None]:
    """Set (or, with None, delete) dotted paths below ``spec``."""

    def edit(manifest: Manifest) -> None:
        for path, value in changes.items():
            node = manifest["spec"]
            *parents, leaf = path.split("__")
            for key in parents:
                node = node.setdefault(key, {})
            if value is None:
                node.pop(leaf, None)
            else:
                node[leaf] = value

    return edit


def _null_early_stopping(manifest: Manifest) -> None:
    """``earlyStopping: null`` on a long run: absent, as pydantic reads it (found by the manifest fuzzing)."""
    _spec(hyperparameters__epochs=10)(manifest)
    manifest["spec"]["earlyStopping"] = None


def _minimal(manifest: Manifest) -> None:
    """Only the required fields: every optional object is absent (CEL must not trip over a missing key)."""
    spec = manifest["spec"]
    manifest["spec"] = {
        "model": spec["model"],
        "dataset": {"source": spec["dataset"]["source"]},
        "output": spec["output"],
    }


CASES: list[Case] = [
    Case("baseline", _spec(), ""),
    Case("high-learning-rate", _spec(hyperparameters__learningRate=5e-3), "HighLearningRate"),
    Case("learning-rate-as-integer", _spec(hyperparameters__learningRate=2), "HighLearningRate"),
    Case("lora-moderate-rate", _spec(freeze={"strategy": "lora"}, hyperparameters__learningRate=3e-3), ""),
    Case("lora-high-rate", _spec(freeze={"strategy": "lora"}, hyperparameters__learningRate=1e-2), "HighLearningRate"),
    Case("no-validation", _spec(dataset__validation=None, earlyStopping=None), "NoValidationData"),
    Case("minimal", _minimal, "NoValidationData"),
    Case("many-epochs-no-early-stopping", _spec(earlyStopping=None, hyperparameters__epochs=10), "NoEarlyStopping"),
    Case(
        "many-epochs-max-steps", _spec(earlyStopping=None, hyperparameters__epochs=10, hyperparameters__maxSteps=50), ""
    ),
    Case("three-epochs-no-early-stopping", _spec(earlyStopping=None, hyperparameters__epochs=3), ""),
    Case("many-epochs-explicit-null-early-stopping", _null_early_stopping, "NoEarlyStopping"),
    Case("no-restore-best", _spec(earlyStopping__restoreBest=False, hyperparameters__epochs=5), "NoRestoreBest"),
    Case("image-without-augmentation", _spec(model__task="image-classification"), "NoAugmentation"),
    Case(
        "image-with-augmentation",
        _spec(model__task="image-classification", augmentation={"horizontalFlip": 0.5}),
        "",
    ),
    Case(
        "none-checkpointing-frozen-embeddings",
        _spec(freeze={"strategy": "none", "embeddings": True}, hyperparameters__gradientCheckpointing=True),
        "ContradictoryFreeze",
    ),
    Case(
        "head-only-checkpointing",
        _spec(freeze={"strategy": "head-only"}, hyperparameters__gradientCheckpointing=True),
        "UselessCheckpointing",
    ),
    Case(
        "label-smoothing-loss-stopping",
        _spec(hyperparameters__labelSmoothing=0.1, earlyStopping__metric="loss"),
        "SmoothedLossForStopping",
    ),
    Case("label-smoothing-accuracy-stopping", _spec(hyperparameters__labelSmoothing=0.1), ""),
]


def manifest(case: Case) -> Manifest:
    m = baseline(f"advice-{case.id}"[:63])
    case.edit(m)
    return m


def apply_dry_run(cluster: LocalCluster, namespace: str, m: Manifest) -> tuple[int, str]:
    """``kubectl apply --dry-run=server``: (exit code, stderr, where the ``Warning:`` lines are)."""
    m = {**m, "metadata": {**m["metadata"], "namespace": namespace}}
    res = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(m), check=False)
    return res.returncode, res.stderr


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Warning:")]


@contextmanager
def advice_in_force(cluster: LocalCluster, namespace: str) -> Iterator[None]:
    """The chart's advice policy (the ``crd`` fixture installs it cluster-wide, as the chart does) in force
    in ``namespace``: a policy is type-checked before its binding takes effect everywhere."""
    probe = manifest(next(c for c in CASES if c.reason == "HighLearningRate"))
    deadline = time.monotonic() + 60
    while not warning_lines(apply_dry_run(cluster, namespace, probe)[1]):
        assert time.monotonic() < deadline, "the advice policy never took effect"
        time.sleep(0.5)
    yield
