"""MLflow tracking of a training run: its run (a child of its sweep's run), metrics by step, the model version.

Training never waits for MLflow: the run's thread only queues (bounded: metric points beyond the bound
are dropped and counted); one worker thread talks to the server with the MLflow client (mlflow-skinny),
retrying with backoff while it is down, and reports ``status.tracking`` (``behind`` while it cannot log).

Idempotent by the job's uid, so a retried or resumed trainer (or a worker that retries a request whose
answer was lost) logs nothing twice: the run is found by its ``finetune.dev/job-uid`` tag, each metric is
logged only past the last step the server holds for it (re-read on every reconnection), params only when
absent, and the model version is found by the same tag before one is made.

A sweep's run is found (or made) by its ``finetune.dev/sweep-uid`` tag. Trials start at once and may each make
one, so its runs are ordered strictly (start time, then run id) and every trial adopts the least it sees; a
trial deletes only a run it made and that lost. Start times come from the trials' clocks, so a trial can see
a run that a smaller one, made at the same time but written later, then displaces: at the run's end (and on a
resume) the trial looks again and moves its run under the least parent if it changed (``mlflow.parentRunId``
and ``status.tracking.parentRunId``), deleting its own parent if that lost. Only a parent whose making takes
longer than a whole trial could still be missed.

transformers' ``MLflowCallback`` is not used: its setup calls the server synchronously (a server that is
down stalls or fails the start), a resumed trainer re-logs the steps it trains again, and it logs
``TrainingArguments`` rather than the FineTuneJob's spec.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.config import RuntimeEnv
from finetune_trainer.contract import (
    GROUP,
    PARAMETERS_ANNOTATION,
    PLURAL,
    SWEEP_KIND,
    VERSION,
    EvaluationRecord,
    TrackingStatus,
    TrainerStatus,
)
from finetune_trainer.reporting import JsonLines, StatusReporter
from finetune_trainer.spec import TrackingSpec, TrainingSpec

JOB_UID_TAG: Final = "finetune.dev/job-uid"
SWEEP_UID_TAG: Final = "finetune.dev/sweep-uid"
PARENT_TAG: Final = "mlflow.parentRunId"
OUTCOME_TAG: Final = "finetune.dev/outcome"
REASON_TAG: Final = "finetune.dev/reason"
MAX_QUEUED_POINTS: Final = 100_000
"""Metric points waiting for the server at most (a few MB); beyond it new points are dropped and counted."""
FLUSH_SECONDS: Final = 300.0
"""How long the end of a run waits for a server that is down (logging and registration) before giving up."""
MAX_PARAM_LENGTH: Final = 6000
"""MLflow's limit on a param value (longer ones are cut, with an ellipsis)."""

Op = tuple[str, Any]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A spec's scalar leaves by their dotted camelCase path (as a sweep's parameters name them); lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            flat[path] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return flat


def registered_source(model_uri: str) -> str:
    """What a registered model version points at: the published final model directory (its output URI).
    The one place to switch to the published artifact's URI (``status.artifacts``) once that exists."""
    return model_uri


@dataclass(frozen=True)
class JobIdentity:
    """Who the run belongs to: the FineTuneJob, and its sweep when it is a trial."""

    name: str
    namespace: str
    uid: str
    spec: Mapping[str, Any]
    """The FineTuneJob's wire spec (the whole object's when readable, else the training config)."""
    sweep_name: str | None = None
    sweep_uid: str | None = None
    trial_parameters: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls, obj: Mapping[str, Any] | None, name: str, namespace: str, uid: str, spec: Mapping[str, Any]
    ) -> JobIdentity:
        """From the FineTuneJob as the API server has it (None: not readable; the training config stands in)."""
        if obj is None:
            return cls(name, namespace, uid, spec)
        metadata = obj.get("metadata") or {}
        owner = next(
            (o for o in metadata.get("ownerReferences") or [] if o.get("kind") == SWEEP_KIND and o.get("controller")),
            None,
        )
        try:
            parameters = json.loads((metadata.get("annotations") or {}).get(PARAMETERS_ANNOTATION) or "{}")
        except ValueError:
            parameters = {}
        return cls(
            name,
            namespace,
            uid or str(metadata.get("uid") or ""),
            obj.get("spec") or spec,
            sweep_name=owner.get("name") if owner else None,
            sweep_uid=owner.get("uid") if owner else None,
            trial_parameters=parameters if isinstance(parameters, dict) and owner else {},
        )


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", "") or "")


class Tracker:
    """One job's MLflow run, fed from training without blocking it (see the module docstring)."""

    def __init__(
        self,
        spec: TrackingSpec,
        identity: JobIdentity,
        report: Callable[[TrackingStatus], None],
        log: JsonLines,
        *,
        max_points: int = MAX_QUEUED_POINTS,
        flush_seconds: float | None = None,
        backoff: float = 1.0,
        max_backoff: float = 5.0,
        client_factory: Callable[[str], Any] | None = None,
    ) -> None:
        self.spec, self.identity, self.report, self.log = spec, identity, report, log
        self.experiment = spec.experiment or identity.namespace
        self.max_points = max_points
        self.flush_seconds = FLUSH_SECONDS if flush_seconds is None else flush_seconds
        self.backoff, self.max_backoff = backoff, max_backoff
        self.client_factory = client_factory
        self.dropped = 0
        self.status = TrackingStatus(registered_model=spec.register_as)
        self._ops: deque[Op] = deque()
        self._points = 0
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = math.inf
        self._client: Any = None
        self._attached = False
        self._last_step: dict[str, int] = {}
        self._params: dict[str, str] = {}
        self._experiment_id: str | None = None
        self._made_parent: str | None = None
        """The sweep's run this trial made (None: none, or it lost and is deleted)."""
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracking", daemon=True)
        self._thread.start()

    # The training side: queue and return at once.

    def log_params(self, params: Mapping[str, str]) -> None:
        self._put(("params", dict(params)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if not finite:
            return
        with self._cond:
            if self._points + len(finite) > self.max_points:
                self.dropped += len(finite)
                return
            self._points += len(finite)
            self._ops.append(("metrics", (finite, step)))
            self._cond.notify_all()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._put(("tags", dict(tags)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(("text", (text, artifact_file)))

    def log_file(self, content: bytes, artifact_file: str) -> None:
        self._put(("file", (content, artifact_file)))

    def register(self, source: str, tags: Mapping[str, str]) -> None:
        """Make ``source`` a version of ``spec.registerAs`` (once for this job's uid), after what is queued."""
        if self.spec.register_as is not None:
            self._put(("register", (source, dict(tags))))

    def close(self, run_status: str, wait: float | None = None) -> TrackingStatus:
        """End the run (FINISHED, KILLED or FAILED) once everything queued is logged, waiting for a server that
        is down at most ``flush_seconds`` (``wait``); what is still queued then is given up, and says so."""
        self._put(("end", run_status))
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + (self.flush_seconds if wait is None else wait)
            self._cond.notify_all()
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + 30)
        return self.status

    def _put(self, op: Op) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    # The worker.

    def _loop(self) -> None:
        delay = self.backoff
        while True:
            with self._cond:
                while not self._ops:
                    if self._closing:
                        return
                    self._cond.wait()
                op = self._ops[0]
            try:
                self._apply(op)
            except Exception as exc:
                self._attached = False  # re-read what the server holds before the retry
                self._behind(f"MLflow at {self.spec.uri}: {type(exc).__name__}: {str(exc)[:300]}")
                with self._cond:
                    if self._closing and time.monotonic() >= self._deadline:
                        self._give_up()
                        return
                    self._cond.wait(min(delay, max(0.0, self._deadline - time.monotonic())))
                delay = min(delay * 2, self.max_backoff)
                continue
            delay = self.backoff
            with self._cond:
                self._ops.popleft()
                if op[0] == "metrics":
                    self._points -= len(op[1][0])
                caught_up = not self._ops
            if caught_up and self.status.behind:
                self._update(behind=False, message=None)
            if op[0] == "end":
                return

    def _give_up(self) -> None:
        lost = sorted({kind for kind, _ in self._ops})
        self._ops.clear()
        self._update(
            behind=True,
            message=f"gave up after {self.flush_seconds:.0f}s with MLflow at {self.spec.uri} unreachable; not logged: "
            + ", ".join(lost),
        )

    def _behind(self, message: str) -> None:
        if not self.status.behind or self.status.message != message:
            self.log.emit("warning", message=f"tracking behind: {message}")
            self._update(behind=True, message=message)

    def _update(self, **changes: Any) -> None:
        self.status = self.status.model_copy(update=changes)
        self.report(self.status)

    def _apply(self, op: Op) -> None:
        if not self._attached:
            self._attach()
        kind, value = op
        client, run_id = self._client, self.status.run_id
        if kind == "params":
            fresh = {k: v for k, v in value.items() if k not in self._params}
            items = list(fresh.items())
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(run_id, params=[_param(k, v) for k, v in items[start : start + 100]])
                self._params.update(items[start : start + 100])
        elif kind == "metrics":
            metrics, step = value
            fresh = {k: v for k, v in metrics.items() if step > self._last_step.get(k, -1)}
            if fresh:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[_metric(k, v, now, step) for k, v in fresh.items()])
                self._last_step.update(dict.fromkeys(fresh, step))
        elif kind == "tags":
            client.log_batch(run_id, tags=[_tag(k, v) for k, v in value.items()])
        elif kind == "text":
            client.log_text(run_id, value[0], value[1])
        elif kind == "file":
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / value[1]
                path.write_bytes(value[0])
                client.log_artifact(run_id, str(path))
        elif kind == "register":
            self._register(*value)
        elif kind == "end":
            self._reparent()
            if self.dropped:
                client.set_tag(run_id, "finetune.dev/dropped-metric-points", str(self.dropped))
            client.set_terminated(run_id, value)

    def _attach(self) -> None:
        """Find (or make) the experiment, the sweep's run and this job's run; read what they already hold."""
        if self._client is None:
            # Our own retries with backoff, not the client's (up to minutes per call against a server that is down).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # stdout is our JSON lines
            if self.client_factory is not None:
                self._client = self.client_factory(self.spec.uri)
            else:
                from mlflow.tracking import MlflowClient  # noqa: PLC0415 (a run without tracking never imports it)

                self._client = MlflowClient(tracking_uri=self.spec.uri, registry_uri=self.spec.uri)
        client, who = self._client, self.identity
        experiment_id = self._experiment_id = self._find_experiment()
        parent = self._sweep_run(experiment_id) if who.sweep_uid else None
        runs = self._runs(experiment_id, JOB_UID_TAG, who.uid)
        if runs:
            run = runs[0]
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")  # a retried or resumed trainer goes on
            if parent is not None and run.data.tags.get(PARENT_TAG) != parent:
                client.set_tag(run.info.run_id, PARENT_TAG, parent)  # the sweep's run moved meanwhile
        else:
            tags = {JOB_UID_TAG: who.uid, "finetune.dev/job": f"{who.namespace}/{who.name}"}
            if parent is not None:
                tags[PARENT_TAG] = parent
            run = client.create_run(experiment_id, run_name=who.name, tags=tags)
        run_id = run.info.run_id
        self._params = dict(client.get_run(run_id).data.params)
        self._last_step = {
            key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in client.get_run(run_id).data.metrics
        }
        self._attached = True
        url = f"{self.spec.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        if self.status.run_id != run_id or self.status.parent_run_id != parent:
            self.log.emit("tracking", runId=run_id, url=url, parentRunId=parent)
            self._update(run_id=run_id, url=url, experiment_id=experiment_id, parent_run_id=parent)

    def _find_experiment(self) -> str:
        client = self._client
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(client.create_experiment(self.experiment))
        except Exception as exc:  # another trainer made it meanwhile
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            return str(client.get_experiment_by_name(self.experiment).experiment_id)

    def _runs(self, experiment_id: str, tag: str, value: str) -> list[Any]:
        """Runs tagged ``tag=value``, oldest first (deleted runs are not found)."""
        return list(
            self._client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{tag}` = '{value}'",
                order_by=["attributes.start_time ASC"],
                max_results=100,
            )
        )

    def _sweep_run(self, experiment_id: str) -> str:
        """The sweep's parent run: the least of its runs (made if there is none); ours is deleted if it lost."""
        who = self.identity
        assert who.sweep_uid is not None
        parents = self._runs(experiment_id, SWEEP_UID_TAG, who.sweep_uid)
        if not parents and self._made_parent is None:
            mine = self._client.create_run(
                experiment_id,
                run_name=who.sweep_name,
                tags={SWEEP_UID_TAG: who.sweep_uid, "finetune.dev/sweep": f"{who.namespace}/{who.sweep_name}"},
            )
            self._made_parent = str(mine.info.run_id)
            parents = self._runs(experiment_id, SWEEP_UID_TAG, who.sweep_uid)
        if not parents:  # ours, not yet listed
            assert self._made_parent is not None
            return self._made_parent
        least = str(min(parents, key=_order).info.run_id)
        if self._made_parent is not None and self._made_parent != least:
            self._client.delete_run(self._made_parent)  # idempotent: a retry after a lost answer deletes again
            self._made_parent = None
        return least

    def _reparent(self) -> None:
        """A trial's last look at its sweep's runs: its run goes under the least one if that changed."""
        if self.identity.sweep_uid is None or self._experiment_id is None or self.status.run_id is None:
            return
        parent = self._sweep_run(self._experiment_id)
        if parent != self.status.parent_run_id:
            self._client.set_tag(self.status.run_id, PARENT_TAG, parent)
            self.log.emit("tracking", runId=self.status.run_id, parentRunId=parent, moved=True)
            self._update(parent_run_id=parent)

    def _register(self, source: str, tags: dict[str, str]) -> None:
        client, name, uid = self._client, self.spec.register_as, self.identity.uid
        found = client.search_model_versions(f"name = '{name}' and tags.`{JOB_UID_TAG}` = '{uid}'")
        if found:
            version = found[0]
        else:
            try:
                client.create_registered_model(name)
            except Exception as exc:
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(
                name, source, run_id=self.status.run_id, tags={**tags, JOB_UID_TAG: uid}
            )
        if self.status.registered_version != str(version.version):
            self.log.emit("registered", model=name, version=str(version.version), source=source)
            self._update(registered_version=str(version.version))


def _order(run: Any) -> tuple[int, str]:
    """The strict total order on a sweep's runs that every trial agrees on."""
    return (int(run.info.start_time or 0), str(run.info.run_id))


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param  # noqa: PLC0415 (see _attach)

    return Param(key, value)


def _metric(key: str, value: float, timestamp: int, step: int) -> Any:
    from mlflow.entities import Metric  # noqa: PLC0415 (see _attach)

    return Metric(key, value, timestamp, step)


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag  # noqa: PLC0415 (see _attach)

    return RunTag(key, value)


TRAIN_KEYS: Final = {"loss": "train_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}


class TrackingCallback(TrainerCallback):
    """Queues the training curve at each logging step and every evaluation at its step, as ``status.evaluations``
    has it (``eval_<metric>``, and the mean training loss since the previous one as ``eval_train_loss``)."""

    def __init__(self, tracker: Tracker, evaluations: Callable[[], list[EvaluationRecord]]) -> None:
        self.tracker, self.evaluations = tracker, evaluations
        self.last_evaluation = -1

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        if "loss" in logs:
            self.tracker.log_metrics(
                {name: logs[key] for key, name in TRAIN_KEYS.items() if key in logs}, state.global_step
            )

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        for record in self.evaluations():
            if record.step > self.last_evaluation:
                self.last_evaluation = record.step
                metrics = {f"eval_{k}": v for k, v in record.metrics.items()}
                if record.train_loss is not None:
                    metrics["eval_train_loss"] = record.train_loss
                self.tracker.log_metrics(metrics, record.step)


RUN_STATUS: Final = {"Succeeded": "FINISHED", "EarlyStopped": "FINISHED"}
"""MLflow's run status for an outcome; anything else that ends training early is KILLED (a failure: FAILED)."""


def read_job(reporter: StatusReporter | None) -> dict[str, Any] | None:
    """The trainer's own FineTuneJob (its Role may read it, once it exists), or None outside a cluster or
    when unreadable."""
    if reporter is None or not reporter.wait_for_access():
        return None
    try:
        found = reporter.api.get_namespaced_custom_object(
            GROUP, VERSION, reporter.namespace, PLURAL, reporter.name, _request_timeout=10
        )
    except Exception:
        return None
    return found if isinstance(found, dict) else None


def start(spec: TrainingSpec, env: RuntimeEnv, reporter: StatusReporter | None, log: JsonLines) -> Tracker | None:
    """The run's tracker (None without ``spec.tracking``), with the whole spec queued as params, flattened."""
    if spec.tracking is None:
        return None
    identity = JobIdentity.of(
        read_job(reporter),
        env.job_name or "local",
        env.job_namespace or "default",
        env.job_uid or "",
        spec.to_wire(),
    )

    def report(status: TrackingStatus) -> None:
        if reporter is not None:
            reporter.update(TrainerStatus(tracking=status), urgent=True)

    tracker = Tracker(spec.tracking, identity, report, log)
    tracker.log_params(
        {**flatten(identity.spec), **{f"trial.{k}": str(v) for k, v in identity.trial_parameters.items()}}
    )
    if identity.sweep_name is not None:
        tracker.set_tags({"finetune.dev/sweep": identity.sweep_name})
    return tracker


def _log_curves(
    tracker: Tracker, evaluations: Sequence[EvaluationRecord], best: Mapping[str, Any] | None, title: str
) -> None:
    """``curves.png``: the figure of ``kubectl finetune plot`` (skipped where matplotlib is not installed)."""
    try:
        from finetune_trainer import curves  # noqa: PLC0415 (matplotlib: only a tracked run's end pays for it)
    except ImportError as missing:
        tracker.log.emit("warning", message=f"tracking: no curves.png ({missing})")
        return
    point = (str(best["metric"]), float(best["value"]), int(best["step"])) if best else None
    order = (tracker.identity.spec.get("evaluation") or {}).get("metrics") or []
    figure = curves.curves_figure(evaluations, point, title, [str(m) for m in order])
    tracker.log_file(curves.png(figure), "curves.png")


def log_freeze(tracker: Tracker | None, trainable: int, total: int) -> None:
    if tracker is not None:
        tracker.log_params({"freeze.trainableParameters": str(trainable), "freeze.totalParameters": str(total)})


def finish(
    tracker: Tracker | None,
    reporter: StatusReporter | None,
    reason: str,
    best: Mapping[str, Any] | None,
    model_uri: str | None,
    lineage: Mapping[str, str],
    evaluations: Sequence[EvaluationRecord] = (),
    *,
    failed: bool = False,
    wait: float | None = None,
) -> None:
    """The run's end: outcome, best checkpoint, diagnosis, then (a saved model, ``registerAs``) its model version.
    Waits for a server that is down at most ``wait`` (default ``FLUSH_SECONDS``); never raises."""
    if tracker is None:
        return
    request = reporter.stop_request if reporter is not None else None
    if reason == "Stopped" and request is not None and request.get("reason"):
        reason = str(request["reason"])  # Pruned, SweepFinished, UserRequested
    tags = {OUTCOME_TAG: "Failed" if failed else reason, REASON_TAG: reason}
    if best:
        tags.update({f"finetune.dev/best.{k}": str(v) for k, v in best.items() if v is not None})
        if isinstance(best.get("value"), int | float):
            tracker.log_metrics({f"best_{best.get('metric')}": float(best["value"])}, int(best.get("step") or 0))
    tracker.set_tags(tags)
    if evaluations:
        _log_curves(tracker, evaluations, best, f"{tracker.identity.name}: {tags[OUTCOME_TAG]}")
    job = read_job(reporter)
    diagnosis = ((job or {}).get("status") or {}).get("diagnosis")
    if diagnosis:
        tracker.log_text(json.dumps(diagnosis, indent=2), "diagnosis.json")
        tracker.set_tags({"finetune.dev/diagnosis": ",".join(str(d.get("code")) for d in diagnosis)})
    if model_uri is not None and not failed:
        tags = dict(lineage)
        if best:
            tags.update({"best.metric": str(best.get("metric")), "best.value": str(best.get("value"))})
        tracker.register(registered_source(model_uri), tags)
    run_status = "FAILED" if failed else RUN_STATUS.get(reason, "KILLED")
    try:
        tracker.close(run_status, wait)
    except Exception as exc:  # never the job's failure
        tracker.log.emit("warning", message=f"tracking: {type(exc).__name__}: {exc}")
