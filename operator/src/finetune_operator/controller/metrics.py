"""Prometheus metrics served by the operator (prometheus-client).

Fleet series (jobs by phase, reconcile latency, time to Running, duration, early stops,
failures by reason) and per-job training gauges whose series are removed when the job goes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics import MetricWrapperBase

from finetune_operator.api.job import FAILURE_REASONS, FineTuneJobStatus
from finetune_operator.api.sweep import FineTuneSweepStatus
from finetune_operator.controller.metrics_auth import KubernetesAuth, guarded
from finetune_trainer.spec import Metric

EVALUATION_METRICS: frozenset[str] = frozenset(get_args(Metric))
"""The only ``metric`` label values of the per-job evaluation series: the names a spec's
``evaluation.metrics`` can list. Metric names in status are written by the trainer; taken as they
come, a trainer could add series to the operator (and to Prometheus) without bound, write after write."""

PHASES = ("Pending", "Running", "Suspended", "Stalled", "Succeeded", "EarlyStopped", "Pruned", "Failed")
SWEEP_TRIAL_STATES = ("running", "succeeded", "pruned", "stopped", "failed")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


class OperatorMetrics:
    """All series in one registry so tests and the HTTP server see the same values."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("finetune_jobs", "FineTuneJobs by phase.", ["phase"], registry=r)
        self.reconcile_seconds = Histogram(
            "finetune_reconcile_duration_seconds", "Time spent in one reconcile.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.reconcile_errors = Counter("finetune_reconcile_errors", "Reconciles that raised (retried).", registry=r)
        self.time_to_running = Histogram(
            "finetune_time_to_running_seconds",
            "From FineTuneJob creation to its trainer running.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "finetune_job_duration_seconds",
            "From start to completion of finished FineTuneJobs.",
            ["reason"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.early_stops = Counter("finetune_early_stops", "FineTuneJobs that completed by early stopping.", registry=r)
        self.failures = Counter("finetune_job_failures", "FineTuneJobs that failed, by reason.", ["reason"], registry=r)
        per_job = ["namespace", "name"]
        self.progress = Gauge("finetune_job_progress_ratio", "Fraction of planned steps done.", per_job, registry=r)
        self.train_loss = Gauge("finetune_job_train_loss", "Latest training loss.", per_job, registry=r)
        self.samples_per_second = Gauge("finetune_job_samples_per_second", "Training throughput.", per_job, registry=r)
        self.eval_metric = Gauge(
            "finetune_job_eval_metric", "Latest evaluation metric value.", [*per_job, "metric"], registry=r
        )
        self.best_metric = Gauge(
            "finetune_job_best_metric", "Best value of the monitored metric.", [*per_job, "metric"], registry=r
        )
        self.diagnosis = Gauge(
            "finetune_job_diagnosis",
            "1 for each finding of a job's diagnosis (docs/advice.md), by code.",
            [*per_job, "code"],
            registry=r,
        )
        self.api_requests = Counter(
            "finetune_operator_api_requests",
            "Requests the operator made to the Kubernetes API (besides kopf's watches), by verb, kind and status code.",
            ["verb", "kind", "code"],
            registry=r,
        )
        self.sweep_trials = Gauge(
            "finetune_sweep_trials",
            "Trials of a FineTuneSweep by state (running, succeeded, pruned, stopped, failed).",
            [*per_job, "state"],
            registry=r,
        )
        self.sweep_best_value = Gauge(
            "finetune_sweep_best_value",
            "Best objective value of a FineTuneSweep's trials.",
            [*per_job, "metric"],
            registry=r,
        )
        self._sweep_metrics: dict[tuple[str, str], str] = {}
        self._phases: dict[tuple[str, str], str] = {}
        self._metric_names: dict[tuple[str, str], set[str]] = {}
        self._diagnosis_codes: dict[tuple[str, str], set[str]] = {}
        for phase in PHASES:
            self.jobs.labels(phase).set(0)
        for reason in FAILURE_REASONS:  # a labelled counter born at 1 shows no increase() to alerts
            self.failures.labels(reason)

    def metrics(self) -> list[MetricWrapperBase]:
        """Every metric object, in the order they were declared."""
        return [value for value in vars(self).values() if isinstance(value, MetricWrapperBase)]

    def serve(self, port: int, address: str = "0.0.0.0", auth: KubernetesAuth | None = None) -> None:
        """Serve ``/metrics`` in a daemon thread; with ``auth``, only to callers the API server vouches for."""
        if auth is None:
            start_http_server(port, addr=address, registry=self.registry)
            return
        app = guarded(make_wsgi_app(self.registry), auth)
        server = make_server(address, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()

    def observe_job(self, namespace: str, name: str, status: FineTuneJobStatus) -> None:
        """Refresh the per-job gauges and the phase count from a job's status."""
        key = (namespace, name)
        if status.phase is not None and self._phases.get(key) != status.phase:
            self._count(self._phases.get(key), status.phase)
            self._phases[key] = status.phase
        progress = status.progress
        if progress is not None:
            self.progress.labels(namespace, name).set(progress.percent / 100)
            if progress.train_loss is not None:
                self.train_loss.labels(namespace, name).set(progress.train_loss)
            if progress.samples_per_second is not None:
                self.samples_per_second.labels(namespace, name).set(progress.samples_per_second)
        if status.evaluations:
            latest = max(status.evaluations, key=lambda e: e.step)
            for metric, value in latest.metrics.items():
                if metric not in EVALUATION_METRICS:
                    continue
                self.eval_metric.labels(namespace, name, metric).set(value)
                self._metric_names.setdefault(key, set()).add(metric)
        if status.best is not None and status.best.metric in EVALUATION_METRICS:
            self.best_metric.labels(namespace, name, status.best.metric).set(status.best.value)
            self._metric_names.setdefault(key, set()).add(status.best.metric)
        codes = {d.code for d in status.diagnosis}
        for gone in self._diagnosis_codes.get(key, set()) - codes:
            _remove(self.diagnosis, (namespace, name, gone))
        for code in codes:
            self.diagnosis.labels(namespace, name, code).set(1)
        if codes:
            self._diagnosis_codes[key] = codes
        else:  # an empty set per job is ~0.4 KB
            self._diagnosis_codes.pop(key, None)

    def forget_job(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted job, so dashboards do not show ghosts."""
        key = (namespace, name)
        self._count(self._phases.pop(key, None), None)
        for gauge in (self.progress, self.train_loss, self.samples_per_second):
            _remove(gauge, (namespace, name))
        for metric in self._metric_names.pop(key, set()):
            _remove(self.eval_metric, (namespace, name, metric))
            _remove(self.best_metric, (namespace, name, metric))
        for code in self._diagnosis_codes.pop(key, set()):
            _remove(self.diagnosis, (namespace, name, code))

    def observe_sweep(self, namespace: str, name: str, metric_name: str | None, status: FineTuneSweepStatus) -> None:
        """Refresh a sweep's trial counts and best value (of its objective metric)."""
        counts = status.trial_counts
        for state in SWEEP_TRIAL_STATES:
            self.sweep_trials.labels(namespace, name, state).set(getattr(counts, state))
        best = status.best_trial
        metric = self._sweep_metrics.get((namespace, name))
        if best is not None and metric_name is not None:
            if metric is not None and metric != metric_name:
                _remove(self.sweep_best_value, (namespace, name, metric))
            self.sweep_best_value.labels(namespace, name, metric_name).set(best.value)
            self._sweep_metrics[(namespace, name)] = metric_name

    def forget_sweep(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted sweep."""
        for state in SWEEP_TRIAL_STATES:
            _remove(self.sweep_trials, (namespace, name, state))
        metric = self._sweep_metrics.pop((namespace, name), None)
        if metric is not None:
            _remove(self.sweep_best_value, (namespace, name, metric))

    def record_transitions(
        self, reasons: Iterable[str], status: FineTuneJobStatus, created_seconds_ago: float, first_run: bool = True
    ) -> None:
        """Count what just happened (each transition is reported once: conditions persist).
        ``first_run``: the trainer had never run before; a resume is no new time to Running."""
        for reason in set(reasons):
            if reason == "TrainerRunning" and first_run:
                self.time_to_running.observe(max(created_seconds_ago, 0.0))
            elif reason in ("Succeeded", "EarlyStopped", "Stopped"):
                if reason == "EarlyStopped" and status.phase == "EarlyStopped":
                    self.early_stops.inc()
                if status.start_time and status.completion_time:
                    self.duration.labels(reason).observe((status.completion_time - status.start_time).total_seconds())
        if status.phase == "Failed":
            failed = next((c for c in status.conditions if c.type == "Failed" and c.status == "True"), None)
            if failed is not None and failed.reason in reasons:
                self.failures.labels(failed.reason).inc()

    def _count(self, old: str | None, new: str | None) -> None:
        """Move one job between phases (O(1): reconciles at a thousand jobs must not rescan them)."""
        if old is not None:
            self.jobs.labels(old).dec()
        if new is not None:
            self.jobs.labels(new).inc()

    def count_request(self, verb: str, kind: str, code: int) -> None:
        self.api_requests.labels(verb, kind, str(code)).inc()


def _remove(gauge: Gauge, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


DOCS = Path("docs/monitoring.md")
_BEGIN, _END = "<!-- metrics reference: generated by `make docs` -->", "<!-- end of metrics reference -->"


def reference() -> str:
    """A Markdown table of every series the operator serves, from the registry itself."""
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for metric in OperatorMetrics().metrics():
        family = next(iter(metric.describe()))
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in metric._labelnames)  # prometheus-client keeps no public accessor
        rows.append(f"| `{name}` | {family.type} | {labels or '-'} | {family.documentation} |")
    return "\n".join(rows) + "\n"


def render_docs(text: str) -> str:
    """``text`` with the part between the reference markers replaced by ``reference()``."""
    head, found, rest = text.partition(_BEGIN)
    _, found_end, tail = rest.partition(_END)
    if not found or not found_end:
        raise ValueError(f"{DOCS} lacks the markers {_BEGIN!r} ... {_END!r}")
    return f"{head}{_BEGIN}\n{reference()}{_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the metrics reference in docs/monitoring.md.")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--check", action="store_true", help="fail when the reference is out of date")
    args = parser.parse_args(argv)
    current = args.docs.read_text()
    wanted = render_docs(current)
    if args.check:
        if current != wanted:
            print(f"{args.docs}: the metrics reference is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    args.docs.write_text(wanted)
    print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
