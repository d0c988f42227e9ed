"""Kubernetes I/O for the plugin: connect like kubectl, read and annotate FineTuneJobs, fetch logs.

Plain dicts in and out (the API server's JSON). The only non-API path is the local-cluster
log fallback at the bottom of this module.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_operator.api.sweep import SWEEP_LABEL, SWEEP_PLURAL
from finetune_operator.reconcile.children import JOB_LABEL, job_label_value

Manifest = dict[str, Any]
TRAINER_CONTAINER = "trainer"


class JobNotFoundError(Exception):
    """The FineTuneJob (or its pod) does not exist."""


@dataclass
class Kube:
    """An API client plus the namespace commands default to (the context's, like kubectl)."""

    api: client.ApiClient
    namespace: str
    kubeconfig: Path | None

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None) -> Kube:
        """Load credentials as kubectl does: --kubeconfig, else $KUBECONFIG, else ~/.kube/config."""
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        if namespace is None:
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), active) if context else active
            namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
        return cls(client.ApiClient(cfg), namespace, _kubeconfig_path(kubeconfig))

    def close(self) -> None:
        self.api.close()

    @property
    def _custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def _core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def get_job(self, name: str, namespace: str) -> Manifest:
        return self._get(PLURAL, name, namespace)

    def get_sweep(self, name: str, namespace: str) -> Manifest:
        return self._get(SWEEP_PLURAL, name, namespace)

    def _get(self, plural: str, name: str, namespace: str) -> Manifest:
        try:
            response = self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _preload_content=False
            )
        except ApiException as error:
            if error.status == 404:
                raise JobNotFoundError(f'{plural}.{GROUP} "{name}" not found in namespace "{namespace}"') from None
            raise
        return cast(Manifest, json.loads(response.data))

    def list_jobs(self, namespace: str | None) -> list[Manifest]:
        """Jobs of one namespace, or of all when ``namespace`` is None."""
        return self._list(PLURAL, namespace, None)

    def list_sweeps(self, namespace: str | None) -> list[Manifest]:
        return self._list(SWEEP_PLURAL, namespace, None)

    def sweep_trials(self, sweep: str, namespace: str) -> list[Manifest]:
        """The sweep's trial FineTuneJobs (``kubectl get ftj -l finetune.dev/sweep=NAME``)."""
        return self._list(PLURAL, namespace, f"{SWEEP_LABEL}={sweep}")

    def _list(self, plural: str, namespace: str | None, label_selector: str | None) -> list[Manifest]:
        selector = {"label_selector": label_selector} if label_selector else {}
        if namespace is None:
            response = self._custom.list_cluster_custom_object(
                GROUP, VERSION, plural, _preload_content=False, **selector
            )
        else:
            response = self._custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, _preload_content=False, **selector
            )
        items = cast(list[Manifest], json.loads(response.data)["items"])
        return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def events(self, kind: str, name: str, namespace: str) -> list[Manifest]:
        """Core events about one object (what ``kubectl describe`` shows at the bottom)."""
        response = self._core.list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.kind={kind},involvedObject.name={name}",
            _preload_content=False,
        )
        return cast(list[Manifest], json.loads(response.data)["items"])

    def annotate(self, name: str, namespace: str, annotations: dict[str, str]) -> None:
        self._custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"metadata": {"annotations": annotations}},
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )

    def trainer_pods(self, job: str, namespace: str) -> list[Manifest]:
        """The job's trainer pods, oldest first (a retried Job leaves earlier pods behind)."""
        response = self._core.list_namespaced_pod(
            namespace, label_selector=f"{JOB_LABEL}={job_label_value(job)}", _preload_content=False
        )
        items = cast(list[Manifest], json.loads(response.data)["items"])
        return sorted(items, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))

    def pod_active(self, pod: str, namespace: str) -> bool:
        """Whether a pod may still write log lines (exists and is Pending or Running)."""
        try:
            response = self._core.read_namespaced_pod(pod, namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return json.loads(response.data).get("status", {}).get("phase") in ("Pending", "Running")

    def stream_log(self, pod: str, namespace: str, container: str, follow: bool) -> Iterator[bytes]:
        """The container log through the API server (pods/log), chunk by chunk."""
        response = self._core.read_namespaced_pod_log(
            pod, namespace, container=container, follow=follow, _preload_content=False
        )
        raw = getattr(response, "response", response)  # RESTResponse wraps the urllib3 response
        try:
            yield from raw.stream(4096, decode_content=True)
        finally:
            raw.release_conn()


def _kubeconfig_path(explicit: str | None) -> Path | None:
    """The kubeconfig file in use (the first one when $KUBECONFIG lists several)."""
    value = explicit or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "~/.kube/config"
    path = Path(value).expanduser()
    return path if path.exists() else None


# --- local cluster log fallback ------------------------------------------------------------
# The dev cluster (finetune_localcluster) runs pods as local processes and writes each
# container's output to <state dir>/pods/<ns>_<pod>_<uid>/<container>.log. When its API server
# cannot serve pods/log (older dev clusters, or the node agent is gone), `logs` reads that
# file instead. Nothing else in the plugin knows about the local cluster.


def local_state_dirs(kubeconfig: Path | None) -> list[Path]:
    """Where a local cluster may keep its state: $FINETUNE_CLUSTER_DIR, the kubeconfig's
    directory (the dev cluster writes <state dir>/kubeconfig), then the default."""
    candidates = [
        os.environ.get("FINETUNE_CLUSTER_DIR"),
        str(kubeconfig.resolve().parent) if kubeconfig is not None else None,
        "~/.cache/finetune-operator/cluster",
    ]
    dirs: list[Path] = []
    for value in candidates:
        if value:
            path = Path(value).expanduser()
            if (path / "pods").is_dir() and path not in dirs:
                dirs.append(path)
    return dirs


def local_log_file(state_dirs: list[Path], namespace: str, pod: str, container: str) -> Path | None:
    """The newest log file of ``container`` of ``namespace/pod`` in any of the state dirs."""
    found = [f for d in state_dirs for f in (d / "pods").glob(f"{namespace}_{pod}_*/{container}.log")]
    return max(found, key=lambda f: f.stat().st_mtime) if found else None


def copy_file(path: Path, out: IO[bytes], follow: bool, active: Callable[[], bool], interval: float = 0.5) -> None:
    """Write the file to ``out``; with ``follow``, keep tailing it while ``active()`` says the pod runs."""
    with path.open("rb") as f:
        while True:
            running = follow and active()
            out.write(f.read())
            out.flush()
            if not running:
                return
            time.sleep(interval)
