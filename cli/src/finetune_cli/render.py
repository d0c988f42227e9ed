"""Pure rendering of FineTuneJobs: table rows, describe text, the progress line.

No I/O and no clock: every function takes the object (and ``now`` where ages matter), so the
whole look of the plugin is unit-testable without a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from finetune_operator.api.job import (
    Artifact,
    Condition,
    ConditionType,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    TrackingStatus,
)
from finetune_trainer.spec import LOWER_IS_BETTER

Manifest = dict[str, Any]
Mode = Literal["min", "max"]
METRIC_ORDER = ("loss", "accuracy", "f1", "perplexity")


@dataclass(frozen=True)
class Job:
    """A FineTuneJob as the plugin shows it.

    The spec is optional so that one object the models cannot parse (an older or newer API
    revision) still lists, watches and plots from its status instead of crashing the command.
    """

    name: str
    namespace: str
    created: datetime | None
    status: FineTuneJobStatus
    spec: FineTuneJobSpec | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    parse_error: str | None = None


def parse_job(obj: Manifest) -> Job:
    """Build a ``Job`` from the API server's JSON, degrading to what parses."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    namespace = str(meta.get("namespace", "default"))
    created = _parse_time(meta.get("creationTimestamp"))
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    try:
        job = FineTuneJob.model_validate(obj)
        return Job(name, namespace, created, job.status, job.spec, annotations)
    except ValidationError as error:
        problem = f"{error.error_count()} validation error(s), first: {_first_error(error)}"
    try:
        status = FineTuneJobStatus.model_validate(obj.get("status") or {})
    except ValidationError as error:
        status = FineTuneJobStatus()
        problem += f"; status unreadable: {_first_error(error)}"
    return Job(name, namespace, created, status, None, annotations, problem)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


# --- small facts derived from a job ------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a finished job ended: ``Complete`` or ``Failed``, with the condition's reason."""

    type: Literal["Complete", "Failed"]
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.type} ({self.reason})"


def condition(status: FineTuneJobStatus, type_: ConditionType) -> Condition | None:
    """The condition of this type when it is True (what kubectl wait --for=condition checks)."""
    return next((c for c in status.conditions if c.type == type_ and c.status == "True"), None)


def outcome(status: FineTuneJobStatus) -> Outcome | None:
    """The terminal state from conditions (not phase: phase is for humans only)."""
    failed = condition(status, "Failed")
    if failed is not None:
        return Outcome("Failed", failed.reason, failed.message)
    complete = condition(status, "Complete")
    if complete is not None:
        return Outcome("Complete", complete.reason, complete.message)
    return None


def phase(job: Job) -> str:
    return job.status.phase or "Pending"


def monitored_metric(job: Job) -> str:
    """The metric that decides "best": the operator's choice first, then the spec's."""
    status = job.status
    if status.best is not None:
        return status.best.metric
    if status.early_stopping is not None:
        return status.early_stopping.metric
    if job.spec is not None:
        if job.spec.early_stopping is not None:
            return job.spec.early_stopping.metric
        others = [m for m in job.spec.evaluation.metrics if m != "loss"]
        return others[0] if others else "loss"
    seen = {k for e in status.evaluations for k in e.metrics}
    return next((m for m in METRIC_ORDER[1:] if m in seen), "loss")


def metric_mode(job: Job, metric: str) -> Mode:
    status = job.status
    if status.early_stopping is not None and status.early_stopping.metric == metric:
        return status.early_stopping.mode
    if job.spec is not None and job.spec.early_stopping is not None and job.spec.early_stopping.metric == metric:
        return job.spec.early_stopping.effective_mode
    return "min" if metric in LOWER_IS_BETTER else "max"


@dataclass(frozen=True)
class BestPoint:
    metric: str
    value: float
    step: int
    checkpoint: str | None = None


def best_point(job: Job) -> BestPoint | None:
    """The best evaluation: as the operator recorded it, else recomputed from the history."""
    status = job.status
    if status.best is not None:
        b = status.best
        return BestPoint(b.metric, b.value, b.step, b.checkpoint)
    es = status.early_stopping
    if es is not None and es.best_value is not None and es.best_step is not None:
        return BestPoint(es.metric, es.best_value, es.best_step)
    metric = monitored_metric(job)
    scored = [(e.metrics[metric], e.step) for e in status.evaluations if metric in e.metrics]
    if not scored:
        return None
    pick = min if metric_mode(job, metric) == "min" else max
    value, step = pick(scored, key=lambda vs: vs[0])
    return BestPoint(metric, value, step)


def latest_metric(status: FineTuneJobStatus, metric: str) -> float | None:
    for record in reversed(status.evaluations):
        if metric in record.metrics:
            return record.metrics[metric]
    return None


# --- formatting of scalars ---------------------------------------------------------------


def num(value: float | None, digits: int = 4) -> str:
    """Metric values: 4 significant digits, ``-`` when unknown."""
    return "-" if value is None else f"{value:.{digits}g}"


def human_duration(seconds: float) -> str:
    """kubectl's AGE format (k8s.io/apimachinery duration.HumanDuration), e.g. 45s, 5m30s, 3h20m, 4d."""
    s = int(seconds)
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if h < 24 * 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    return f"{d // 365}y{d % 365}d" if d < 365 * 8 else f"{d // 365}y"


def age(when: datetime | None, now: datetime) -> str:
    return "<unknown>" if when is None else human_duration((now - when).total_seconds())


def _epoch(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def step_text(job: Job) -> str:
    p = job.status.progress
    if p is None:
        return "-"
    return f"{p.step}/{p.total_steps}" if p.total_steps else str(p.step)


def epoch_text(job: Job) -> str:
    p = job.status.progress
    if p is None:
        return "-"
    return f"{_epoch(p.epoch)}/{_epoch(p.total_epochs)}" if p.total_epochs else _epoch(p.epoch)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns three spaces apart, like ``kubectl get``."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(indent + line for line in lines)


# --- list --------------------------------------------------------------------------------

LIST_HEADER = ("NAME", "PHASE", "PROGRESS", "STEP", "EPOCH", "METRIC", "BEST", "AGE")


def list_row(job: Job, now: datetime) -> list[str]:
    """One ``list`` row. METRIC is the latest value of the monitored metric; BEST is value@step."""
    p = job.status.progress
    metric = monitored_metric(job)
    latest = latest_metric(job.status, metric)
    best = best_point(job)
    return [
        job.name,
        phase(job),
        f"{p.percent:.0f}%" if p is not None else "-",
        step_text(job),
        epoch_text(job),
        f"{metric}={num(latest)}" if latest is not None else "-",
        f"{num(best.value)}@{best.step}" if best is not None else "-",
        age(job.created, now),
    ]


def list_table(jobs: Sequence[Job], now: datetime, all_namespaces: bool = False) -> str:
    rows = [list_row(j, now) for j in jobs]
    if all_namespaces:
        return table(("NAMESPACE", *LIST_HEADER), [[j.namespace, *r] for j, r in zip(jobs, rows, strict=True)])
    return table(LIST_HEADER, rows)


# --- watch -------------------------------------------------------------------------------


def progress_bar(percent: float, width: int = 20) -> str:
    filled = max(0, min(width, round(width * percent / 100)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(job: Job) -> str:
    """The single ``watch`` line: bar, step, epoch, train loss, eval metric (and best), ETA."""
    status = job.status
    done = outcome(status)
    state = str(done) if done is not None else phase(job)
    p = status.progress
    if p is None:
        return f"{job.name} {state}: waiting for the trainer's first report"
    metric = monitored_metric(job)
    parts = [
        job.name,
        state,
        progress_bar(p.percent),
        f"{p.percent:3.0f}%",
        f"step {step_text(job)}",
        f"epoch {epoch_text(job)}",
        f"loss {num(p.train_loss)}",
    ]
    latest = latest_metric(status, metric)
    if latest is not None:
        best = best_point(job)
        best_text = f" (best {num(best.value)}@{best.step})" if best is not None and best.metric == metric else ""
        parts.append(f"eval {metric} {num(latest)}{best_text}")
    if done is None and p.eta_seconds is not None:
        parts.append(f"ETA {human_duration(p.eta_seconds)}")
    return " ".join(parts)


def final_line(job: Job) -> str:
    """What ``watch`` prints when the job ends: outcome and its message."""
    done = outcome(job.status)
    if done is None:
        return f"{job.name}: {phase(job)}"
    tail = f": {done.message}" if done.message else ""
    return f"{job.name} {done}{tail}"


# --- describe ----------------------------------------------------------------------------


def _fields(pairs: Sequence[tuple[str, str]], indent: str = "") -> list[str]:
    width = max(len(k) for k, _ in pairs) + 2
    return [f"{indent}{(k + ':').ljust(width)}{v}" for k, v in pairs]


def spec_summary(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    """The spec in a few lines: what is trained on what, how, and when it stops."""
    model = spec.model
    labels = model.effective_num_labels
    ds = spec.dataset
    validation = ds.validation or (f"{ds.validation_fraction:.0%} of train" if ds.validation_fraction else "none")
    fr = spec.freeze
    freeze: str = fr.strategy
    if fr.layers is not None:
        freeze += f" ({fr.layers} layers)"
    if fr.embeddings:
        freeze += ", embeddings frozen"
    if fr.lora is not None:
        freeze += f" (r={fr.lora.r}, alpha={fr.lora.alpha})"
    if fr.gradual_unfreezing is not None:
        g = fr.gradual_unfreezing
        freeze += f", gradual unfreezing from epoch {g.start_epoch} (+{g.layers_per_epoch}/epoch)"
    h = spec.hyperparameters
    length = f"maxSteps={h.max_steps}" if h.max_steps is not None else f"epochs={_epoch(h.epochs)}"
    warmup = (
        f" warmup={h.warmup_steps} steps"
        if h.warmup_steps is not None
        else (f" warmup={h.warmup_ratio:.0%}" if h.warmup_ratio is not None else "")
    )
    hyper = (
        f"lr={h.learning_rate:g} {h.scheduler}{warmup}, batch={h.batch_size}x{h.gradient_accumulation_steps}, "
        f"{length}, weightDecay={h.weight_decay:g}, precision={h.precision}, seed={h.seed}"
    )
    extras = [
        f"l1={h.l1_penalty:g}" if h.l1_penalty else "",
        f"dropout={h.dropout:g}" if h.dropout is not None else "",
        f"labelSmoothing={h.label_smoothing:g}" if h.label_smoothing else "",
        f"maxGradNorm={h.max_grad_norm:g}" if h.max_grad_norm is not None else "",
    ]
    ev = spec.evaluation
    when = {"epoch": "every epoch", "steps": f"every {ev.interval} steps", "no": "never"}[ev.strategy]
    es = spec.early_stopping
    early = (
        f"{es.metric} ({es.effective_mode}), patience {es.patience}, minDelta {es.min_delta:g}"
        + (", restore best" if es.restore_best else "")
        if es is not None
        else "off (trains to the end)"
    )
    r = spec.resources
    rows = [
        ("Model", f"{model.source} ({model.task}" + (f", {labels} labels)" if labels else ")")),
        ("Dataset", f"{ds.source} train={ds.train} validation={validation}"),
        ("Freeze", freeze),
        ("Hyperparameters", hyper),
    ]
    if any(extras):
        rows.append(("Regularization", ", ".join(e for e in extras if e)))
    rows += [
        ("Evaluation", f"{when}: {', '.join(ev.metrics)}"),
        ("Early stopping", early),
        ("Resources", f"{r.nodes} node(s) x {r.gpus_per_node} GPU" + (", suspended" if spec.suspend else "")),
        ("Output", spec.output.location),
    ]
    return rows


def why_stopped(job: Job) -> str | None:
    """One sentence on how the job ended (or is ending); None while it simply runs."""
    status = job.status
    done = outcome(status)
    es = status.early_stopping
    if done is not None and done.type == "Failed":
        return f"Failed ({done.reason}): {done.message}"
    if done is not None:
        if done.reason == "EarlyStopped":
            return f"Early stopping: {(es.reason if es is not None else None) or done.message}"
        if done.reason == "Stopped":
            return f"Stopped on user request: {done.message}"
        return f"Finished training ({done.reason}): {done.message}"
    if status.stop_request is not None:
        req = status.stop_request
        return f"Stop requested ({req.reason}): {req.message}; waiting for the trainer to save and exit"
    return None


def evaluations_table(job: Job, indent: str = "  ") -> str:
    """Evaluations oldest first, a column per metric, ``*`` on the best one."""
    records = job.status.evaluations
    seen = {k for r in records for k in r.metrics}
    metrics = [m for m in METRIC_ORDER if m in seen] + sorted(seen - set(METRIC_ORDER))
    best = best_point(job)
    with_train = any(r.train_loss is not None for r in records)
    rows = [
        [
            str(r.step),
            _epoch(r.epoch) if r.epoch is not None else "-",
            *(num(r.metrics.get(m)) for m in metrics),
            *([num(r.train_loss)] if with_train else []),
            "*" if best is not None and r.step == best.step else "",
        ]
        for r in records
    ]
    extra = ["TRAIN LOSS"] if with_train else []
    return table(["STEP", "EPOCH", *(m.upper() for m in metrics), *extra, "BEST"], rows, indent)


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def artifact_lines(artifacts: list[Artifact]) -> list[str]:
    """Each published output: kind, dtype, size, where, its manifest's sha256 and its lineage."""
    rows = [[a.kind, a.dtype or "-", _size(a.size_bytes), a.uri] for a in artifacts]
    lines = [table(["KIND", "DTYPE", "SIZE", "URI"], rows, "  ")]
    for a in artifacts:
        base = a.base_model
        lines.append(f"  {a.kind}: sha256 {a.sha256}")
        if base is not None:
            lines.append(f"    base {base.source} @ {base.revision or '<unknown revision>'}")
        if a.dataset_fingerprint:
            lines.append(f"    data {a.dataset_fingerprint}")
    return lines


def describe(job: Job, now: datetime) -> str:
    """``kubectl describe``-style text."""
    status = job.status
    done = outcome(status)
    lines = _fields(
        [
            ("Name", job.name),
            ("Namespace", job.namespace),
            ("Created", f"{job.created.isoformat() if job.created else '<unknown>'} ({age(job.created, now)} ago)"),
            ("Phase", phase(job)),
            ("Outcome", f"{done}" if done is not None else "-"),
            ("Message", status.message or "-"),
        ]
    )
    lines.append("Spec:")
    if job.spec is not None:
        lines += _fields(spec_summary(job.spec), "  ")
    else:
        lines.append(f"  <could not be read: {job.parse_error}>")
    lines.append("Status:")
    p = status.progress
    pairs = [("Started", status.start_time.isoformat() if status.start_time else "-")]
    if status.completion_time is not None:
        pairs.append(("Completed", status.completion_time.isoformat()))
    if p is not None:
        beat = age(p.last_heartbeat_time, now) + " ago" if p.last_heartbeat_time else "-"
        pairs += [
            ("Progress", f"{p.percent:.0f}% (step {step_text(job)}, epoch {epoch_text(job)})"),
            ("Train loss", num(p.train_loss)),
            ("Learning rate", num(p.learning_rate, 3)),
            ("Throughput", f"{num(p.samples_per_second, 3)} samples/s"),
            ("ETA", human_duration(p.eta_seconds) if p.eta_seconds is not None and done is None else "-"),
            ("Last heartbeat", beat),
        ]
    pairs.append(("Restarts", str(status.restarts)))
    if status.workload is not None and status.workload.job:
        pairs.append(("Workload", f"Job {status.workload.job}"))
    lines += _fields(pairs, "  ")
    lines.append("Conditions:")
    if status.conditions:
        rows = [[c.type, c.status, c.reason, age(c.last_transition_time, now), c.message] for c in status.conditions]
        lines.append(table(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], rows, "  "))
    else:
        lines.append("  <none>")
    lines.append("Evaluations:")
    lines.append(evaluations_table(job) if status.evaluations else "  <none>")
    reason = why_stopped(job)
    if reason is not None:
        lines += ["Why it stopped:", f"  {reason}"]
    best = best_point(job)
    lines.append("Best checkpoint:")
    if best is not None:
        where = best.checkpoint or "<no checkpoint recorded>"
        lines.append(f"  {best.metric}={num(best.value)} at step {best.step}: {where}")
        baseline = status.best.majority_baseline if status.best is not None else None
        if baseline is not None:
            lines.append(f"  majority-class baseline accuracy {num(baseline)}")
    else:
        lines.append("  <none yet>")
    if status.artifacts:
        lines.append("Artifacts:")
        lines += artifact_lines(status.artifacts)
    if status.diagnosis:
        lines.append("Diagnosis:")
        for d in status.diagnosis:
            lines += [f"  {d.severity} {d.code}: {d.message}", f"    evidence: {d.evidence}"]
    lines += tracking_lines(status.tracking)
    return "\n".join(lines) + "\n"


def tracking_lines(tracking: TrackingStatus | None) -> list[str]:
    """The MLflow run of ``status.tracking``: run id, URL, model version, and why logging is behind."""
    if tracking is None:
        return []
    pairs = [("Run", tracking.run_id or "<not created yet>"), ("URL", tracking.url or "-")]
    if tracking.parent_run_id:
        pairs.append(("Sweep run", tracking.parent_run_id))
    if tracking.registered_model:
        pairs.append(("Registered", f"{tracking.registered_model} version {tracking.registered_version or '-'}"))
    if tracking.behind:
        pairs.append(("Behind", tracking.message or "yes"))
    return ["Tracking (MLflow):", *_fields(pairs, "  ")]
