"""The node agent's probes: each handler, named ports, thresholds and what a failure asks for."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from finetune_localcluster.probes import ContainerProbes, check


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(type(self).status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.HTTPServer]:
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    _Health.status = 200


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _never(argv: list[str], timeout: float) -> int:
    raise AssertionError("no exec expected")


def test_http_probe_passes_on_2xx_and_fails_on_5xx_and_404(server: http.server.HTTPServer) -> None:
    port = server.server_address[1]
    container = {"ports": [{"name": "health", "containerPort": port}]}
    assert check({"httpGet": {"path": "/healthz", "port": "health"}}, container, _never)[0]  # a named port
    assert check({"httpGet": {"path": "/healthz", "port": port}}, container, _never)[0]
    _Health.status = 503
    ok, why = check({"httpGet": {"path": "/healthz", "port": port}}, container, _never)
    assert not ok and "503" in why
    assert not check({"httpGet": {"path": "/elsewhere", "port": port}}, {}, _never)[0]


def test_closed_ports_unknown_port_names_and_grpc_fail_with_a_reason() -> None:
    ok, why = check({"httpGet": {"path": "/", "port": _closed_port()}}, {}, _never)
    assert not ok and why.startswith("probe failed")
    assert not check({"tcpSocket": {"port": _closed_port()}}, {}, _never)[0]
    ok, why = check({"tcpSocket": {"port": "nope"}}, {"ports": []}, _never)
    assert not ok and "no container port named 'nope'" in why
    ok, why = check({"grpc": {"port": 1}}, {}, _never)
    assert not ok and "not supported" in why


def test_tcp_and_exec_probes(server: http.server.HTTPServer) -> None:
    assert check({"tcpSocket": {"port": server.server_address[1]}}, {}, _never)[0]
    seen: list[tuple[list[str], float]] = []

    def runner(argv: list[str], timeout: float) -> int:
        seen.append((argv, timeout))
        return 0 if argv[0] == "true" else 1

    assert check({"exec": {"command": ["true"]}, "timeoutSeconds": 4}, {}, runner)[0]
    assert not check({"exec": {"command": ["false"]}}, {}, runner)[0]
    assert seen == [(["true"], 4.0), (["false"], 1.0)]


def test_readiness_follows_thresholds_and_never_kills() -> None:
    results = iter([False, True, False, False, True])
    probes = ContainerProbes(
        {
            "readinessProbe": {
                "exec": {"command": ["x"]},
                "periodSeconds": 1,
                "failureThreshold": 2,
                "initialDelaySeconds": 5,
            }
        },
        started_at=100.0,
    )
    runner = lambda argv, timeout: 0 if next(results) else 1  # noqa: E731
    assert probes.tick(104.9, runner) is None and not probes.ready  # initial delay: not probed, not ready
    readiness = []
    for t in (105, 106, 107, 108, 109):
        assert probes.tick(t, runner) is None
        readiness.append(probes.ready)
    # fail (never ready yet), pass -> ready, one failure (< threshold) keeps it, two -> not ready, pass
    assert readiness == [False, True, True, False, True]


def test_liveness_waits_for_startup_then_asks_for_a_kill_after_the_threshold() -> None:
    calls: list[str] = []

    def runner(argv: list[str], timeout: float) -> int:
        calls.append(argv[0])
        return 0 if argv[0] == "startup" else 1

    probes = ContainerProbes(
        {
            "startupProbe": {"exec": {"command": ["startup"]}, "periodSeconds": 1},
            "livenessProbe": {"exec": {"command": ["live"]}, "periodSeconds": 1, "failureThreshold": 2},
        },
        started_at=0.0,
    )
    assert probes.tick(0, runner) is None  # startup passes, then liveness runs: one failure
    assert calls == ["startup", "live"] and probes.started and probes.ready
    why = probes.tick(1, runner)  # the second failure reaches the threshold; startup is not re-run
    assert why is not None and why.startswith("Liveness probe failed 2 times")
    assert calls == ["startup", "live", "live"]


def test_liveness_is_not_probed_before_the_startup_probe_passes() -> None:
    calls: list[str] = []

    def runner(argv: list[str], timeout: float) -> int:
        calls.append(argv[0])
        return 1

    probes = ContainerProbes(
        {
            "startupProbe": {"exec": {"command": ["startup"]}, "periodSeconds": 1, "failureThreshold": 3},
            "livenessProbe": {"exec": {"command": ["live"]}, "periodSeconds": 1, "failureThreshold": 1},
        },
        started_at=0.0,
    )
    assert probes.tick(0, runner) is None and probes.tick(1, runner) is None
    assert not probes.started and not probes.ready
    why = probes.tick(2, runner)
    assert why is not None and why.startswith("Startup probe failed 3 times")
    assert calls == ["startup"] * 3


def test_a_container_without_probes_is_ready_when_running() -> None:
    probes = ContainerProbes({}, started_at=0.0)
    assert probes.tick(0, _never) is None and probes.ready and probes.started
