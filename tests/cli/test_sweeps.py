"""``kubectl finetune sweep``: the pure rendering (list, describe) and the plot, on hand-made objects."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from finetune_cli.plot import BEST_GID, PRUNED_GID, NothingToPlotError, save_png, sweep_figure
from finetune_cli.sweeps import describe, list_table, parse_sweep, state, trials
from finetune_operator.api.sweep import PARAMETERS_ANNOTATION
from tests.cli.jobs import condition
from tests.cli.sweeps import sweep, sweep_status, trial_jobs

NOW = datetime(2026, 1, 1, 1, 0, 0, tzinfo=UTC)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_list_shows_state_trials_and_best() -> None:
    rows = [
        parse_sweep(sweep("tune", sweep_status())),
        parse_sweep(sweep("done", sweep_status(complete=True))),
        parse_sweep(sweep("new")),
    ]
    lines = list_table(rows, NOW).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "TRIALS", "RUNNING", "PRUNED", "FAILED", "OBJECTIVE", "BEST", "AGE"]
    assert lines[1].split() == [
        "tune",
        "Running",
        "4/12",
        "1",
        "1",
        "1",
        "accuracy",
        "(max)",
        "0.86",
        "(tune-t001)",
        "60m",
    ]
    assert lines[2].split()[:3] == ["done", "Complete", "(MaxTrialsReached)"]
    assert lines[3].split() == ["new", "Pending", "0/12", "0", "0", "0", "accuracy", "(max)", "-", "60m"]
    assert list_table(rows, NOW, all_namespaces=True).split()[:2] == ["NAMESPACE", "NAME"]


def test_state_prefers_terminal_conditions_and_shows_suspension() -> None:
    assert (
        state({"conditions": [condition("Failed", "True", "MaxFailedTrialsReached")]})
        == "Failed (MaxFailedTrialsReached)"
    )
    assert (
        state({"conditions": [condition("Suspended", "True", "Suspended")], "trialCounts": {"total": 2}}) == "Suspended"
    )
    assert state({}) == "Pending"


def test_trials_are_sorted_by_the_objective_with_unscored_ones_last() -> None:
    rows = trials(parse_sweep(sweep(status=sweep_status())))
    assert [(t.name, t.phase, t.value) for t in rows] == [
        ("tune-t001", "Succeeded", 0.86),
        ("tune-t000", "Succeeded", 0.81),
        ("tune-t004", "Running", 0.79),
        ("tune-t002", "Pruned", 0.62),
        ("tune-t003", "Failed", None),
    ]
    minimized = sweep(status=sweep_status())
    minimized["spec"]["objective"] = {"metric": "accuracy", "direction": "minimize"}
    assert [t.name for t in trials(parse_sweep(minimized))][:2] == ["tune-t002", "tune-t004"]


def test_trial_jobs_win_over_the_bounded_summary_and_fill_its_gaps() -> None:
    status = sweep_status()
    status["trials"] = status["trials"][:1]  # the bounded list dropped the others
    status["trials"][0]["value"] = 0.5  # and is behind the job's own status
    jobs = trial_jobs()
    jobs[2]["metadata"]["annotations"] = {PARAMETERS_ANNOTATION: '{"lr": 1e-05, "freeze": "head-only"}'}
    jobs[3]["metadata"]["annotations"] = {PARAMETERS_ANNOTATION: "not json"}
    rows = {t.name: t for t in trials(parse_sweep(sweep(status=status)), jobs)}
    assert set(rows) == {f"tune-t00{i}" for i in range(5)}
    assert (rows["tune-t000"].value, rows["tune-t000"].step, rows["tune-t000"].parameters["freeze"]) == (
        0.81,
        100,
        "bottom-4",
    )
    assert (rows["tune-t002"].phase, rows["tune-t002"].value) == ("Pruned", 0.62)
    assert rows["tune-t002"].parameters == {"lr": 1e-05, "freeze": "head-only"}
    assert (rows["tune-t003"].phase, rows["tune-t003"].value, rows["tune-t003"].parameters) == ("Failed", None, {})
    assert (rows["tune-t004"].phase, rows["tune-t004"].value) == ("Running", 0.79)


def test_describe_tells_the_search_the_trials_the_best_parameters_and_events() -> None:
    events = [
        {
            "type": "Normal",
            "reason": "TrialCreated",
            "message": "created tune-t004",
            "lastTimestamp": "2026-01-01T00:50:00Z",
        },
        {
            "type": "Normal",
            "reason": "TrialPruned",
            "message": "pruned tune-t002",
            "lastTimestamp": "2026-01-01T00:40:00Z",
        },
    ]
    text = describe(parse_sweep(sweep(status=sweep_status())), trial_jobs(), events, NOW)
    assert "Objective:    maximize accuracy, goal 0.95" in text
    assert "lr -> hyperparameters.learningRate: float [1e-05, 0.0003] (log)" in text
    assert "freeze: presets bottom-4, head-only" in text
    assert "Trial counts: total 5, running 1, succeeded 2, pruned 1, stopped 0, failed 1" in text
    table = text.split("Trials (best first by accuracy):\n")[1].split("Best trial:")[0].splitlines()
    assert table[0].split() == ["TRIAL", "PHASE", "ACCURACY", "STEP", "LR", "DECAY", "FREEZE"]
    assert table[1].split() == ["*", "tune-t001", "Succeeded", "0.86", "100", "0.00011", "0.01", "bottom-4"]
    assert [line.split()[1] for line in table[2:]] == ["Succeeded", "Running", "Pruned", "Failed"]
    assert table[5].split()[2:4] == ["-", "-"]
    assert "  tune-t001: accuracy=0.86 at step 100\n  checkpoint: file:///out/tune/tune-t001/ckpt-100" in text
    assert "    lr:" in text and "bottom-4" in text.split("Best trial:")[1]
    events_text = text.split("Events:\n")[1].splitlines()
    assert [line.split()[1] for line in events_text[1:]] == ["TrialPruned", "TrialCreated"]  # oldest first
    assert "Reconciling   True" in text


def test_describe_of_a_new_or_unreadable_sweep_does_not_crash() -> None:
    text = describe(
        parse_sweep({"metadata": {"name": "odd"}, "spec": {"parameters": "nonsense"}, "status": {"trials": [1, None]}}),
        [],
        [],
        NOW,
    )
    assert "State:" in text and "Trials (best first by ?):\n  <none yet>" in text and "Events:\n  <none>" in text


def test_plot_marks_pruned_and_best_and_plots_each_parameter(tmp_path: Path) -> None:
    s = parse_sweep(sweep(status=sweep_status()))
    fig = sweep_figure(s, trials(s, trial_jobs()))
    top, *params = fig.axes
    best = [line for line in top.get_lines() if line.get_gid() == BEST_GID]
    pruned = [line for line in top.get_lines() if line.get_gid() == PRUNED_GID]
    assert np.asarray(best[0].get_ydata()).tolist() == [0.86] and np.asarray(best[0].get_xdata()).tolist() == [1]
    assert np.asarray(pruned[0].get_xdata()).tolist() == [2] and pruned[0].get_marker() == "x"
    assert [ax.get_xlabel() for ax in params] == ["lr", "decay", "freeze"]
    assert params[0].get_xscale() == "log"  # the spec searches lr on a log scale
    scatter = next(c for c in params[2].collections if isinstance(c, PathCollection))
    assert len(scatter.get_offsets()) == 4  # every scored trial; the failed one has no value
    assert fig.get_suptitle() == "tune: Running"
    out = tmp_path / "sweep.png"
    save_png(fig, out)
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_without_scored_trials_says_so() -> None:
    with pytest.raises(NothingToPlotError, match="no trial with a accuracy value"):
        sweep_figure(parse_sweep(sweep()), [])


def test_the_plugin_reads_each_trial_as_the_operator_does() -> None:
    """``sweep describe`` and the operator share one reader: a pruned trial that overran its grace period
    (Complete/StopEnforced) is Pruned, a trial stopped by its finished sweep is Stopped (not Failed)."""
    from finetune_operator.api.sweep import FineTuneSweep
    from finetune_operator.reconcile.trials import observe_trial

    jobs = trial_jobs()
    enforced, stopped = jobs[2], jobs[3]
    enforced["status"]["conditions"] = [condition("Complete", "True", "StopEnforced", "did not stop in time")]
    enforced["status"]["stopRequest"] = {"reason": "Pruned", "message": "", "requestedTime": "2026-01-01T00:00:00Z"}
    stopped["status"] = {
        "phase": "Succeeded",
        "conditions": [condition("Complete", "True", "Stopped", "its sweep has finished")],
        "stopRequest": {"reason": "SweepFinished", "message": "", "requestedTime": "2026-01-01T00:00:00Z"},
    }
    manifest = sweep()
    rows = {t.name: t for t in trials(parse_sweep(manifest), jobs)}
    model = FineTuneSweep.model_validate(manifest)
    for job in jobs:
        observed = observe_trial(model, job)
        assert observed is not None
        assert (rows[observed.name].phase, rows[observed.name].value) == (observed.phase, observed.value)
    assert (rows["tune-t002"].phase, rows["tune-t003"].phase) == ("Pruned", "Stopped")


def test_the_plot_draws_a_trial_its_sweep_stopped_as_finished() -> None:
    jobs = trial_jobs()
    jobs[4]["status"]["conditions"] = [condition("Complete", "True", "Stopped", "its sweep has finished")]
    jobs[4]["status"]["stopRequest"] = {
        "reason": "SweepFinished",
        "message": "",
        "requestedTime": "2026-01-01T00:00:00Z",
    }
    parsed = parse_sweep(sweep(status=sweep_status()))
    figure = sweep_figure(parsed, trials(parsed, jobs))
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert "running" not in labels, labels
