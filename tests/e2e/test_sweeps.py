"""FineTuneSweeps end to end on the real control plane, with scripted trainers (fake_trainer.py sweep):
parallelism holds, median pruning stops the poor trials as Complete/Pruned, successive halving records
its rung verdicts on the trials, a preset's unset survives kubectl, a reached goal stays Complete,
raising maxTrials resumes a completed sweep, a kill -9 of the operator loses and duplicates no trial,
maxFailedTrials fails the sweep."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_operator.api.sweep import RUNGS_ANNOTATION, SWEEP_LABEL, SWEEP_PLURAL, TRIAL_INDEX_LABEL
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.e2e.conftest import Jobs, Operator, fake_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def fake_sweep(name: str, tmp: Path, image: str = "finetune-test/sweep:1", **spec: Any) -> dict[str, Any]:
    template = fake_job("template", image, tmp)["spec"]
    template["evaluation"] = {"strategy": "steps", "interval": 10, "metrics": ["loss", "accuracy"]}
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "objective": {"metric": "accuracy", "direction": "maximize"},
            "algorithm": {"name": "random", "seed": 3},
            "parameters": [{"name": "decay", "path": "hyperparameters.weightDecay", "float": {"min": 0.0, "max": 0.5}}],
            "trialTemplate": {"spec": template},
            "parallelism": 2,
            "maxTrials": 4,
            "maxFailedTrials": 3,
        },
    }
    body["spec"].update(spec)
    return body


class Sweeps:
    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.custom = client.CustomObjectsApi(jobs.api)
        self.namespace = jobs.namespace

    def create(self, manifest: dict[str, Any]) -> None:
        manifest["metadata"]["namespace"] = self.namespace
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, SWEEP_PLURAL, manifest)

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, SWEEP_PLURAL, name
        )
        return found

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, SWEEP_PLURAL, name, patch)

    def trials(self, name: str) -> list[dict[str, Any]]:
        listed = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, label_selector=f"{SWEEP_LABEL}={name}"
        )
        return sorted(listed["items"], key=lambda t: int(t["metadata"]["labels"][TRIAL_INDEX_LABEL]))

    def wait(
        self,
        name: str,
        what: str,
        holds: Callable[[dict[str, Any]], bool],
        timeout: float = 120,
        each: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        current: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if each is not None:
                each()
            current = self.get(name)
            if holds(current):
                return current
            time.sleep(0.3)
        raise AssertionError(
            f"{name}: timed out waiting for {what}\nstatus: {yaml.safe_dump(current.get('status'))}\n"
            f"operator log:\n{self.jobs.operator.tail()}"
        )


def condition(body: dict[str, Any], type_: str) -> tuple[str, str] | None:
    for c in (body.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c["reason"]
    return None


def finished(trial: dict[str, Any]) -> bool:
    return any(condition(trial, t) is not None and condition(trial, t)[0] == "True" for t in ("Complete", "Failed"))


def test_parallelism_holds_median_pruning_stops_the_poor_and_raising_max_trials_resumes(
    jobs: Jobs, operator: Operator, tmp_path: Path
) -> None:
    sweeps = Sweeps(jobs)
    pruning = {"name": "median", "warmupEvaluations": 2, "startupTrials": 3}
    sweeps.create(fake_sweep("par", tmp_path, parallelism=3, maxTrials=12, pruning=pruning))
    peak = [0]

    def count_running() -> None:
        peak[0] = max(peak[0], sum(not finished(t) for t in sweeps.trials("par")))

    done = sweeps.wait(
        "par",
        "Complete",
        lambda b: condition(b, "Complete") == ("True", "MaxTrialsReached"),
        timeout=240,
        each=count_running,
    )
    trials = sweeps.trials("par")
    assert [t["metadata"]["name"] for t in trials] == [f"par-t{i:03d}" for i in range(12)]
    assert peak[0] <= 3, peak[0]
    pruned = [t for t in trials if condition(t, "Complete") == ("True", "Pruned")]
    assert pruned, [condition(t, "Complete") for t in trials]
    assert {t["status"]["phase"] for t in pruned} == {"Pruned"}
    assert len({t["spec"]["output"]["location"] for t in trials}) == 12
    counts = done["status"]["trialCounts"]
    assert counts["total"] == 12 and counts["pruned"] == len(pruned) and counts["running"] == 0
    best = done["status"]["bestTrial"]
    assert best["name"] not in {t["metadata"]["name"] for t in pruned}
    assert f'finetune_sweep_trials{{name="par",namespace="{jobs.namespace}",state="pruned"}}' in operator.metrics()

    sweeps.patch("par", {"spec": {"maxTrials": 13}})
    resumed = sweeps.wait(
        "par",
        "13 trials and Complete again",
        lambda b: (
            b["status"]["trialCounts"]["total"] == 13 and condition(b, "Complete") == ("True", "MaxTrialsReached")
        ),
        timeout=120,
    )
    assert resumed["status"]["trialCounts"]["running"] == 0


def test_operator_kill9_mid_sweep_loses_and_duplicates_no_trial(jobs: Jobs, operator: Operator, tmp_path: Path) -> None:
    sweeps = Sweeps(jobs)
    sweeps.create(fake_sweep("crash", tmp_path, parallelism=2, maxTrials=4))
    sweeps.wait("crash", "two trials", lambda _: len(sweeps.trials("crash")) >= 2, timeout=60)
    operator.kill()
    time.sleep(1)
    operator.start()
    done = sweeps.wait(
        "crash", "Complete", lambda b: condition(b, "Complete") == ("True", "MaxTrialsReached"), timeout=180
    )
    trials = sweeps.trials("crash")
    assert [t["metadata"]["name"] for t in trials] == [f"crash-t{i:03d}" for i in range(4)]
    assert all(finished(t) for t in trials)
    assert [s["name"] for s in done["status"]["trials"]] == [t["metadata"]["name"] for t in trials]


def test_max_failed_trials_fails_the_sweep(jobs: Jobs, tmp_path: Path) -> None:
    sweeps = Sweeps(jobs)
    sweeps.create(fake_sweep("failing", tmp_path, image="finetune-test/exit-2:1", parallelism=1, maxFailedTrials=2))
    failed = sweeps.wait("failing", "Failed", lambda b: condition(b, "Failed") == ("True", "TooManyFailedTrials"))
    assert failed["status"]["trialCounts"]["failed"] == 2 and len(sweeps.trials("failing")) == 2
    assert condition(failed, "Stalled") == ("True", "TooManyFailedTrials")
    jobs.wait_event("failing", "TooManyFailedTrials")


def test_a_value_that_makes_an_invalid_trial_fails_the_sweep_before_any_trial(jobs: Jobs, tmp_path: Path) -> None:
    sweeps = Sweeps(jobs)
    bad = [{"name": "batch", "path": "hyperparameters.batchSize", "int": {"min": 0, "max": 16}}]
    sweeps.create(fake_sweep("invalid", tmp_path, parameters=bad))
    failed = sweeps.wait("invalid", "Failed", lambda b: condition(b, "Failed") == ("True", "InvalidSpec"), timeout=60)
    assert "spec.parameters[0] (batch): value 0" in failed["status"]["message"], failed["status"]["message"]
    assert sweeps.trials("invalid") == []
    jobs.wait_event("invalid", "InvalidSpec")


def test_a_head_only_preset_applied_with_kubectl_runs_and_the_goal_ends_the_sweep_complete(
    jobs: Jobs, local_cluster: LocalCluster, tmp_path: Path
) -> None:
    """Issue 23 items 3 and 4: the head-only preset drops the template's freeze.layers with ``unset`` (a null
    does not survive kubectl), its trials run; the goal ends the sweep Complete, and the trials it stops on
    the way never turn it Failed."""
    sweeps = Sweeps(jobs)
    manifest = fake_sweep(
        "preset",
        tmp_path,
        algorithm={"name": "grid"},
        objective={"metric": "accuracy", "direction": "maximize", "goal": 0.7},
        parameters=[
            {
                "name": "freeze",
                "categorical": {
                    "presets": [
                        {"label": "bottom-2", "set": {"freeze.strategy": "bottom-layers", "freeze.layers": 2}},
                        {"label": "head-only", "set": {"freeze.strategy": "head-only"}, "unset": ["freeze.layers"]},
                    ]
                },
            },
            {"name": "decay", "path": "hyperparameters.weightDecay", "categorical": {"values": [0.1, 0.3]}},
        ],
        parallelism=4,
    )
    manifest["spec"]["trialTemplate"]["spec"]["freeze"] = {"strategy": "bottom-layers", "layers": 2}
    manifest["metadata"]["namespace"] = jobs.namespace
    local_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    done = sweeps.wait("preset", "GoalReached", lambda b: condition(b, "Complete") == ("True", "GoalReached"))
    trials = sweeps.trials("preset")
    head_only = [t for t in trials if t["spec"]["freeze"]["strategy"] == "head-only"]
    assert head_only and all("layers" not in t["spec"]["freeze"] for t in head_only)
    settled = sweeps.wait(
        "preset",
        "every trial finished",
        lambda b: b["status"]["trialCounts"]["running"] == 0 and all(finished(t) for t in sweeps.trials("preset")),
    )
    assert condition(settled, "Complete") == ("True", "GoalReached"), settled["status"]
    assert condition(settled, "Failed") != ("True", "TooManyFailedTrials")
    assert settled["status"]["trialCounts"]["failed"] == 0, settled["status"]["trialCounts"]
    assert done["status"]["bestTrial"]["value"] >= 0.7


def test_successive_halving_records_its_rung_verdicts_on_the_trials(jobs: Jobs, tmp_path: Path) -> None:
    """Issue 23 item 11: each rung verdict is written on its trial (finetune.dev/rungs), in the same patch as
    the prune it leads to, so a rebuilt study never judges a rung twice."""
    sweeps = Sweeps(jobs)
    pruning = {"name": "successive-halving", "warmupEvaluations": 1, "startupTrials": 0}
    sweeps.create(fake_sweep("halving", tmp_path, parallelism=3, maxTrials=6, pruning=pruning))
    sweeps.wait("halving", "Complete", lambda b: condition(b, "Complete") == ("True", "MaxTrialsReached"), timeout=180)
    trials = sweeps.trials("halving")
    verdicts = {
        t["metadata"]["name"]: json.loads(t["metadata"]["annotations"][RUNGS_ANNOTATION])
        for t in trials
        if RUNGS_ANNOTATION in t["metadata"]["annotations"]
    }
    assert verdicts, "no trial carries a rung verdict"
    assert all(set(v) <= {"completed_rung_0", "completed_rung_1"} for v in verdicts.values()), verdicts
    for trial in trials:
        if condition(trial, "Complete") == ("True", "Pruned"):
            assert trial["metadata"]["name"] in verdicts, "a pruned trial carries the verdict that pruned it"
