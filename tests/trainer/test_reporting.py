"""Status patches (only our keys, throttled, retried, never fatal), stop requests and /metrics."""

from __future__ import annotations

import copy
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.job import FineTuneJobStatus
from finetune_trainer import exitcodes
from finetune_trainer import run as run_mod
from finetune_trainer.contract import MAX_EVALUATIONS, TRAINER_STATUS_KEYS, EvaluationRecord, Progress, TrainerStatus
from finetune_trainer.errors import MetricsUnavailableError
from finetune_trainer.reporting import JsonLines, PrometheusMetrics, StatusReporter, merge, stop_request_of
from tests.trainer import tiny
from tests.trainer.helpers import of, result_json, train

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


class ApiError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class FakeApi:
    """The two CustomObjectsApi calls the trainer makes, recorded; failures scripted."""

    def __init__(
        self, obj: dict[str, Any] | None = None, failures: list[int] | None = None, denied_until: float = 0.0
    ) -> None:
        self.obj = obj or {"metadata": {"name": "job"}, "status": {}}
        self.failures = list(failures or [])
        self.denied_until = denied_until
        """Every call answers 403 until this time.monotonic(): the trainer's RoleBinding does not exist yet."""
        self.patches: list[dict[str, Any]] = []
        self.calls = 0
        self.reads = 0
        self.lock = threading.Lock()

    def patch_namespaced_custom_object_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, body: dict[str, Any], **kwargs: Any
    ) -> dict[str, Any]:
        assert (group, version, plural, namespace, name) == ("finetune.dev", "v1alpha1", "finetunejobs", "ns", "job")
        assert kwargs["_content_type"] == "application/merge-patch+json"
        with self.lock:
            self.calls += 1
            self._deny()
            if self.failures:
                raise ApiError(self.failures.pop(0))
            self.patches.append(body)
        return self.obj  # the API server answers a patch with the whole object

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **kwargs: Any
    ) -> dict[str, Any]:
        with self.lock:
            self.reads += 1
            self._deny()
        return self.obj

    def _deny(self) -> None:
        if time.monotonic() < self.denied_until:
            raise ApiError(403)


def reporter(api: FakeApi, interval: float) -> StatusReporter:
    return StatusReporter(api, "job", "ns", interval, JsonLines(enabled=False), backoff=0.01)


def progress(**fields: Any) -> TrainerStatus:
    return TrainerStatus(progress=Progress(**fields))


def test_throttle_urgent_and_close() -> None:
    api = FakeApi()
    r = reporter(api, interval=30)
    r.update(progress(step=1))
    time.sleep(0.3)
    r.update(progress(step=2))
    r.update(progress(step=3, train_loss=0.5))
    time.sleep(0.3)
    assert [p["status"]["progress"]["step"] for p in api.patches] == [1]  # throttled
    r.update(TrainerStatus(evaluations=[EvaluationRecord(step=3, metrics={"loss": 0.5})]), urgent=True)
    time.sleep(0.3)
    evaluations = [{"step": 3, "metrics": {"loss": 0.5}}]
    assert api.patches[-1] == {"status": {"progress": {"step": 3, "trainLoss": 0.5}, "evaluations": evaluations}}
    r.update(progress(step=4))
    r.close()
    assert api.patches[-1]["status"]["progress"]["step"] == 4  # flushed at the end


def test_retries_transient_errors_and_gives_up_quietly() -> None:
    api = FakeApi(failures=[409, 503, 429])
    r = reporter(api, interval=0)
    r.update(progress(step=1), urgent=True)
    r.close()
    assert api.calls == 4 and len(api.patches) == 1
    api = FakeApi(failures=[403])
    r = reporter(api, interval=0)
    r.update(progress(step=1), urgent=True)
    r.close()
    assert api.calls == 1 and api.patches == []  # not retried, and nothing raised


def test_what_a_trainer_reports_before_its_rights_exist_is_sent_once_they_do() -> None:
    """The operator creates the trainer Job without waiting for its Role and RoleBinding. A report sent before
    they existed was refused (403, not retried) and lost: the first progress, the tracking run's id."""
    api = FakeApi(denied_until=time.monotonic() + 0.3)
    r = reporter(api, interval=0)
    r.update(TrainerStatus(progress=Progress(step=1, total_steps=10)), urgent=True)
    time.sleep(0.5)  # training goes on meanwhile
    r.close()
    assert api.patches == [{"status": {"progress": {"step": 1, "totalSteps": 10}}}], api.patches
    assert api.reads >= 2 and r.wait_for_access(), "read again after the 403, until it answered"

    api = FakeApi(denied_until=time.monotonic() + 60)
    r = StatusReporter(api, "job", "ns", 0, JsonLines(enabled=False), backoff=0.01, access_timeout=0.2)
    assert not r.wait_for_access(), "rights that never come: it stops waiting"
    r.close()


def test_a_run_that_ends_before_its_rights_exist_still_sends_its_last_report() -> None:
    """A short run can end before its RoleBinding exists: ``close`` stopped the wait, and the last report (how it
    ended, its best checkpoint) was refused and lost. It now waits a little longer for the rights."""
    api = FakeApi(denied_until=time.monotonic() + 0.3)
    r = reporter(api, interval=0)
    r.update(TrainerStatus(progress=Progress(step=10, total_steps=10)), urgent=True)
    r.close()
    assert api.patches == [{"status": {"progress": {"step": 10, "totalSteps": 10}}}], api.patches


def test_a_reporting_trainer_sees_stop_requests_in_patch_answers_without_extra_reads() -> None:
    api = FakeApi()
    r = reporter(api, interval=0.1)
    for step in range(8):
        r.update(progress(step=step))
        time.sleep(0.06)
    assert r.stop_request is None and len(api.patches) >= 3
    api.obj = {"metadata": {"name": "job"}, "status": {"stopRequest": {"reason": "EarlyStopped", "message": "m"}}}
    r.update(progress(step=9))
    time.sleep(0.3)
    assert r.stop_request == {"reason": "EarlyStopped", "message": "m"}
    r.close()
    assert api.reads <= 1  # the first round at most: after that every answer to a patch served


def test_an_idle_trainer_polls_for_stop_requests() -> None:
    api = FakeApi(obj={"metadata": {"annotations": {"finetune.dev/stop-requested": "true"}}})
    r = reporter(api, interval=0.05)
    deadline = time.monotonic() + 5
    while r.stop_request is None and time.monotonic() < deadline:
        time.sleep(0.05)
    r.close()
    assert r.stop_request is not None and api.reads >= 1 and api.patches == []


def test_stop_request_sources() -> None:
    assert stop_request_of({"status": {"stopRequest": {"reason": "EarlyStopped", "message": "m"}}}) == {
        "reason": "EarlyStopped",
        "message": "m",
    }
    assert (
        stop_request_of({"metadata": {"annotations": {"finetune.dev/stop-requested": "true"}}})["reason"] == "Stopped"
    )
    assert stop_request_of({"metadata": {"annotations": {"finetune.dev/stop-requested": "false"}}}) is None


@pytest.mark.parametrize("reason", ["Stopped", "EarlyStopped"])
def test_in_pod_run_reports_and_honours_a_stop_request(
    reason: str, assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi(failures=[409])
    monkeypatch.setattr(run_mod, "load_kube_api", lambda: api)
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={"maxSteps": 100000, "batchSize": 8},
        # every step is an evaluation step, the one the stop arrives at too
        evaluation={"strategy": "steps", "interval": 1, "metrics": ["loss", "accuracy"]},
    )

    def request_stop() -> None:  # once an evaluation was reported: a stop itself evaluates nothing
        deadline = time.monotonic() + 120
        while not any("evaluations" in p["status"] for p in list(api.patches)) and time.monotonic() < deadline:
            time.sleep(0.05)
        api.obj = {"metadata": {"name": "job"}, "status": {"stopRequest": {"reason": reason, "message": "enough"}}}

    threading.Thread(target=request_stop, daemon=True).start()
    result, events = train(wire, job_name="job", job_namespace="ns", report_interval_seconds=0.2)
    body = result_json(out)
    assert result.exit_code == 0 and body["reason"] == reason and body["message"] == "enough"
    assert of(events, "stopping")[0]["reason"] == reason
    after_stop = events[events.index(of(events, "stopping")[0]) :]
    assert of(after_stop, "evaluation") == []  # nothing is evaluated in the grace period
    assert (out / "checkpoints" / f"checkpoint-{body['finalStep']}").is_dir()
    assert body["finalStep"] < 1000
    stored: dict[str, Any] = {}
    for patch in api.patches:
        assert set(patch) == {"status"} and set(patch["status"]) <= set(TRAINER_STATUS_KEYS)
        merge(stored, copy.deepcopy(patch["status"]))
        FineTuneJobStatus.model_validate(stored)  # what the trainer writes, the operator reads
    finalizing = [
        p["status"]["progress"]["finalizing"] for p in api.patches if "finalizing" in p["status"].get("progress", {})
    ]
    assert finalizing == [True, None], "the final save is announced, then the flag is cleared (merge-patch null)"
    last = [p["status"] for p in api.patches if "step" in p["status"].get("progress", {})][-1]
    assert last["progress"]["step"] == body["finalStep"] and RFC3339_Z.match(last["progress"]["lastHeartbeatTime"])
    assert set(last["progress"]) - {"finalizing"} == {
        "step",
        "totalSteps",
        "epoch",
        "totalEpochs",
        "percent",
        "etaSeconds",
        "samplesPerSecond",
        "trainLoss",
        "learningRate",
        "lastHeartbeatTime",
    }
    assert 0 < len(last["evaluations"]) <= MAX_EVALUATIONS
    assert set(last["evaluations"][-1]["metrics"]) == {"loss", "accuracy"}
    assert last["best"]["checkpoint"].endswith(f"checkpoint-{last['best']['step']}")


def test_prometheus_metrics_endpoint_and_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = PrometheusMetrics(port, JsonLines(enabled=False))
    metrics.update_progress(
        Progress(step=7, epoch=0.5, percent=50.0, samples_per_second=12.0, train_loss=0.3, learning_rate=1e-4)
    )
    metrics.update_evaluation({"accuracy": 0.9})
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "finetune_trainer_step 7.0" in text and 'finetune_trainer_eval_metric{metric="accuracy"} 0.9' in text
    assert "finetune_trainer_progress_ratio 0.5" in text
    # A taken port is an error that ends the run before it trains, with its own exit code: never a
    # job whose curves silently never reach Prometheus.
    with pytest.raises(MetricsUnavailableError, match=rf"/metrics cannot listen on 127.0.0.1:{port} \(") as error:
        PrometheusMetrics(port, JsonLines(enabled=False), "127.0.0.1")
    assert (error.value.exit_code, error.value.reason) == (7, "MetricsUnavailable")
    assert 7 in exitcodes.PERMANENT, "a retry on the same port cannot help"


def test_a_long_s3_download_sends_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26: the s3:// staging (download once, restore checkpoints) runs before torch and before the run's own
    reporter; a download longer than stallTimeoutSeconds is work, not a stall: heartbeats go out meanwhile."""
    from finetune_trainer import cli, s3

    api = FakeApi()
    beats_during_download: list[int] = []

    def slow_prepare(spec: Any, env: Any, emit: Any) -> Any:
        time.sleep(1.0)  # five report intervals
        beats_during_download.append(sum("lastHeartbeatTime" in p["status"].get("progress", {}) for p in api.patches))
        return spec

    monkeypatch.setattr(s3, "prepare", slow_prepare)
    monkeypatch.setattr(cli, "start_reporter", lambda env, log: reporter(api, 0.2))
    staged = object()
    assert cli._staged(staged, None, JsonLines(enabled=False)) is staged  # type: ignore[arg-type]
    assert beats_during_download and beats_during_download[0] >= 3, "no heartbeat while the model downloaded"


def test_a_long_model_load_sends_heartbeats(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model download longer than stallTimeoutSeconds is work, not a stall: heartbeats go out while it loads."""
    api = FakeApi()
    monkeypatch.setattr(run_mod, "load_kube_api", lambda: api)
    load_model = run_mod.load_model
    beats_during_load: list[int] = []

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)  # five report intervals: a slow download
        beats_during_load.append(sum("lastHeartbeatTime" in p["status"].get("progress", {}) for p in api.patches))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(run_mod, "load_model", slow_load)
    wire = tiny.spec(assets["bert"], assets["sentiment"], tmp_path / "out", hyperparameters={"maxSteps": 2})
    result, _ = train(wire, job_name="job", job_namespace="ns", report_interval_seconds=0.2)
    assert result.exit_code == 0
    assert beats_during_load and beats_during_load[0] >= 3, "no heartbeat while the model loaded"
