"""Learning-curve plots: a valid PNG, the expected curves, the best point starred."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from finetune_cli.plot import BEST_GID, NothingToPlotError, curves_figure, save_png
from finetune_cli.render import parse_job
from tests.cli.jobs import early_stopped_status, job, running_status

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _curves(ax: Axes) -> dict[str, Line2D]:
    """Labelled lines of an axes (matplotlib names unlabelled ones ``_child<n>``)."""
    return {str(line.get_label()): line for line in ax.get_lines() if not str(line.get_label()).startswith("_")}


def _xy(line: Line2D) -> tuple[list[float], list[float]]:
    return np.asarray(line.get_xdata()).tolist(), np.asarray(line.get_ydata()).tolist()


def test_two_panels_losses_and_metrics_with_the_best_point_marked() -> None:
    status = early_stopped_status()
    for record, train_loss in zip(status["evaluations"], (0.66, 0.38, 0.29, 0.2), strict=True):
        record["trainLoss"] = train_loss
    fig = curves_figure(parse_job(job(status=status)))
    loss_ax, metric_ax = fig.axes
    assert set(_curves(loss_ax)) == {"eval loss", "train loss"}
    assert _xy(_curves(loss_ax)["train loss"]) == ([50, 100, 150, 200], [0.66, 0.38, 0.29, 0.2])
    metric_curves = _curves(metric_ax)
    assert set(metric_curves) == {"eval accuracy", "eval f1", "best accuracy 0.86 @ step 100"}
    assert _xy(metric_curves["eval accuracy"]) == ([50, 100, 150, 200], [0.71, 0.86, 0.84, 0.85])
    best = [line for line in metric_ax.get_lines() if line.get_gid() == BEST_GID]
    assert len(best) == 1
    assert (_xy(best[0]), best[0].get_marker()) == (([100], [0.86]), "*")
    assert not [line for line in loss_ax.get_lines() if line.get_gid() == BEST_GID]
    assert fig.get_suptitle() == "demo: Complete (EarlyStopped)"
    assert metric_ax.get_xlabel() == "step"


def test_best_loss_is_marked_on_the_loss_panel_and_title_shows_progress_while_running() -> None:
    status = running_status()
    status["best"] = {"metric": "loss", "value": 0.41, "step": 100}
    fig = curves_figure(parse_job(job(status=status)))
    assert [line.get_gid() for line in fig.axes[0].get_lines()].count(BEST_GID) == 1
    assert fig.get_suptitle() == "demo: Running, step 150/300"


def test_loss_only_history_is_one_panel() -> None:
    status = running_status()
    for record in status["evaluations"]:
        record["metrics"] = {"loss": record["metrics"]["loss"]}
    del status["best"], status["earlyStopping"]
    fig = curves_figure(parse_job(job(status=status)))
    assert len(fig.axes) == 1 and "eval loss" in _curves(fig.axes[0])


def test_png_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    save_png(curves_figure(parse_job(job(status=early_stopped_status()))), path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (800, 750)


def test_no_evaluations_is_an_error() -> None:
    with pytest.raises(NothingToPlotError, match="no evaluations"):
        curves_figure(parse_job(job()))
