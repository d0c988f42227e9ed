"""A real MLflow tracking server for the tests and ``make mlflow-up``: SQLite backend, local artifact root.

``--serve-artifacts`` proxies artifacts through the server, so trainer pods need no shared filesystem; it
listens on 127.0.0.1, which pods reach in both runtimes (processes share the node's network, and the podman
runtime runs containers with ``--network=host``; tests/integration/controlplane/test_containers.py checks a
container). :meth:`MlflowServer.stop` and :meth:`start` keep the port and the database, so a test can take
the server away mid-run and bring it back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from finetune_localcluster.cluster import free_port

START_TIMEOUT = 300.0
"""Its first start creates the database (dozens of migrations): a minute on a busy 2-core machine."""


class MlflowServerError(RuntimeError):
    """The server did not start (its log says why)."""


class MlflowServer:
    """One ``mlflow server`` process whose state lives in ``state_dir``."""

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.state_dir = state_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        mlflow = Path(sys.executable).with_name("mlflow")
        return [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.state_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.state_dir / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start it and wait until it answers; its URI."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = (self.state_dir / "server.log").open("ab")
        self.process = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.state_dir,
            start_new_session=True,
            # No job runner: its nine worker processes (GenAI evaluation jobs, which tracking and the registry
            # never use) would start with every server and make each start and stop cost many seconds more.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        (self.state_dir / "server.pid").write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MlflowServerError(
                    f"mlflow server exited {self.process.returncode}; see {self.state_dir / 'server.log'}"
                )
            if self.healthy():
                return self.uri
            time.sleep(0.5)
        self.stop()
        raise MlflowServerError(
            f"mlflow server did not answer within {timeout:.0f}s; see {self.state_dir / 'server.log'}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """Stop its process group (the server and its workers)."""
        if self.process is None:
            return
        stop_group(self.process.pid, self.process.poll)
        self.process.wait(timeout=30)
        self.process = None


def stop_group(pid: int, reap: Callable[[], object] | None = None) -> None:
    """SIGTERM, then SIGKILL after 10 s; ``reap`` (our child leader's ``poll``) lets an exited leader go, as a
    zombie it would keep the group alive for the whole 10 s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        if reap is not None:
            reap()
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


DEFAULT_PORT = 15500


def up(state_dir: Path, port: int = DEFAULT_PORT) -> str:
    """``make mlflow-up``: start (or find running) the server in ``state_dir``; its URI."""
    server = MlflowServer(state_dir, port)
    if server.healthy():
        return server.uri
    server.start()
    server.process = None  # it outlives this command (its own session); ``down`` stops it by its pid file
    return server.uri


def down(state_dir: Path) -> None:
    """``make mlflow-down``: stop the server ``up`` started (its data stays in ``state_dir``)."""
    pid_file = state_dir / "server.pid"
    if pid_file.is_file():
        stop_group(int(pid_file.read_text()))
        pid_file.unlink()
