"""Pure rendering of FineTuneSweeps: the ``sweep list`` table and the ``sweep describe`` text.

Works on the API server's JSON (plain dicts), not on the operator's models: a sweep written by
an older or newer operator still lists and describes, and the plugin stays light. The trial
table merges the sweep's compact ``status.trials`` with the trial FineTuneJobs themselves
(labelled ``finetune.dev/sweep=<name>``), whose status is fresher and never truncated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from finetune_cli.render import _fields, _parse_time, age, num, table
from finetune_operator.reconcile.trials import read_parameters, read_phase, read_value

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Trial:
    """One row of the trial table."""

    name: str
    phase: str
    value: float | None = None
    step: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned(self) -> bool:
        return self.phase == "Pruned"

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"


@dataclass(frozen=True)
class Sweep:
    """A FineTuneSweep as the plugin shows it."""

    name: str
    namespace: str
    created: datetime | None
    metric: str
    maximize: bool
    goal: float | None
    algorithm: str
    pruning: str
    max_trials: int | None
    parallelism: int | None
    status: Manifest
    spec_parameters: list[Manifest]


def _dict(value: object) -> Manifest:
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_sweep(obj: Manifest) -> Sweep:
    """Read what the views need, tolerating missing or malformed parts."""
    meta = _dict(obj.get("metadata"))
    spec = _dict(obj.get("spec"))
    objective = _dict(spec.get("objective"))
    params = spec.get("parameters")
    return Sweep(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "default")),
        created=_parse_time(meta.get("creationTimestamp")),
        metric=str(objective.get("metric", "?")),
        maximize=objective.get("direction", "maximize") != "minimize",
        goal=_number(objective.get("goal")),
        algorithm=str(_dict(spec.get("algorithm")).get("name", "?")),
        pruning=str(_dict(spec.get("pruning")).get("name", "none")),
        max_trials=_int(spec.get("maxTrials")),
        parallelism=_int(spec.get("parallelism")),
        status=_dict(obj.get("status")),
        spec_parameters=[p for p in params if isinstance(p, dict)] if isinstance(params, list) else [],
    )


# --- state --------------------------------------------------------------------------------


def _conditions(status: Manifest) -> list[Manifest]:
    found = status.get("conditions")
    return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []


def _true(status: Manifest, type_: str) -> Manifest | None:
    return next((c for c in _conditions(status) if c.get("type") == type_ and c.get("status") == "True"), None)


def state(status: Manifest) -> str:
    """``Complete (GoalReached)``, ``Failed (...)``, ``Suspended``, ``Running`` or ``Pending``."""
    for type_ in ("Failed", "Complete"):
        cond = _true(status, type_)
        if cond is not None:
            return f"{type_} ({cond.get('reason', '')})"
    if _true(status, "Suspended") is not None:
        return "Suspended"
    return "Running" if _counts(status).get("total") else "Pending"


def _counts(status: Manifest) -> dict[str, int]:
    return {k: v for k, v in _dict(status.get("trialCounts")).items() if isinstance(v, int)}


def best_trial(status: Manifest) -> Manifest | None:
    best = _dict(status.get("bestTrial"))
    return best if best.get("name") and _number(best.get("value")) is not None else None


# --- trials -------------------------------------------------------------------------------


def trials(sweep: Sweep, jobs: Sequence[Manifest] = ()) -> list[Trial]:
    """The trial table, best first (by the objective's direction); trials without a value last, by name.

    A trial FineTuneJob's own status wins over the sweep's summary of it; trials the bounded
    ``status.trials`` no longer lists come from the jobs alone.
    """
    rows: dict[str, Trial] = {}
    listed = sweep.status.get("trials")
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, dict) and entry.get("name"):
            rows[str(entry["name"])] = Trial(
                name=str(entry["name"]),
                phase=str(entry.get("phase") or "Pending"),
                value=_number(entry.get("value")),
                parameters=_dict(entry.get("parameters")),
            )
    best = best_trial(sweep.status)
    for obj in jobs:
        name = str(_dict(obj.get("metadata")).get("name", ""))
        known = rows.get(name)
        value, step, _ = read_value(_dict(obj.get("status")), sweep.metric, sweep.maximize)
        rows[name] = Trial(
            name=name,
            phase=read_phase(obj, value is not None),
            value=value if value is not None else (known.value if known else None),
            step=step,
            parameters=(known.parameters if known and known.parameters else read_parameters(obj) or {}),
        )
    if best is not None and best["name"] in rows and rows[best["name"]].step is None:
        rows[best["name"]] = replace(rows[best["name"]], step=_int(best.get("step")))
    sign = -1.0 if sweep.maximize else 1.0
    return sorted(
        rows.values(), key=lambda t: (t.value is None, sign * t.value if t.value is not None else 0.0, t.name)
    )


def parameter_names(sweep: Sweep, rows: Sequence[Trial]) -> list[str]:
    """The spec's parameter order, then any other name the trials carry."""
    names = [str(p["name"]) for p in sweep.spec_parameters if p.get("name")]
    return names + sorted({k for t in rows for k in t.parameters} - set(names))


def value_text(value: object) -> str:
    """A parameter value: 3 significant digits for floats, as-is otherwise."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


# --- list ---------------------------------------------------------------------------------

LIST_HEADER = ("NAME", "STATE", "TRIALS", "RUNNING", "PRUNED", "FAILED", "OBJECTIVE", "BEST", "AGE")


def list_row(sweep: Sweep, now: datetime) -> list[str]:
    """TRIALS is done/budget (``done`` = succeeded + pruned + stopped + failed); BEST is value (trial)."""
    counts = _counts(sweep.status)
    done = sum(counts.get(k, 0) for k in ("succeeded", "pruned", "stopped", "failed"))
    budget = f"/{sweep.max_trials}" if sweep.max_trials is not None else ""
    best = best_trial(sweep.status)
    direction = "max" if sweep.maximize else "min"
    return [
        sweep.name,
        state(sweep.status),
        f"{done}{budget}",
        str(counts.get("running", 0)),
        str(counts.get("pruned", 0)),
        str(counts.get("failed", 0)),
        f"{sweep.metric} ({direction})",
        f"{num(_number(best['value']))} ({best['name']})" if best is not None else "-",
        age(sweep.created, now),
    ]


def list_table(sweeps: Sequence[Sweep], now: datetime, all_namespaces: bool = False) -> str:
    rows = [list_row(s, now) for s in sweeps]
    if all_namespaces:
        return table(("NAMESPACE", *LIST_HEADER), [[s.namespace, *r] for s, r in zip(sweeps, rows, strict=True)])
    return table(LIST_HEADER, rows)


# --- describe -----------------------------------------------------------------------------


def trial_table(sweep: Sweep, rows: Sequence[Trial], indent: str = "  ") -> str:
    """Best first; ``*`` marks the best trial, and the PHASE column says Pruned or Failed."""
    best = best_trial(sweep.status)
    names = parameter_names(sweep, rows)
    body = [
        [
            "*" if best is not None and t.name == best["name"] else "",
            t.name,
            t.phase,
            num(t.value),
            str(t.step) if t.step is not None else "-",
            *(value_text(t.parameters.get(n)) for n in names),
        ]
        for t in rows
    ]
    header = ["", "TRIAL", "PHASE", sweep.metric.upper(), "STEP", *(n.upper() for n in names)]
    return table(header, body, indent)


def events_table(events: Sequence[Manifest], now: datetime, indent: str = "  ") -> str:
    """Events oldest first, like ``kubectl describe``'s Events section."""

    def when(event: Manifest) -> datetime | None:
        return _parse_time(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp"))

    ordered = sorted(events, key=lambda e: (when(e) or datetime.min.replace(tzinfo=now.tzinfo)).isoformat())
    rows = [
        [str(e.get("type", "")), str(e.get("reason", "")), age(when(e), now), str(e.get("message", ""))]
        for e in ordered
    ]
    return table(["TYPE", "REASON", "AGE", "MESSAGE"], rows, indent)


def describe(sweep: Sweep, jobs: Sequence[Manifest], events: Sequence[Manifest], now: datetime) -> str:
    """``kubectl describe``-style text: the search, its state, the trials best first, best parameters."""
    status = sweep.status
    counts = _counts(status)
    direction = "maximize" if sweep.maximize else "minimize"
    goal = f", goal {num(sweep.goal)}" if sweep.goal is not None else ""
    lines = _fields(
        [
            ("Name", sweep.name),
            ("Namespace", sweep.namespace),
            (
                "Created",
                f"{sweep.created.isoformat() if sweep.created else '<unknown>'} ({age(sweep.created, now)} ago)",
            ),
            ("State", state(status)),
            ("Objective", f"{direction} {sweep.metric}{goal}"),
            ("Algorithm", sweep.algorithm),
            ("Pruning", sweep.pruning),
            (
                "Budget",
                f"maxTrials {sweep.max_trials if sweep.max_trials is not None else '-'}, "
                f"parallelism {sweep.parallelism if sweep.parallelism is not None else '-'}",
            ),
            (
                "Trial counts",
                ", ".join(
                    f"{k} {counts.get(k, 0)}" for k in ("total", "running", "succeeded", "pruned", "stopped", "failed")
                ),
            ),
        ]
    )
    lines.append("Parameters:")
    if sweep.spec_parameters:
        lines += [f"  {_parameter_text(p)}" for p in sweep.spec_parameters]
    else:
        lines.append("  <none>")
    rows = trials(sweep, jobs)
    lines.append(f"Trials (best first by {sweep.metric}):")
    lines.append(trial_table(sweep, rows) if rows else "  <none yet>")
    best = best_trial(status)
    lines.append("Best trial:")
    if best is not None:
        step = f" at step {best['step']}" if _int(best.get("step")) is not None else ""
        lines.append(f"  {best['name']}: {sweep.metric}={num(_number(best['value']))}{step}")
        if best.get("checkpoint"):
            lines.append(f"  checkpoint: {best['checkpoint']}")
        params = _dict(best.get("parameters"))
        if params:
            lines.append("  parameters:")
            lines += _fields([(str(k), value_text(v)) for k, v in params.items()], "    ")
    else:
        lines.append("  <none yet>")
    lines.append("Conditions:")
    conds = _conditions(status)
    if conds:
        table_rows = [
            [
                str(c.get("type", "")),
                str(c.get("status", "")),
                str(c.get("reason", "")),
                age(_parse_time(c.get("lastTransitionTime")), now),
                str(c.get("message", "")),
            ]
            for c in conds
        ]
        lines.append(table(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], table_rows, "  "))
    else:
        lines.append("  <none>")
    lines.append("Events:")
    lines.append(events_table(events, now) if events else "  <none>")
    return "\n".join(lines) + "\n"


def _parameter_text(param: Mapping[str, Any]) -> str:
    """One line per searched parameter: name, where it goes and its domain."""
    name = str(param.get("name", "?"))
    path = f" -> {param['path']}" if param.get("path") else ""
    for kind in ("float", "int"):
        domain = _dict(param.get(kind))
        if domain:
            extra = [f"step {domain['step']}"] if domain.get("step") is not None else []
            extra += ["log"] if domain.get("log") else []
            tail = f" ({', '.join(extra)})" if extra else ""
            return f"{name}{path}: {kind} [{value_text(domain.get('min'))}, {value_text(domain.get('max'))}]{tail}"
    categorical = _dict(param.get("categorical"))
    if categorical.get("presets"):
        labels = [str(_dict(p).get("label", "?")) for p in categorical["presets"]]
        return f"{name}: presets {', '.join(labels)}"
    if "values" in categorical:
        return f"{name}{path}: one of {', '.join(value_text(v) for v in categorical['values'])}"
    return f"{name}{path}"
