"""``kubectl finetune sweep`` against a real kube-apiserver with the FineTuneSweep and FineTuneJob CRDs.

No operator runs: the test creates the sweep and its trial FineTuneJobs (labelled as the operator labels
them) and writes their status through the status subresource, which is exactly what the plugin reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_cli import dashboard
from finetune_cli.main import main
from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_operator.api.sweep import SWEEP_PLURAL
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.cli.sweeps import sweep, sweep_status, trial_jobs

pytestmark = pytest.mark.integration
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def custom(local_cluster: LocalCluster, crd: Any, sweep_crd: Any) -> Iterator[client.CustomObjectsApi]:
    with local_cluster.api_client() as api:
        yield client.CustomObjectsApi(api)


def _create(custom: client.CustomObjectsApi, plural: str, namespace: str, manifest: dict[str, Any]) -> None:
    body = {**manifest, "metadata": {k: v for k, v in manifest["metadata"].items() if k != "creationTimestamp"}}
    status = body.pop("status", None)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
    if status is not None:
        custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            plural,
            body["metadata"]["name"],
            {"status": status},
            _content_type="application/merge-patch+json",
        )


def _run(local_cluster: LocalCluster, *args: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--kubeconfig", str(local_cluster.kubeconfig)])
    return int(exited.value.code or 0)


def test_sweep_list_describe_plot_dashboard_on_the_api_server(
    local_cluster: LocalCluster,
    custom: client.CustomObjectsApi,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _create(custom, SWEEP_PLURAL, namespace, sweep("tune", sweep_status(), namespace))
    _create(custom, SWEEP_PLURAL, namespace, sweep("fresh", None, namespace))
    for trial in trial_jobs("tune", namespace):
        _create(custom, PLURAL, namespace, trial)
    with local_cluster.api_client() as api:
        client.CoreV1Api(api).create_namespaced_event(
            namespace,
            {
                "metadata": {"name": "tune.trial-pruned"},
                "involvedObject": {"kind": "FineTuneSweep", "name": "tune", "namespace": namespace},
                "type": "Normal",
                "reason": "TrialPruned",
                "message": "tune-t002 pruned at evaluation 2",
            },
        )

    assert _run(local_cluster, "sweep", "list", "-n", namespace) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:8] == ["fresh", "Pending", "0/12", "0", "0", "0", "accuracy", "(max)"]
    assert lines[2].split()[:10] == [
        "tune",
        "Running",
        "4/12",
        "1",
        "1",
        "1",
        "accuracy",
        "(max)",
        "0.86",
        "(tune-t001)",
    ]
    assert _run(local_cluster, "sweep", "list", "-n", namespace, "-o", "json") == 0
    assert [i["metadata"]["name"] for i in json.loads(capsys.readouterr().out)["items"]] == ["fresh", "tune"]

    assert _run(local_cluster, "sweep", "describe", "tune", "-n", namespace) == 0
    text = capsys.readouterr().out
    table = text.split("Trials (best first by accuracy):\n")[1].split("Best trial:")[0].splitlines()
    assert [row.split()[1 if row.startswith("  *") else 0] for row in table[1:]] == [
        "tune-t001",
        "tune-t000",
        "tune-t004",
        "tune-t002",
        "tune-t003",
    ]
    assert "Pruned" in table[4] and "Failed" in table[5]
    assert "TrialPruned" in text.split("Events:")[1]
    assert _run(local_cluster, "sweep", "describe", "missing", "-n", namespace) == 2
    assert "NotFound" in capsys.readouterr().err

    out = tmp_path / "sweep.png"
    assert _run(local_cluster, "sweep", "plot", "tune", "-n", namespace, "-o", str(out)) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert "4 trials with a accuracy value, 1 pruned" in capsys.readouterr().out
    assert _run(local_cluster, "sweep", "plot", "fresh", "-n", namespace, "-o", str(tmp_path / "none.png")) == 1
    assert not (tmp_path / "none.png").exists()

    served: list[tuple[int, str, int]] = []
    monkeypatch.setattr(
        dashboard,
        "serve",
        lambda storage, host, port: served.append((len(storage.get_all_studies()), host, port)),
    )
    assert _run(local_cluster, "sweep", "dashboard", "tune", "-n", namespace, "--port", "8123") == 0
    assert served == [(1, "127.0.0.1", 8123)]
    assert "5 trials replayed" in capsys.readouterr().out
