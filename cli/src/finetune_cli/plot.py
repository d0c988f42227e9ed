"""Learning curves of a FineTuneJob from ``status.evaluations``.

``status.progress.trainLoss`` is only the latest value (status is not a time series), so
the curves are the evaluation history: eval loss and the training loss recorded at each
evaluation in one panel (the gap between them is overfitting), the other metrics (accuracy,
f1, perplexity) in a second, the best evaluation marked with a star.
Uses ``matplotlib.figure.Figure`` directly (never pyplot): no global state and no GUI
backend, so it works headless and in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from finetune_cli.render import METRIC_ORDER, Job, best_point, num, outcome, phase, step_text
from finetune_cli.sweeps import Sweep, Trial, parameter_names, state
from finetune_operator.reconcile.trials import FINISHED_PHASES
from finetune_trainer import curves

BEST_GID = curves.BEST_GID
_star = curves.star


class NothingToPlotError(Exception):
    """The job has no evaluations (or the sweep no scored trial) yet."""


def curves_figure(job: Job) -> Figure:
    """A figure with one panel for the losses (eval and training) and one for the other metrics, best point
    starred (the trainer logs the same figure to MLflow)."""
    records = job.status.evaluations
    if not records:
        raise NothingToPlotError(f"finetunejob {job.name} has no evaluations in its status yet")
    best = best_point(job)
    done = outcome(job.status)
    state = str(done) if done is not None else f"{phase(job)}, step {step_text(job)}"
    return curves.curves_figure(
        records,
        (best.metric, best.value, best.step) if best is not None else None,
        f"{job.name}: {state}",
        METRIC_ORDER,
    )


def save_png(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100)


# --- sweeps ----------------------------------------------------------------------------------

PRUNED_GID = "pruned"
"""``gid`` of the pruned trials' markers (crosses at their best value before the stop)."""


def sweep_figure(sweep: Sweep, rows: Sequence[Trial]) -> Figure:
    """The objective per trial (in creation order, pruned ones crossed, failed ones a dashed line, best
    starred, best-so-far line), then one panel per parameter: its value against the objective."""
    scored = sorted(((t, t.value) for t in rows if t.value is not None), key=lambda tv: tv[0].name)
    if not scored:
        raise NothingToPlotError(f"finetunesweep {sweep.name} has no trial with a {sweep.metric} value yet")
    names = parameter_names(sweep, rows)
    fig = Figure(figsize=(8, 3.5 + 2.8 * ((len(names) + 1) // 2)), layout="constrained")
    grid = fig.add_gridspec(1 + (len(names) + 1) // 2, 2)
    ax = fig.add_subplot(grid[0, :])
    index = {t.name: i for i, t in enumerate(sorted(rows, key=lambda t: t.name))}
    groups: list[tuple[list[tuple[Trial, float]], dict[str, Any]]] = [
        (
            [(t, v) for t, v in scored if t.phase in FINISHED_PHASES and not t.pruned],
            {"marker": "o", "color": "tab:blue", "label": "finished"},
        ),
        (
            [(t, v) for t, v in scored if t.phase not in FINISHED_PHASES],
            {"marker": "o", "mfc": "none", "color": "tab:blue", "label": "running"},
        ),
        (
            [(t, v) for t, v in scored if t.pruned],
            {"marker": "x", "color": "tab:gray", "label": "pruned", "gid": PRUNED_GID},
        ),
    ]
    for group, style in groups:
        if group:
            ax.plot([index[t.name] for t, _ in group], [v for _, v in group], linestyle="none", **style)
    for n, t in enumerate(t for t in rows if t.failed):
        ax.axvline(index[t.name], color="tab:red", linestyle="--", alpha=0.4, label="failed" if n == 0 else None)
    better = max if sweep.maximize else min
    so_far: list[float] = []
    for _, v in scored:
        so_far.append(better(so_far[-1], v) if so_far else v)
    ax.step([index[t.name] for t, _ in scored], so_far, where="post", color="tab:green", alpha=0.6, label="best so far")
    best, best_value = better(scored, key=lambda tv: tv[1])
    _star(ax, index[best.name], best_value, f"best {best.name}: {num(best_value)}")
    if sweep.goal is not None:
        ax.axhline(sweep.goal, color="crimson", linestyle=":", linewidth=1, label=f"goal {num(sweep.goal)}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in creation order)")
    ax.set_ylabel(sweep.metric)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    log_scale = {str(p.get("name")) for p in sweep.spec_parameters if (p.get("float") or {}).get("log")}
    for i, name in enumerate(names):
        pax = fig.add_subplot(grid[1 + i // 2, i % 2])
        points = [(t.parameters[name], v, t.pruned) for t, v in scored if name in t.parameters]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _, _ in points)
        xs: list[Any] = [x if numeric else str(x) for x, _, _ in points]
        colors = ["tab:gray" if pruned else "tab:blue" for _, _, pruned in points]
        pax.scatter(xs, [v for _, v, _ in points], c=colors)
        if numeric and name in log_scale:
            pax.set_xscale("log")
        pax.set_xlabel(name)
        pax.set_ylabel(sweep.metric)
        pax.grid(True, alpha=0.3)
    fig.suptitle(f"{sweep.name}: {state(sweep.status)}")
    return fig
