"""Stand-in trainer images for operator tests: a foreign trainer that speaks only the status
contract (progress, evaluations), with scripted misbehaviour. It shares no code with
finetune_trainer, like a third-party image: it talks to the API server with its pod's
service-account token.

    fake_trainer.py stubborn   reports worsening evaluations and ignores stop requests; saves for 4 s on SIGTERM
    fake_trainer.py crash-once fails on its first run after a checkpoint, then resumes and finishes
    fake_trainer.py exit N     exits with code N at once (2/3/4: the trainer's permanent errors)
    fake_trainer.py steady     reports progress slowly until asked to stop or done
    fake_trainer.py plateau    accuracy peaks at step 20 and stalls; stops when asked (a real early stop)
    fake_trainer.py silent     reports twice, then hangs without a word (a stuck data loader)
    fake_trainer.py forger     once asked to stop, tries to forge the operator's status keys; saves the answers
    fake_trainer.py quick S    reports every 5 s for S seconds, then finishes (many at once: chaos runs)
    fake_trainer.py paced      trains 60 steps in ~30 s, evaluating every 10 and serving /metrics
    fake_trainer.py sweep      6 evaluations in ~2 s whose accuracy grows with hyperparameters.weightDecay
                               (a sweep's parameter); stops when asked, as a pruned trial must
    fake_trainer.py resumable  40 steps in ~10 s, evaluating every 5; checkpoints on SIGTERM (exit 75) and resumes
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

SA = Path(os.environ.get("FINETUNE_SA_DIR") or "/var/run/secrets/kubernetes.io/serviceaccount")


def _request(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    context = ssl.create_default_context(cafile=str(SA / "ca.crt"))
    request = urllib.request.Request(
        f"https://{host}:{port}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Authorization": f"Bearer {(SA / 'token').read_text().strip()}",
            "Content-Type": "application/merge-patch+json",
        },
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _job_path() -> str:
    namespace, name = os.environ["FINETUNE_JOB_NAMESPACE"], os.environ["FINETUNE_JOB_NAME"]
    return f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report(step: int, total: int, evaluations: list[dict[str, Any]]) -> None:
    progress = {
        "step": step,
        "totalSteps": total,
        "epoch": step / 10,
        "percent": round(100 * step / total, 1),
        "trainLoss": 1.0 / (1 + step),
        "samplesPerSecond": 12.5,
        "lastHeartbeatTime": _now(),
    }
    _request("PATCH", _job_path() + "/status", {"status": {"progress": progress, "evaluations": evaluations[-50:]}})


def wait_for_rights(timeout: float = 60) -> None:
    """As the real trainer does: the operator creates the Job without waiting for its Role and RoleBinding
    (``finetune_trainer.reporting.StatusReporter``), so the first read may be refused for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _request("GET", _job_path())
            return
        except urllib.error.HTTPError as error:
            if error.code != 403 or time.monotonic() > deadline:
                return
            time.sleep(0.2)


def stop_requested() -> bool:
    return bool((_request("GET", _job_path()).get("status") or {}).get("stopRequest"))


def evaluation(step: int, accuracy: float) -> dict[str, Any]:
    return {"step": step, "epoch": step / 10, "metrics": {"loss": 1 - accuracy, "accuracy": accuracy}, "time": _now()}


PLATEAU = [0.5, 0.6, 0.55, 0.56, 0.57, 0.58, 0.59, 0.58]
"""Accuracy at steps 10, 20, ...: it peaks at step 20, then stalls (early stopping with patience 2 fires)."""


def plateau() -> int:
    """Accuracy peaks at step 20 and stalls; the trainer honours the stop request, as the real one does."""
    evaluations: list[dict[str, Any]] = []
    for index, value in enumerate(PLATEAU):
        step = 10 * (index + 1)
        evaluations.append(evaluation(step, value))
        report(step, 1000, evaluations)
        if stop_requested():
            return 0
        time.sleep(0.5)
    while not stop_requested():
        report(step, 1000, evaluations)
        time.sleep(0.5)
    return 0


def stubborn() -> int:
    """Accuracy peaks at step 20, then stalls; never honours the stop request."""
    evaluations: list[dict[str, Any]] = []
    for index, value in enumerate(PLATEAU):
        step = 10 * (index + 1)
        evaluations.append(evaluation(step, value))
        report(step, 1000, evaluations)
        time.sleep(0.5)
    while True:  # keeps "training" until killed
        report(step, 1000, evaluations)
        time.sleep(1)


def forger(output: Path) -> int:
    """Code in the pod trying to write what the operator owns, with the pod's own token; records the answers."""
    while not stop_requested():  # the operator's stop request, which it then tries to clear
        report(1, 10, [])
        time.sleep(0.5)
    attempts: dict[str, dict[str, Any]] = {
        "progress": {"progress": {"step": 2, "totalSteps": 10, "lastHeartbeatTime": _now()}},
        "evaluations": {"evaluations": [evaluation(2, 0.5)]},
        "complete": {"conditions": [{"type": "Complete", "status": "True", "reason": "Succeeded", "message": ""}]},
        "stopRequest": {"stopRequest": None},
        "earlyStopping": {"earlyStopping": {"metric": "accuracy", "mode": "max", "patience": 1000}},
        "bestElsewhere": {"best": {"metric": "accuracy", "value": 1.0, "step": 2, "checkpoint": "file:///etc/passwd"}},
    }
    attempts["complete"]["conditions"][0]["lastTransitionTime"] = _now()
    answers: dict[str, Any] = {}
    for name, status in attempts.items():
        try:
            _request("PATCH", _job_path() + "/status", {"status": status})
            answers[name] = {"code": 200}
        except urllib.error.HTTPError as error:
            answers[name] = {"code": error.code, "message": json.loads(error.read()).get("message", "")}
    output.mkdir(parents=True, exist_ok=True)
    (output / "forgery.json").write_text(json.dumps(answers, indent=2))
    return 0


def slow_save(output: Path) -> None:
    """Halted: save for a few seconds (a real trainer's final checkpoint), then exit 75."""
    time.sleep(4)
    output.mkdir(parents=True, exist_ok=True)
    (output / "saved-on-sigterm").write_text(_now())
    sys.exit(75)


def crash_once(output: Path) -> int:
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "checkpoint.json"
    if not checkpoint.exists():
        report(5, 10, [])
        checkpoint.write_text(json.dumps({"step": 5}))
        print("simulated crash after checkpoint at step 5", file=sys.stderr)
        return 1
    start = json.loads(checkpoint.read_text())["step"]
    print(f"resuming from step {start}", flush=True)
    evaluations = [evaluation(10, 0.8)]
    for step in range(start + 1, 11):
        report(step, 10, evaluations if step == 10 else [])
    (output / "resumed-from").write_text(str(start))
    return 0


def steady(total: int = 600) -> int:
    for step in range(1, total + 1):
        report(step, total, [])
        if stop_requested():
            print("stop requested: saving and exiting", flush=True)
            return 0
        time.sleep(1)
    return 0


def quick(seconds: float) -> int:
    """A short run that costs the API server little: a report every 5 s."""
    started = time.monotonic()
    total = max(int(seconds), 1)
    while True:
        elapsed = time.monotonic() - started
        try:
            report(min(int(elapsed), total), total, [])
        except OSError as error:  # the API server is restarting: the next report says it all
            print(f"report failed: {error}", file=sys.stderr, flush=True)
        if elapsed >= seconds:
            return 0
        time.sleep(min(5.0, seconds - elapsed + 0.01))


def serve_metrics(progress: dict[str, int]) -> None:
    """/metrics on the port the operator gives trainers (FINETUNE_METRICS_PORT), as a real one does."""

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"fake_trainer_step {progress['step']}\n".encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    address = os.environ.get("FINETUNE_METRICS_ADDRESS") or "0.0.0.0"
    server = http.server.ThreadingHTTPServer((address, int(os.environ["FINETUNE_METRICS_PORT"])), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def paced(total: int = 60) -> int:
    """Long enough to outlive an operator restart (a helm upgrade), short enough for a test."""
    progress = {"step": 0}
    serve_metrics(progress)
    evaluations: list[dict[str, Any]] = []
    for step in range(1, total + 1):
        progress["step"] = step
        if step % 10 == 0:
            evaluations.append(evaluation(step, 0.5 + step / 200))
            best = {"metric": "accuracy", "value": 0.5 + step / 200, "step": step, "epoch": step / 10}
            _request("PATCH", _job_path() + "/status", {"status": {"best": best}})
        report(step, total, evaluations)
        time.sleep(0.5)
    return 0


def sweep(config: dict[str, Any]) -> int:
    """Accuracy = 0.4 + weightDecay * (1 + evaluation / 6): a trial is as good as its parameter, from the start."""
    decay = float(config["hyperparameters"]["weightDecay"])
    evaluations: list[dict[str, Any]] = []
    total = 60
    for number in range(1, 7):
        step = 10 * number
        accuracy = round(0.4 + decay * (1 + number / 6), 4)
        evaluations.append(evaluation(step, accuracy))
        best = max(evaluations, key=lambda e: e["metrics"]["accuracy"])
        _request(
            "PATCH",
            _job_path() + "/status",
            {"status": {"best": {"metric": "accuracy", "value": best["metrics"]["accuracy"], "step": best["step"]}}},
        )
        report(step, total, evaluations)
        if stop_requested():
            print(f"stop requested at evaluation {number}: saving and exiting", flush=True)
            return 0
        time.sleep(0.25)
    return 0


RESUMABLE_STEPS = 40
RESUMABLE_EVAL_EVERY = 5


def resumable(output: Path) -> int:
    """Like a real trainer under Kueue: saves its step and evaluation history on SIGTERM (preemption)
    and exits 75; a new pod resumes from there. Each run's first step goes to ``runs.jsonl``."""
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "checkpoint.json"
    state = json.loads(checkpoint.read_text()) if checkpoint.exists() else {"step": 0, "evaluations": []}

    def save_and_exit(*_: object) -> None:
        partial = output / "checkpoint.json.tmp"
        partial.write_text(json.dumps(state))
        partial.replace(checkpoint)
        print(f"SIGTERM: checkpoint at step {state['step']}", flush=True)
        sys.exit(75)

    signal.signal(signal.SIGTERM, save_and_exit)
    with (output / "runs.jsonl").open("a") as runs:
        runs.write(json.dumps({"resumed_from": state["step"], "started": time.time()}) + "\n")
    for step in range(state["step"] + 1, RESUMABLE_STEPS + 1):
        time.sleep(0.25)
        evaluations = state["evaluations"]
        if step % RESUMABLE_EVAL_EVERY == 0:
            evaluations = [*evaluations, evaluation(step, 0.5 + step / 100)]
        state = {"step": step, "evaluations": evaluations}
        report(step, RESUMABLE_STEPS, evaluations)
    return 0


def silent() -> int:
    report(1, 100, [])
    report(2, 100, [])
    while True:
        time.sleep(60)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mode = argv[1]
    config = argv[argv.index("--config") + 1] if "--config" in argv else ""
    print(json.dumps({"event": "start", "mode": mode, "config": config}), flush=True)
    if mode != "exit" and "KUBERNETES_SERVICE_HOST" in os.environ:
        wait_for_rights()
    if mode == "stubborn":
        location = yaml.safe_load(Path(config).read_text())["output"]["location"] if config else ""
        signal.signal(signal.SIGTERM, lambda *_: slow_save(Path(location.removeprefix("file://"))))
        return stubborn()
    if mode == "crash-once":
        location = yaml.safe_load(Path(config).read_text())["output"]["location"]
        return crash_once(Path(location.removeprefix("file://")))
    if mode == "exit":
        code = int(argv[2])
        print(f"finetune-trainer: error: scripted failure with exit code {code}", file=sys.stderr)
        return code
    if mode == "paced":
        return paced()
    if mode == "resumable":
        location = yaml.safe_load(Path(config).read_text())["output"]["location"]
        return resumable(Path(location.removeprefix("file://")))
    if mode == "steady":
        return steady()
    if mode == "plateau":
        return plateau()
    if mode == "forger":
        location = yaml.safe_load(Path(config).read_text())["output"]["location"]
        return forger(Path(location.removeprefix("file://")))
    if mode == "silent":
        return silent()
    if mode == "sweep":
        return sweep(yaml.safe_load(Path(config).read_text()))
    if mode == "quick":
        return quick(float(argv[2]))
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
