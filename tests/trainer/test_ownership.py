"""A new FineTuneJob (new uid) at an old job's output location trains from scratch; the same job resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer import run as run_mod
from finetune_trainer.ownership import OWNER_FILE, checkpoint_owner, claim_checkpoints
from tests.trainer import tiny
from tests.trainer.helpers import of, result_json, train
from tests.trainer.test_reporting import FakeApi


def test_claim_keeps_own_checkpoints_and_removes_another_jobs(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-10").mkdir()
    assert claim_checkpoints(tmp_path, None, remove=True) == []  # outside Kubernetes: resume what is there
    assert claim_checkpoints(tmp_path, "job-a", remove=False) == ["checkpoint-10"]  # other ranks: do not resume
    assert (tmp_path / "checkpoint-10").is_dir() and checkpoint_owner(tmp_path) is None
    assert claim_checkpoints(tmp_path, "job-a", remove=True) == ["checkpoint-10"]  # unrecorded: not ours
    assert checkpoint_owner(tmp_path) == "job-a" and not (tmp_path / "checkpoint-10").exists()
    (tmp_path / "checkpoint-20").mkdir()
    assert claim_checkpoints(tmp_path, "job-a", remove=True) == []  # our own: resumed
    assert (tmp_path / "checkpoint-20").is_dir()
    assert claim_checkpoints(tmp_path, "job-b", remove=True) == ["checkpoint-20"]
    assert checkpoint_owner(tmp_path) == "job-b" and sorted(p.name for p in tmp_path.iterdir()) == [OWNER_FILE]


def test_unreadable_owner_counts_as_another_job(tmp_path: Path) -> None:
    (tmp_path / OWNER_FILE).write_text("{not json")
    assert checkpoint_owner(tmp_path) is None
    (tmp_path / OWNER_FILE).write_text(json.dumps(["a"]))
    assert checkpoint_owner(tmp_path) is None


def test_rerun_with_a_new_uid_trains_again_and_the_same_uid_finishes_only(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["noisy"],
        out,  # 16 random-label examples: memorised, validation loss rises, early stopping fires
        hyperparameters={"learningRate": 1e-2, "batchSize": 4, "epochs": 40, "seed": 0, "warmupSteps": 0},
        earlyStopping={"metric": "loss", "patience": 2, "minDelta": 0.001, "restoreBest": True},
        output={"location": str(out), "keepCheckpoints": 1},
    )
    first, events = train(wire, job_uid="uid-old")
    assert first.reason == "EarlyStopped" and of(events, "log")
    (out / "model" / "from-the-old-job").write_text("")

    # `kubectl delete` + `kubectl apply` of the same manifest: same location, new uid
    second, events = train(wire, job_uid="uid-new")
    assert not of(events, "resume"), "a new job must not resume another job's checkpoints"
    assert of(events, "log")[0]["step"] == 1
    evaluated = [e["step"] for e in of(events, "evaluation")]
    assert len(evaluated) >= 3
    assert any("another FineTuneJob's checkpoints" in w["message"] for w in of(events, "warning"))
    assert second.reason == "EarlyStopped" and second.final_step == first.final_step  # same seed, same run
    assert not (out / "model" / "from-the-old-job").exists(), "the new final model replaced the old one"
    assert checkpoint_owner(out / "checkpoints") == "uid-new"
    assert result_json(out)["finalStep"] == second.final_step

    # the same job's pod restarted after training, before it exited: finish only, and say so in status
    (out / "result.json").unlink()
    api = FakeApi()
    monkeypatch.setattr(run_mod, "load_kube_api", lambda: api)
    again, events = train(wire, job_uid="uid-new", job_name="job", job_namespace="ns", report_interval_seconds=0)
    assert again.reason == "EarlyStopped" and not of(events, "log") and of(events, "resume")
    reported = [p["status"] for p in api.patches]
    evaluations = [s["evaluations"] for s in reported if "evaluations" in s]
    assert evaluations and [e["step"] for e in evaluations[-1]] == evaluated
    assert [s["best"] for s in reported if "best" in s][-1] == again.best
