"""A FineTuneSweep with the real trainer: three seeded random trials of a tiny model reach Complete, and the
best trial clearly beats the worst (the search had something to find).

The base model is read from the project's S3 server (credentials from a Secret) through a download cache on a
claim the trials share: the three trials, started at once, download it once (their ``s3_download`` lines)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_cli.main import main
from finetune_devtools.seaweedfs import S3Endpoint
from finetune_operator.api.job import GROUP, VERSION
from finetune_testsupport.pytest_plugin import LocalCluster
from finetune_trainer import s3
from tests.e2e.conftest import Jobs, real_job, s3_secret, s3_test_env
from tests.e2e.test_sweeps import Sweeps, condition, finished

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _sweep(name: str, **spec: Any) -> dict[str, Any]:
    # Early stopping on the objective (patience longer than the run): the trainer's best, and so the sweep's
    # bestTrial.checkpoint, is then the objective's best.
    template = real_job("template", earlyStopping={"metric": "accuracy", "patience": 5}, **spec)["spec"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "objective": {"metric": "accuracy", "direction": "maximize"},
            "algorithm": {"name": "random", "seed": 42},  # lr 3.7e-3, 4.6e-4, 1.3e-5
            # 1e-5 barely moves a tiny model in 16 steps; 1e-2 learns the synthetic sentiment at once
            "parameters": [
                {"name": "lr", "path": "hyperparameters.learningRate", "float": {"min": 1e-5, "max": 1e-2, "log": True}}
            ],
            "trialTemplate": {"spec": template},
            "parallelism": 3,
            "maxTrials": 3,
            "maxFailedTrials": 1,
        },
    }


def test_real_trainer_random_sweep_completes_with_a_clear_best(
    local_cluster: LocalCluster,
    jobs: Jobs,
    volumes: Path,
    s3_server: S3Endpoint,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = s3_test_env(monkeypatch, s3_server)
    model = s3.publish(
        volumes.parent / "models" / "tiny-bert", f"s3://sweep-{uuid.uuid4().hex[:10]}/tiny-bert", settings
    )
    s3_secret(jobs.api, jobs.namespace, s3_server, "s3-credentials")
    sweeps = Sweeps(jobs)
    started = time.monotonic()
    sweeps.create(
        _sweep(
            "lr",
            model={"source": model},
            storage={"s3": settings.to_wire(), "cache": {"location": "pvc://outputs/s3-cache"}},
        )
    )
    done = sweeps.wait("lr", "Complete or Failed", finished, timeout=240)
    elapsed = time.monotonic() - started
    status = done["status"]
    assert condition(done, "Complete") == ("True", "MaxTrialsReached"), status
    assert status["trialCounts"]["total"] == 3 and status["trialCounts"]["failed"] == 0, status["trialCounts"]
    values = [t["value"] for t in status["trials"]]
    best = status["bestTrial"]
    assert best["value"] == max(values) and best["value"] - min(values) >= 0.02, status["trials"]
    trials = sweeps.trials("lr")
    assert sorted(t["metadata"]["name"] for t in trials) == ["lr-t000", "lr-t001", "lr-t002"]
    for trial in trials:  # each trial trained into its own output location
        assert (volumes / "template" / trial["metadata"]["name"] / "model" / "config.json").exists()
        assert trial["status"]["artifacts"][0]["baseModel"]["source"] == model, trial["status"]["artifacts"]
    # the trials started together; the one that took the cache entry's lock downloaded, the others waited for it
    core = client.CoreV1Api(jobs.api)
    downloads = []
    for trial in trials:
        selector = f"batch.kubernetes.io/job-name={trial['metadata']['name']}-trainer"
        (pod,) = core.list_namespaced_pod(jobs.namespace, label_selector=selector).items
        lines = core.read_namespaced_pod_log(pod.metadata.name, jobs.namespace).splitlines()
        downloads += [
            e for e in map(json.loads, filter(lambda line: line[:1] == "{", lines)) if e["event"] == "s3_download"
        ]
    assert sorted((d["source"], d["cached"], d["bytes"] > 0) for d in downloads) == [
        (model, False, True),
        (model, True, False),
        (model, True, False),
    ], downloads
    assert best["checkpoint"].startswith(f"pvc://outputs/template/{best['name']}/")

    with pytest.raises(SystemExit) as exited:
        main(["sweep", "describe", "lr", "-n", jobs.namespace, "--kubeconfig", str(local_cluster.kubeconfig)])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    table = text.split("Trials (best first by accuracy):\n")[1].splitlines()
    assert table[1].split()[:2] == ["*", best["name"]], text
    print(f"real-trainer sweep: 3 trials Complete in {elapsed:.0f} s; values {sorted(values)}")
