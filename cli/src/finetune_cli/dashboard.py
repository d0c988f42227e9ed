"""``kubectl finetune sweep dashboard``: replay a FineTuneSweep into optuna-dashboard on this machine.

The study is rebuilt exactly as the operator rebuilds it on every reconcile (its own ``observe_trial``
and ``build_study``: parameters from each trial's annotation, its evaluations as intermediate values
by absolute evaluation number), then copied into a fresh in-memory storage that optuna-dashboard
serves. It is a snapshot: run the command again to see newer trials. Optuna is imported here only,
so the other commands stay light.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.storages import InMemoryStorage

from finetune_operator.api.sweep import FineTuneSweep
from finetune_operator.reconcile.sweep_engine import build_study
from finetune_operator.reconcile.trials import observe_trial

Manifest = dict[str, Any]


def replay(sweep_obj: Manifest, trial_objs: Sequence[Manifest]) -> tuple[InMemoryStorage, int]:
    """A storage holding one study, named after the sweep, with every trial the sweep can see; and their number."""
    sweep = FineTuneSweep.model_validate(sweep_obj)
    observed = [t for t in (observe_trial(sweep, body) for body in trial_objs) if t is not None]
    rebuilt = build_study(sweep, observed)
    storage = InMemoryStorage()
    study = optuna.create_study(
        storage=storage, study_name=sweep.metadata.name, direction=sweep.spec.objective.direction
    )
    with warnings.catch_warnings():  # metric names are "experimental" in Optuna, yet the dashboard shows them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([sweep.spec.objective.metric])
    trials = rebuilt.get_trials(deepcopy=False)
    study.add_trials(trials)
    return storage, len(trials)


def serve(storage: InMemoryStorage, host: str, port: int) -> None:
    """Serve until interrupted (optuna-dashboard's own server)."""
    from optuna_dashboard import run_server  # type: ignore[import-untyped]  # noqa: PLC0415

    run_server(storage, host=host, port=port)
