"""``kubectl finetune sweep dashboard``: the sweep replayed into optuna-dashboard, as the operator rebuilds it."""

from __future__ import annotations

import json
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
from optuna.trial import TrialState
from optuna_dashboard import wsgi  # type: ignore[import-untyped]

from finetune_cli.dashboard import replay
from tests.cli.sweeps import sweep, sweep_status, trial_jobs


def _get(storage: Any, path: str) -> Any:
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    statuses: list[str] = []
    body = b"".join(wsgi(storage)(environ, lambda status, headers, *_: statuses.append(status)))
    assert statuses == ["200 OK"], body[:200]
    return json.loads(body)


def test_replay_holds_every_trial_with_its_state_parameters_and_evaluations() -> None:
    jobs = trial_jobs()
    jobs.append({"metadata": {"name": "stranger", "labels": {}}, "status": {}})  # not a trial: left out
    storage, count = replay(sweep(status=sweep_status()), jobs)
    assert count == 5
    study = optuna.load_study(study_name="tune", storage=storage)
    by_name = {t.user_attrs["name"]: t for t in study.trials}
    assert {n: t.state for n, t in by_name.items()} == {
        "tune-t000": TrialState.COMPLETE,
        "tune-t001": TrialState.COMPLETE,
        "tune-t002": TrialState.PRUNED,
        "tune-t003": TrialState.FAIL,
        "tune-t004": TrialState.RUNNING,
    }
    assert study.best_trial.user_attrs["name"] == "tune-t001" and study.best_value == 0.86
    assert by_name["tune-t001"].params == {"lr": 1.1e-4, "decay": 0.01, "freeze": "bottom-4"}
    assert by_name["tune-t002"].intermediate_values == {1: 0.57, 2: 0.62}  # by absolute evaluation number
    assert study.metric_names == ["accuracy"]


def test_optuna_dashboard_serves_the_replayed_study() -> None:
    storage, _ = replay(sweep(status=sweep_status()), trial_jobs())
    summaries = _get(storage, "/api/studies")["study_summaries"]
    assert [(s["study_name"], s["directions"]) for s in summaries] == [("tune", ["maximize"])]
    detail = _get(storage, f"/api/studies/{summaries[0]['study_id']}")
    assert len(detail["trials"]) == 5 and detail["has_intermediate_values"]
    assert detail["objective_names"] == ["accuracy"]
