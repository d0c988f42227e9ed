"""The plugin's commands against a real kube-apiserver with the FineTuneJob CRD.

No operator runs: each test writes the status itself (merge patch of the status
subresource), which is exactly what the plugin reads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_cli import kube as kube_module
from finetune_cli.main import main
from finetune_operator.api.job import GROUP, PLURAL, STOP_ANNOTATION, VERSION
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.cli.jobs import condition, early_stopped_status, failed_status, job, running_status
from tests.cli.plugin import kubectl_finetune

pytestmark = pytest.mark.integration
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def custom(local_cluster: LocalCluster, crd: Any) -> Iterator[client.CustomObjectsApi]:
    with local_cluster.api_client() as api:
        yield client.CustomObjectsApi(api)


def _create(custom: client.CustomObjectsApi, namespace: str, name: str, status: dict[str, Any] | None) -> None:
    manifest = job(name, namespace=namespace)
    del manifest["metadata"]["creationTimestamp"]
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    if status is not None:
        _patch_status(custom, namespace, name, status)


def _patch_status(custom: client.CustomObjectsApi, namespace: str, name: str, status: dict[str, Any]) -> None:
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _content_type="application/merge-patch+json"
    )


def _run(local_cluster: LocalCluster, *args: str) -> int:
    """Run the plugin in-process; its exit code."""
    with pytest.raises(SystemExit) as exited:
        main([*args, "--kubeconfig", str(local_cluster.kubeconfig)])
    return int(exited.value.code or 0)


def test_list_shows_progress_and_best_and_supports_output_formats(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _create(custom, namespace, "alpha", running_status())
    _create(custom, namespace, "beta", None)
    assert _run(local_cluster, "list", "-n", namespace) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "STEP", "EPOCH", "METRIC", "BEST", "AGE"]
    assert lines[1].split()[:7] == ["alpha", "Running", "50%", "150/300", "1.5/3", "accuracy=0.84", "0.86@100"]
    assert lines[2].split()[:2] == ["beta", "Pending"]

    assert _run(local_cluster, "-n", namespace, "list", "-o", "json") == 0  # flags before the command work too
    items = json.loads(capsys.readouterr().out)["items"]
    assert [i["metadata"]["name"] for i in items] == ["alpha", "beta"]
    assert _run(local_cluster, "list", "-A", "-o", "yaml") == 0
    assert {"alpha", "beta"} <= {i["metadata"]["name"] for i in yaml.safe_load(capsys.readouterr().out)["items"]}
    assert _run(local_cluster, "list", "-A") == 0
    assert capsys.readouterr().out.split()[0] == "NAMESPACE"


def test_describe_and_not_found(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _create(custom, namespace, "done", early_stopped_status())
    assert _run(local_cluster, "describe", "done", "-n", namespace) == 0
    text = capsys.readouterr().out
    assert "Outcome:   Complete (EarlyStopped)" in text
    assert "Early stopping: accuracy did not improve" in text
    assert "accuracy=0.86 at step 100: file:///out/ckpt-100" in text
    assert _run(local_cluster, "describe", "missing", "-n", namespace) == 2
    assert "NotFound" in capsys.readouterr().err


def test_stop_sets_the_annotation_and_explains(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _create(custom, namespace, "runner", running_status())
    assert _run(local_cluster, "stop", "runner", "-n", namespace) == 0
    out = capsys.readouterr().out
    assert "stop requested" in out and "save a checkpoint" in out and "after 120s" in out
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "runner")
    assert stored["metadata"]["annotations"][STOP_ANNOTATION] == "true"
    assert _run(local_cluster, "stop", "runner", "-n", namespace) == 0
    assert "already requested" in capsys.readouterr().out

    _create(custom, namespace, "finished", early_stopped_status())
    assert _run(local_cluster, "stop", "finished", "-n", namespace) == 0
    assert "already finished" in capsys.readouterr().out
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "finished")
    assert STOP_ANNOTATION not in (stored["metadata"].get("annotations") or {})


def test_plot_writes_a_png(
    local_cluster: LocalCluster,
    custom: client.CustomObjectsApi,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _create(custom, namespace, "curvy", early_stopped_status())
    out = tmp_path / "curves.png"
    assert _run(local_cluster, "plot", "curvy", "-n", namespace, "-o", str(out)) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert "4 evaluations" in capsys.readouterr().out
    _create(custom, namespace, "fresh", None)
    assert _run(local_cluster, "plot", "fresh", "-n", namespace, "-o", str(tmp_path / "none.png")) == 1
    assert not (tmp_path / "none.png").exists()


def _later(action: Any, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("final", "code"), [("complete", 0), ("failed", 1)])
def test_watch_follows_progress_until_the_end(
    local_cluster: LocalCluster,
    custom: client.CustomObjectsApi,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    final: str,
    code: int,
) -> None:
    _create(custom, namespace, "w", None)

    def progress() -> None:
        _patch_status(custom, namespace, "w", running_status())
        time.sleep(0.5)
        if final == "complete":
            done: dict[str, Any] = {
                "phase": "Succeeded",
                "conditions": [condition("Complete", "True", "Succeeded", "training finished")],
                "progress": {"step": 300, "percent": 100.0},
            }
            _patch_status(custom, namespace, "w", done)
        else:
            _patch_status(custom, namespace, "w", failed_status())

    thread = _later(progress, 1.0)  # watch has printed its first (Pending) line by then
    started = time.monotonic()
    assert _run(local_cluster, "watch", "w", "-n", namespace, "--interval", "0.05") == code
    thread.join()
    assert time.monotonic() - started < 10
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "w Pending: waiting for the trainer's first report"
    assert any("step 150/300" in line and "ETA 3m20s" in line for line in lines)
    assert len(lines) == len(set(lines)), "one line per change when not a TTY"
    if final == "complete":
        assert lines[-1] == "w Complete (Succeeded): training finished"
    else:
        assert lines[-1] == "w Failed (TrainerError): trainer exited with code 1: CUDA OOM"


def test_watch_of_a_missing_job_exits_2(local_cluster: LocalCluster, crd: Any, namespace: str) -> None:
    assert _run(local_cluster, "watch", "nope", "-n", namespace, "--interval", "0.05") == 2


def _trainer_pod(local_cluster: LocalCluster, namespace: str, job_name: str) -> str:
    """A finished pod labelled like the operator's trainer pods, whose container prints two lines."""
    name = f"{job_name}-trainer-0"
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {kube_module.JOB_LABEL: job_name}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "trainer", "image": "busybox:1.36", "command": ["/bin/sh", "-c", "echo step 1; echo step 2"]}
            ],
        },
    }
    with local_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, body)
        deadline = time.monotonic() + 30
        while core.read_namespaced_pod(name, namespace).status.phase != "Succeeded":
            assert time.monotonic() < deadline, "the trainer pod never finished"
            time.sleep(0.1)
    return name


def test_logs_through_the_api_and_from_local_files(
    local_cluster: LocalCluster,
    custom: client.CustomObjectsApi,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _create(custom, namespace, "talker", running_status())
    assert _run(local_cluster, "logs", "talker", "-n", namespace) == 1
    assert "no trainer pod" in capsys.readouterr().err
    _trainer_pod(local_cluster, namespace, "talker")

    assert _run(local_cluster, "logs", "talker", "-n", namespace) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("step 1\nstep 2\n", ""), "served by the API (pods/log)"

    def unavailable(*_: object, **__: object) -> Iterator[bytes]:
        raise client.ApiException(status=502, reason="Bad Gateway")

    # An API server that cannot reach the node: the file is found next to the kubeconfig (the state dir).
    monkeypatch.setattr(kube_module.Kube, "stream_log", unavailable)
    monkeypatch.delenv("FINETUNE_CLUSTER_DIR", raising=False)
    assert _run(local_cluster, "logs", "talker", "-n", namespace, "-f") == 0
    captured = capsys.readouterr()
    assert captured.out == "step 1\nstep 2\n"
    assert "502 Bad Gateway" in captured.err and str(local_cluster.state_dir) in captured.err


def test_kubectl_finds_the_plugin_on_path(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str
) -> None:
    """``kubectl finetune`` runs the installed ``kubectl-finetune`` script, which honours $KUBECONFIG."""
    _create(custom, namespace, "viaplugin", running_status())
    res = kubectl_finetune(local_cluster, "list", "-n", namespace)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1].split()[:3] == ["viaplugin", "Running", "50%"]


@pytest.fixture(scope="session")
def inferenceservice_crd(local_cluster: LocalCluster) -> None:
    """KServe's InferenceService CRD (from the Go module proxy, cached): the API server then validates exports."""
    from finetune_devtools.kserve import ensure_inferenceservice_crd
    from finetune_localcluster.kubeconfig import install_crd

    with local_cluster.api_client() as api:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 1 MB of schema: the C loader parses it in a second
        install_crd(api, yaml.load(ensure_inferenceservice_crd().read_text(), Loader=loader))


def test_export_prints_an_inferenceservice_the_api_server_accepts_and_vllm_lines(
    local_cluster: LocalCluster,
    custom: client.CustomObjectsApi,
    namespace: str,
    inferenceservice_crd: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.cli.test_serving import COMMIT, lora_job

    manifest = lora_job()
    manifest["metadata"] = {"name": manifest["metadata"]["name"], "namespace": namespace}
    status = manifest.pop("status")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    _patch_status(custom, namespace, "sentiment-lora", status)

    assert _run(local_cluster, "export", "sentiment-lora", "-n", namespace) == 0
    exported = capsys.readouterr().out
    applied = local_cluster.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=exported)
    isvc = json.loads(applied.stdout)
    assert (isvc["kind"], isvc["metadata"]["namespace"]) == ("InferenceService", namespace)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/sentiment-lora/model"

    assert _run(local_cluster, "export", "sentiment-lora", "-n", namespace, "--format", "vllm") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"vllm serve org/base --revision {COMMIT} --enable-lora "
        "--lora-modules sentiment-lora=/mnt/pvc/models/sentiment-lora/adapter --max-lora-rank 8",
        "vllm serve /mnt/pvc/models/sentiment-lora/model --served-model-name sentiment-lora --dtype bfloat16",
    ]
    assert _run(local_cluster, "export", "sentiment-lora", "-n", namespace, "--artifact", "model") == 1
    assert "no artifact of kind model" in capsys.readouterr().err
