"""Learning curves from the evaluation history: eval loss and the training loss recorded at each evaluation in one
panel (the gap between them is overfitting), the other metrics in a second, the best evaluation starred.

Shared by ``kubectl finetune plot`` and the trainer (the PNG it logs to MLflow). Uses ``matplotlib.figure.Figure``
directly (never pyplot): no global state and no GUI backend, so it works headless and in threads.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from finetune_trainer.contract import EvaluationRecord

BEST_GID = "best"
"""``gid`` of the best-point marker, so callers (and tests) can find it among the lines."""


def curves_figure(
    records: Sequence[EvaluationRecord],
    best: tuple[str, float, int] | None,
    title: str,
    metric_order: Sequence[str] = (),
) -> Figure:
    """One panel for the losses (eval and training), one for the other metrics (``metric_order`` first);
    ``best`` is (metric, value, step)."""
    seen = {k for r in records for k in r.metrics}
    others = [m for m in metric_order if m in seen and m != "loss"]
    others += sorted(seen - set(others) - {"loss"})
    train = [(r.step, r.train_loss) for r in records if r.train_loss is not None]
    panels = ([["loss"]] if "loss" in seen or train else []) + ([others] if others else [])
    fig = Figure(figsize=(8, 1.5 + 3 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metrics in zip(axes, panels, strict=True):
        for metric in metrics:
            points = [(r.step, r.metrics[metric]) for r in records if metric in r.metrics]
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=f"eval {metric}")
        if metrics == ["loss"] and train:
            ax.plot([s for s, _ in train], [v for _, v in train], marker=".", linestyle="--", label="train loss")
        if best is not None and best[0] in metrics:
            mark_best(ax, *best)
        ax.set_ylabel("loss" if metrics == ["loss"] else "metric")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    return fig


def mark_best(ax: Axes, metric: str, value: float, step: int) -> None:
    star(ax, step, value, f"best {metric} {value:.4g} @ step {step}")
    ax.axvline(step, color="crimson", linestyle=":", linewidth=1)


def star(ax: Axes, x: float, y: float, label: str) -> None:
    """The best point: a crimson star, findable by its ``gid``."""
    (marker,) = ax.plot([x], [y], linestyle="none", marker="*", markersize=15, color="crimson", zorder=5, label=label)
    marker.set_gid(BEST_GID)


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
