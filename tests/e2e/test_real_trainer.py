"""The whole product: operator + the real trainer, training a tiny model from volumes.

Model, data and output live on PersistentVolumeClaims (the local node backs them with host
directories and mounts them at /mnt/pvc/<claim>, as the operator asks), so the pvc:// path of
a real cluster is the one exercised here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_localcluster.pytest_plugin import LocalCluster
from finetune_operator.api import GROUP, VERSION
from tests.e2e.conftest import Jobs
from tests.trainer import tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _claim(jobs: Jobs, name: str) -> None:
    client.CoreV1Api(jobs.api).create_namespaced_persistent_volume_claim(
        jobs.namespace,
        {
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )


def _volume(local_cluster: LocalCluster, jobs: Jobs, claim: str) -> Path:
    return local_cluster.state_dir / "volumes" / jobs.namespace / claim


def _job(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/tiny-bert", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "pvc://datasets/sentiment", "validation": "validation.jsonl", "maxSeqLength": 32},
            "freeze": {"strategy": "bottom-layers", "layers": 1},
            "hyperparameters": {"learningRate": 1e-3, "batchSize": 8, "epochs": 2, "weightDecay": 0.0},
            "evaluation": {"strategy": "epoch", "metrics": ["loss", "accuracy"]},
            "output": {"location": f"pvc://outputs/{name}"},
        },
    }
    for key, value in spec.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return body


@pytest.fixture
def volumes(local_cluster: LocalCluster, jobs: Jobs) -> Path:
    for claim in ("models", "datasets", "outputs"):
        _claim(jobs, claim)
    tiny.save_model(_volume(local_cluster, jobs, "models") / "tiny-bert")
    tiny.write_sentiment(_volume(local_cluster, jobs, "datasets") / "sentiment", n_train=64, n_val=32)
    tiny.write_sentiment(_volume(local_cluster, jobs, "datasets") / "noisy", n_train=64, n_val=32, noisy=True)
    return _volume(local_cluster, jobs, "outputs")


def _exists(jobs: Jobs, name: str) -> bool:
    try:
        jobs.get(name)
    except client.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def test_real_trainer_reports_progress_and_completes(jobs: Jobs, volumes: Path) -> None:
    jobs.create(_job("tiny"))
    running = jobs.wait_condition("tiny", "Running", timeout=120)
    assert running["status"]["workload"]["job"] == "tiny-trainer"
    done = jobs.wait_condition("tiny", "Complete", "Succeeded", timeout=300)
    status = done["status"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 16
    assert status["progress"]["percent"] == 100
    assert [e["step"] for e in status["evaluations"]] == [8, 16]
    assert {"loss", "accuracy"} <= set(status["evaluations"][-1]["metrics"])
    assert status["best"]["checkpoint"].startswith("pvc://outputs/tiny/checkpoints/checkpoint-")
    result = json.loads((volumes / "tiny" / "result.json").read_text())
    assert result["reason"] == "Succeeded"
    assert (volumes / "tiny" / "model" / "config.json").exists()

    # Re-run from Git: delete, wait for the old children to go, apply the same manifest (same output
    # location, new uid). It must train again, not resume (or instantly "finish") the old run.
    jobs.delete("tiny")
    deadline = time.monotonic() + 120
    while any(jobs.children("tiny").values()) or _exists(jobs, "tiny"):
        assert time.monotonic() < deadline, f"the deleted job's children linger: {jobs.children('tiny')}"
        time.sleep(0.5)
    before = (volumes / "tiny" / "result.json").stat().st_mtime
    jobs.create(_job("tiny"))
    again = jobs.wait_condition("tiny", "Complete", "Succeeded", timeout=300)["status"]
    assert [e["step"] for e in again["evaluations"]] == [8, 16], "the new job trained and evaluated"
    assert (volumes / "tiny" / "result.json").stat().st_mtime > before
    assert (volumes / "tiny" / "model" / "config.json").exists()


def test_real_trainer_early_stops_with_the_best_checkpoint(jobs: Jobs, volumes: Path) -> None:
    jobs.create(
        _job(
            "overfit",
            dataset={"source": "pvc://datasets/noisy"},
            freeze={"strategy": "none", "layers": None},
            hyperparameters={"learningRate": 5e-3, "epochs": 20},
            evaluation={"strategy": "steps", "interval": 4},
            earlyStopping={"metric": "loss", "patience": 2},
        )
    )
    done = jobs.wait_condition("overfit", "Complete", "EarlyStopped", timeout=300)
    status = done["status"]
    early = status["earlyStopping"]
    assert early["triggered"] and early["evaluationsWithoutImprovement"] == 2
    assert status["progress"]["step"] < status["progress"]["totalSteps"], "stopped before the planned end"
    best = status["best"]
    assert best["step"] == early["bestStep"]
    checkpoint = volumes / best["checkpoint"].removeprefix("pvc://outputs/")
    assert checkpoint.is_dir(), f"best checkpoint {best['checkpoint']} was not kept"
    assert json.loads((volumes / "overfit" / "result.json").read_text())["reason"] == "EarlyStopped"
