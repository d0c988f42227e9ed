"""Learning curves of a FineTuneJob from ``status.evaluations``.

``status.progress.trainLoss`` is only the latest value (status is not a time series), so
the curves are the evaluation history: eval loss in one panel, the other metrics
(accuracy, f1, perplexity) in a second, the best evaluation marked with a star.
Uses ``matplotlib.figure.Figure`` directly (never pyplot): no global state and no GUI
backend, so it works headless and in threads.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from finetune_cli.render import METRIC_ORDER, Job, best_point, num, outcome, phase, step_text

BEST_GID = "best"
"""``gid`` of the best-point marker, so callers (and tests) can find it among the lines."""


class NothingToPlotError(Exception):
    """The job has no evaluations yet."""


def curves_figure(job: Job) -> Figure:
    """A figure with one panel for eval loss and one for the other metrics, best point starred."""
    records = job.status.evaluations
    if not records:
        raise NothingToPlotError(f"finetunejob {job.name} has no evaluations in its status yet")
    seen = {k for r in records for k in r.metrics}
    others = [m for m in METRIC_ORDER if m in seen and m != "loss"] + sorted(seen - set(METRIC_ORDER))
    panels = ([["loss"]] if "loss" in seen else []) + ([others] if others else [])
    fig = Figure(figsize=(8, 1.5 + 3 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    best = best_point(job)
    for ax, metrics in zip(axes, panels, strict=True):
        for metric in metrics:
            points = [(r.step, r.metrics[metric]) for r in records if metric in r.metrics]
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=f"eval {metric}")
        if best is not None and best.metric in metrics:
            _mark_best(ax, best.metric, best.value, best.step)
        ax.set_ylabel("loss" if metrics == ["loss"] else "metric")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    done = outcome(job.status)
    state = str(done) if done is not None else f"{phase(job)}, step {step_text(job)}"
    fig.suptitle(f"{job.name}: {state}")
    return fig


def _mark_best(ax: Axes, metric: str, value: float, step: int) -> None:
    (marker,) = ax.plot(
        [step],
        [value],
        linestyle="none",
        marker="*",
        markersize=15,
        color="crimson",
        zorder=5,
        label=f"best {metric} {num(value)} @ step {step}",
    )
    marker.set_gid(BEST_GID)
    ax.axvline(step, color="crimson", linestyle=":", linewidth=1)


def save_png(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100)
