"""MLflow tracking end to end (issue 28): the real trainer logs a job and a 3-trial sweep to a real MLflow server,
which is stopped mid-run and started again; everything is read back through MLflow's REST API.

One real job and one tiny sweep, started at once and shared by the checks (real trainers cost a core each): the
job trains 16 steps with two evaluations (long enough to still be logging when the server goes away), each trial
2 steps with its one evaluation. Which trial makes the sweep's parent run, and the race when they all do, is
tests/trainer/test_tracking_parents.py's (fast, no cluster)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client

from finetune_devtools.mlflow_server import MlflowServer
from finetune_operator.api.job import GROUP, VERSION
from finetune_testsupport.pytest_plugin import LocalCluster
from finetune_trainer.tracking import JOB_UID_TAG, PARENT_TAG, SWEEP_UID_TAG
from tests.e2e.conftest import Jobs, Operator, real_job, tiny_volumes
from tests.e2e.test_sweeps import Sweeps, condition, finished

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "tiny-sentiment"


class Rest:
    """MLflow's REST API (what any client of the server sees)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        url = f"{self.uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as answer:
            found: dict[str, Any] = json.load(answer)
        return found

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            found: dict[str, Any] = json.load(answer)
        return found

    def runs(self, experiment_id: str, filter_: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.post(
            "runs/search", {"experiment_ids": [experiment_id], "filter": filter_, "max_results": 100}
        ).get("runs", [])
        return runs

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        metrics = self.get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
        return sorted((int(m.get("step", 0)), float(m["value"])) for m in metrics)


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _params(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


@dataclass
class Tracked:
    jobs: Jobs
    sweeps: Sweeps
    server: MlflowServer
    rest: Rest


@pytest.fixture(scope="module")
def tracked(local_cluster: LocalCluster, operator: Operator, mlflow_server: MlflowServer) -> Tracked:
    """A job (registered as MODEL) and a 3-trial sweep, tracked; the server goes away once the job's trainer has
    its run, and comes back once the job reports tracking behind."""
    namespace = local_cluster.create_namespace("mlflow")
    api = local_cluster.api_client()
    tiny_volumes(local_cluster, api, namespace)
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "mlflow-creds"},
            "stringData": {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"},
        },
    )
    jobs = Jobs(api, namespace, operator)
    sweeps = Sweeps(jobs)
    tracking = {"uri": mlflow_server.uri, "credentialsSecretRef": {"name": "mlflow-creds"}}
    jobs.create(
        real_job(
            "tracked",
            evaluation={"strategy": "steps", "interval": 8},
            tracking={**tracking, "registerAs": MODEL},
        )
    )
    template = real_job(
        "template",
        hyperparameters={"maxSteps": 2},
        evaluation={"strategy": "steps", "interval": 2},
        tracking=tracking,
    )["spec"]
    sweeps.create(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneSweep",
            "metadata": {"name": "lr"},
            "spec": {
                "objective": {"metric": "accuracy", "direction": "maximize"},
                "algorithm": {"name": "random", "seed": 42},
                "parameters": [
                    {
                        "name": "lr",
                        "path": "hyperparameters.learningRate",
                        "float": {"min": 1e-5, "max": 1e-2, "log": True},
                    }
                ],
                "trialTemplate": {"spec": template},
                "parallelism": 3,
                "maxTrials": 3,
            },
        }
    )
    jobs.wait("tracked", "a run id", lambda b: bool(((b.get("status") or {}).get("tracking") or {}).get("runId")), 600)
    mlflow_server.stop()
    jobs.wait_event("tracked", "TrackingBehind", timeout=300)
    behind = jobs.get("tracked")
    assert condition(behind, "TrackingBehind") == ("True", "TrackingBehind"), behind["status"].get("conditions")
    mlflow_server.start()
    jobs.wait_condition("tracked", "Complete", timeout=900)
    sweeps.wait("lr", "Complete", finished, timeout=900)
    return Tracked(jobs, sweeps, mlflow_server, Rest(mlflow_server.uri))


def test_a_job_is_logged_once_with_its_spec_and_evaluations_and_registered_once(tracked: Tracked) -> None:
    jobs, rest = tracked.jobs, tracked.rest
    done = jobs.wait("tracked", "tracking caught up", lambda b: not b["status"]["tracking"].get("behind"), 120)
    status = done["status"]
    assert condition(done, "TrackingBehind") == ("False", "TrackingSynced"), status["conditions"]
    tracking = status["tracking"]
    experiment = rest.get("experiments/get-by-name", experiment_name=jobs.namespace)["experiment"]
    runs = rest.runs(experiment["experiment_id"], f"tags.`{JOB_UID_TAG}` = '{done['metadata']['uid']}'")
    assert [r["info"]["run_id"] for r in runs] == [tracking["runId"]], "one run for the job, reused on reconnect"
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    assert tracking["url"].endswith(f"/#/experiments/{experiment['experiment_id']}/runs/{tracking['runId']}")
    params = _params(run)
    assert params["hyperparameters.learningRate"] == "0.001"
    assert params["model.source"] == "pvc://models/tiny-bert"
    assert params["tracking.registerAs"] == MODEL
    assert int(params["freeze.trainableParameters"]) < int(params["freeze.totalParameters"])
    tags = _tags(run)
    assert tags["finetune.dev/outcome"] == "Succeeded"
    assert tags["finetune.dev/best.step"] == str(status["best"]["step"])

    files = rest.get("artifacts/list", run_id=tracking["runId"]).get("files", [])
    assert "curves.png" in {f["path"] for f in files}, files
    steps = [e["step"] for e in status["evaluations"]]
    assert steps == [8, 16]
    for key in ("eval_accuracy", "eval_loss"):
        history = rest.history(run["info"]["run_id"], key)
        assert [s for s, _ in history] == steps, f"{key}: each evaluation once, at its step"
    metric = {e["step"]: e["metrics"]["accuracy"] for e in status["evaluations"]}
    assert all(abs(v - metric[s]) < 1e-9 for s, v in rest.history(run["info"]["run_id"], "eval_accuracy"))
    train = [s for s, _ in rest.history(run["info"]["run_id"], "train_loss")]
    assert train and len(train) == len(set(train)), f"training loss logged twice at a step: {train}"

    versions = rest.get("model-versions/search", filter=f"name='{MODEL}'")["model_versions"]
    assert len(versions) == 1, versions
    version = versions[0]
    assert tracking["registeredVersion"] == version["version"]
    assert version["run_id"] == tracking["runId"]
    assert version["source"] == "pvc://outputs/tracked/model"
    vtags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert vtags[JOB_UID_TAG] == done["metadata"]["uid"]
    assert vtags["base.model"] == "pvc://models/tiny-bert"
    assert vtags["dataset.fingerprint"].startswith("sha256:")
    assert vtags["best.metric"] == status["best"]["metric"]
    assert float(vtags["best.value"]) == status["best"]["value"]
    assert "TrackingBehind" in jobs.events("tracked")


def test_a_sweep_is_a_parent_run_with_a_child_run_per_trial(tracked: Tracked) -> None:
    sweeps, rest = tracked.sweeps, tracked.rest
    sweep = sweeps.get("lr")
    experiment = rest.get("experiments/get-by-name", experiment_name=tracked.jobs.namespace)["experiment"]
    parents = rest.runs(experiment["experiment_id"], f"tags.`{SWEEP_UID_TAG}` = '{sweep['metadata']['uid']}'")
    assert len(parents) == 1, "the trials agree on one parent run"
    parent = parents[0]["info"]["run_id"]
    children = rest.runs(experiment["experiment_id"], f"tags.`{PARENT_TAG}` = '{parent}'")
    trials = {t["metadata"]["uid"]: t for t in sweeps.trials("lr")}
    assert sorted(_tags(c)[JOB_UID_TAG] for c in children) == sorted(trials)
    for child in children:
        trial = trials[_tags(child)[JOB_UID_TAG]]
        sampled = json.loads(trial["metadata"]["annotations"]["finetune.dev/parameters"])
        params = _params(child)
        assert float(params["trial.lr"]) == pytest.approx(sampled["lr"])
        assert float(params["hyperparameters.learningRate"]) == pytest.approx(sampled["lr"])
        assert _tags(child)["finetune.dev/outcome"] in ("Succeeded", "EarlyStopped")
        assert trial["status"]["tracking"]["parentRunId"] == parent
