"""Where progress goes: JSON lines on stdout (always), the FineTuneJob status (in a pod), Prometheus /metrics."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from finetune_trainer.contract import GROUP, PLURAL, STOP_ANNOTATION, VERSION, Progress, TrainerStatus
from finetune_trainer.errors import MetricsUnavailableError

if TYPE_CHECKING:
    from finetune_trainer.config import RuntimeEnv

RETRYABLE_STATUS = frozenset({409, 429, 500, 502, 503, 504})
ACCESS_TIMEOUT = 60.0
"""How long the first read waits for the trainer's rights: its RoleBinding comes seconds after its pod at most."""
ACCESS_RETRY_CAP = 2.0
CLOSING_ACCESS_WAIT = 8.0
"""How long a run that ends before its rights exist still waits for them, within ``close``'s 15 s: its last
report (how it ended, its best checkpoint) would otherwise be refused and lost."""

_running: set[StatusReporter | PrometheusMetrics] = set()
"""Reporters and /metrics servers whose threads still run: ``stop_background`` stops them."""


def stop_background() -> None:
    """Stop every status reporter (sending what is pending) and /metrics server still running, and join their threads.

    The trainer's exit path calls this whatever ended the run. A daemon thread still running when
    CPython 3.11 finalizes is ended with ``pthread_exit`` as soon as it wakes (the answer to a status
    patch arrives, the server polls), and that unwinding aborts the process: SIGABRT, exit 134 instead
    of the trainer's exit code, so a ModelError was retried as a crash.
    """
    for service in list(_running):
        service.close()


def utc_now() -> str:
    """RFC 3339, UTC, with a Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class JsonLines:
    """One JSON object per line with an ``event`` key: the contract for log collectors and tests."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self._lock = threading.RLock()

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"event": event, "time": utc_now(), **fields}, default=str, allow_nan=False)
        with self._lock:
            stream = self.stream or sys.stdout
            stream.write(line + "\n")
            stream.flush()


class PrometheusMetrics:
    """The trainer pod's own gauges, served on ``address:port`` (port 0 disables).

    A port that is taken fails the run before it trains (exit ``MetricsUnavailable``): a job whose
    curves silently never reach Prometheus would look healthy while nobody can watch it.
    """

    def __init__(self, port: int, log: JsonLines, address: str = "") -> None:
        self.registry = CollectorRegistry()
        self.step = Gauge("finetune_trainer_step", "Optimizer steps done.", registry=self.registry)
        self.epoch = Gauge("finetune_trainer_epoch", "Epochs done (fractional).", registry=self.registry)
        self.train_loss = Gauge(
            "finetune_trainer_train_loss", "Training loss of the last logging window.", registry=self.registry
        )
        self.learning_rate = Gauge("finetune_trainer_learning_rate", "Current learning rate.", registry=self.registry)
        self.samples_per_second = Gauge(
            "finetune_trainer_samples_per_second", "Training throughput since start.", registry=self.registry
        )
        self.progress = Gauge("finetune_trainer_progress_ratio", "step / totalSteps.", registry=self.registry)
        self.eval_metric = Gauge(
            "finetune_trainer_eval_metric", "Last evaluation metrics.", ["metric"], registry=self.registry
        )
        self.port: int | None = None
        self._server: tuple[Any, threading.Thread] | None = None
        if port > 0:
            try:
                self._server = start_http_server(port, addr=address or "0.0.0.0", registry=self.registry)
                self.port = port
                _running.add(self)
            except OSError as exc:
                where = f"{address}:{port}" if address else f"port {port}"
                raise MetricsUnavailableError(
                    f"/metrics cannot listen on {where} ({exc.strerror}): another process in the pod uses the "
                    "port; give trainers a free one (operator --trainer-metrics-port, chart value trainerMetricsPort)"
                ) from exc

    def close(self) -> None:
        """Stop serving and join the server's thread (see ``stop_background``)."""
        _running.discard(self)
        if self._server is not None:
            server, thread = self._server
            self._server = None
            server.shutdown()
            server.server_close()
            thread.join()

    def update_progress(self, progress: Progress) -> None:
        self.step.set(progress.step)
        self.epoch.set(progress.epoch)
        self.progress.set(progress.percent / 100.0)
        if progress.samples_per_second is not None:
            self.samples_per_second.set(progress.samples_per_second)
        if progress.train_loss is not None:
            self.train_loss.set(progress.train_loss)
        if progress.learning_rate is not None:
            self.learning_rate.set(progress.learning_rate)

    def update_evaluation(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.eval_metric.labels(metric=name).set(value)


def load_kube_api() -> Any:
    """In-cluster config first, then KUBECONFIG (laptop runs)."""
    from kubernetes import client, config  # noqa: PLC0415 - only runs that report to a cluster pay for this import

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def start_reporter(env: RuntimeEnv, log: JsonLines, api: Callable[[], Any] = load_kube_api) -> StatusReporter | None:
    """The status reporter of an in-cluster run (best effort: a run without one still trains)."""
    if not env.in_cluster_reporting:
        return None
    try:
        return StatusReporter(api(), str(env.job_name), str(env.job_namespace), env.report_interval_seconds, log)
    except Exception as exc:
        log.emit("warning", message=f"status reporting disabled: {type(exc).__name__}: {exc}")
        return None


def _retryable(exc: Exception) -> bool:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status != 0:
        return status in RETRYABLE_STATUS
    return True  # no HTTP status: connection refused, timeout, DNS


def _api_message(exc: Exception) -> str:
    """The API server's own explanation (e.g. which status field failed validation), else the type."""
    try:
        return str(json.loads(getattr(exc, "body", "") or "{}")["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return type(exc).__name__


def merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON-merge ``patch`` into ``into`` (nested dicts merged, anything else replaced)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


class StatusReporter:
    """Sends status merge patches from a background thread: throttled, retried, never raising into training.

    It also watches for a stop request: in the object each patch returns, and by reading the
    object when no patch went out for an interval (one request per interval, not two: at
    hundreds of jobs the trainers' requests are most of the API server's load).

    Its first read waits for the trainer's rights (``access_timeout`` at most): the operator creates
    the trainer Job without waiting for its Role and RoleBinding, so a pod may start before them.
    Updates queued meanwhile are kept and sent once the read answers.
    """

    def __init__(
        self,
        api: Any,
        name: str,
        namespace: str,
        interval: float,
        log: JsonLines,
        *,
        retries: int = 4,
        backoff: float = 0.5,
        access_timeout: float = ACCESS_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api, self.name, self.namespace = api, name, namespace
        self.interval = interval
        self.log = log
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self.stop_request: dict[str, str] | None = None
        self.patches_sent = 0
        self._pending: dict[str, Any] = {}
        self._urgent = False
        self._closing = False
        self._last_sent = 0.0
        self._last_poll = 0.0
        self._access_deadline = time.monotonic() + access_timeout
        self._accessed = threading.Event()
        self._access_granted = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="status-reporter", daemon=True)
        self._thread.start()
        _running.add(self)

    def update(self, status: TrainerStatus, urgent: bool = False) -> None:
        """Queue what ``status`` sets (merged with anything not yet sent); ``urgent`` skips the throttle."""
        patch = status.to_patch()
        with self._cond:
            merge(self._pending, patch)
            self._urgent = self._urgent or urgent
            self._cond.notify_all()

    def close(self, timeout: float = 15.0) -> None:
        """Send what is pending now, then stop the thread."""
        _running.discard(self)
        with self._cond:
            self._urgent = True
            self._closing = True
            self._access_deadline = min(self._access_deadline, time.monotonic() + CLOSING_ACCESS_WAIT)
            self._cond.notify_all()
        self._thread.join(timeout)

    def _due(self, now: float) -> bool:
        return bool(self._pending) and (self._urgent or self._closing or now - self._last_sent >= self.interval)

    def wait_for_access(self) -> bool:
        """Block until the first read of the FineTuneJob answered or gave up; True when it answered."""
        self._accessed.wait(max(0.0, self._access_deadline - time.monotonic()) + 1.0)
        return self._access_granted

    def _await_access(self) -> None:
        """Read the FineTuneJob until it answers: a 403 until the trainer's RoleBinding exists, or trouble
        reaching the API server, is retried until the deadline (at most ``CLOSING_ACCESS_WAIT`` after the
        run ends). The answer counts as the first stop-request poll."""
        delay, waiting = self.backoff, False
        while True:
            try:
                obj = self.api.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=10
                )
            except Exception as exc:
                status = getattr(exc, "status", None)
                if (status == 403 or _retryable(exc)) and time.monotonic() < self._access_deadline:
                    if status == 403 and not waiting:
                        self.log.emit("info", message=f"waiting for the rights to report: {_api_message(exc)}")
                        waiting = True
                    if self._pause(delay):
                        delay = min(delay * 2, ACCESS_RETRY_CAP)
                        continue
                self.log.emit(
                    "warning", message=f"reading the FineTuneJob failed (status {status}): {_api_message(exc)}"
                )
                break
            self._access_granted = True
            self._note_stop_request(obj)
            if waiting:
                self.log.emit("info", message="the rights to report are granted")
            break
        with self._cond:
            self._last_poll = time.monotonic()
        self._accessed.set()

    def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` (updates queued meanwhile do not wake it); False when the deadline for access
        comes first (``close`` brings it nearer)."""
        until = time.monotonic() + seconds
        with self._cond:
            while (left := min(until, self._access_deadline) - time.monotonic()) > 0:
                self._cond.wait(timeout=left)
            return time.monotonic() < self._access_deadline

    def _loop(self) -> None:
        self._await_access()
        poll_interval = max(self.interval, 1.0)
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._closing or self._due(now) or now - self._last_poll >= poll_interval:
                        break
                    deadline = self._last_poll + poll_interval
                    if self._pending:
                        deadline = min(deadline, self._last_sent + self.interval)
                    self._cond.wait(timeout=max(0.01, deadline - now))
                batch: dict[str, Any] = {}
                if self._due(now):
                    batch, self._pending, self._urgent, self._last_sent = self._pending, {}, False, now
                closing = self._closing
                poll = not closing and now - self._last_poll >= poll_interval
                if poll:
                    self._last_poll = now
            if batch and self._send(batch):
                poll = False  # the patch's answer was the object: as good as a read
                with self._cond:
                    self._last_poll = now
            if poll:
                self._poll_stop_request()
            if closing:
                with self._cond:
                    if not self._pending:
                        return

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:
                if not _retryable(exc) or attempt == self.retries:
                    status = getattr(exc, "status", None)
                    self.log.emit("warning", message=f"{what} failed (status {status}): {_api_message(exc)}")
                    return None
                self.sleep(self.backoff * 2**attempt)
        return None

    def _send(self, status: dict[str, Any]) -> bool:
        """Patch the status; True when the object came back (its stop request is then noted)."""
        body = {"status": status}
        result = self._call(
            "status patch",
            lambda: self.api.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                body,
                field_manager="finetune-trainer",
                _content_type="application/merge-patch+json",
                _request_timeout=10,
            ),
        )
        if result is None:
            return False
        self.patches_sent += 1
        return self._note_stop_request(result)

    def _poll_stop_request(self) -> None:
        self._note_stop_request(
            self._call(
                "reading the FineTuneJob",
                lambda: self.api.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=10
                ),
            )
        )

    def _note_stop_request(self, obj: Any) -> bool:
        if not isinstance(obj, dict):
            return False
        request = stop_request_of(obj)
        if request is not None and self.stop_request is None:
            self.stop_request = request
        return True


def stop_request_of(obj: dict[str, Any]) -> dict[str, str] | None:
    """``status.stopRequest`` or the ``finetune.dev/stop-requested: "true"`` annotation, as {reason, message}."""
    request = (obj.get("status") or {}).get("stopRequest")
    if isinstance(request, dict) and request:
        return {"reason": str(request.get("reason") or "Stopped"), "message": str(request.get("message") or "")}
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if str(annotations.get(STOP_ANNOTATION, "")).lower() == "true":
        return {"reason": "Stopped", "message": f"annotation {STOP_ANNOTATION} is set"}
    return None


@contextmanager
def heartbeats(reporter: StatusReporter | None) -> Iterator[None]:
    """Heartbeats while nothing else reports (a model download, tokenizing a large dataset).

    The operator calls a job Stalled when no heartbeat came for ``stallTimeoutSeconds``; a long
    load is work, not a stall. Beats go at the reporter's interval (it throttles them anyway).
    """
    if reporter is None:
        yield
        return
    done = threading.Event()

    def beat() -> None:
        while True:
            reporter.update(TrainerStatus(progress=Progress(last_heartbeat_time=utc_now())))
            if done.wait(reporter.interval):
                return

    thread = threading.Thread(target=beat, name="load-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
