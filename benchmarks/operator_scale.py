"""Operator scale benchmark on the local control plane (prints figures; asserts nothing).

    .venv/bin/python benchmarks/operator_scale.py [--jobs 1000] [--in-flight 500] [--sequential 20]

Measures, with the operator (kopf) and the control plane sharing this machine:
- create -> Job created latency (p50/p99), one job at a time;
- the same latency while `--in-flight` FineTuneJobs are created at once;
- the time until `--jobs` FineTuneJobs all have their Job;
- the operator's resident memory (RSS) with that many jobs.
Jobs are created suspended so that no trainer pods start (the node would run 1000 processes);
the operator's work — ConfigMap, ServiceAccount, Role, RoleBinding, Job, status — is the same.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from finetune_localcluster.cluster import Cluster, free_port
from finetune_localcluster.kubeconfig import api_client
from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.crd import build_crd


def _manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "file:///models/minilm", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "file:///data/rt"},
            "output": {"location": f"file:///out/{name}"},
            "suspend": True,
        },
    }


class JobWatcher:
    """Records when each trainer Job first appears (a watch, so polling does not skew the figures)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self._api, self._namespace = api, namespace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        batch = client.BatchV1Api(self._api)
        while not self._stop.is_set():
            stream = watch.Watch().stream(
                batch.list_namespaced_job, self._namespace, label_selector="finetune.dev/job", timeout_seconds=5
            )
            for event in stream:
                name = event["object"].metadata.labels["finetune.dev/job"]
                self.seen.setdefault(name, time.monotonic())

    def wait(self, names: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n in self.seen for n in names):
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self._stop.set()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=500)
    parser.add_argument("--sequential", type=int, default=20)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="ftj-bench-"))
    cluster = Cluster(state)
    cluster.start(reuse=False)
    operator: subprocess.Popen[bytes] | None = None
    try:
        with api_client(cluster.kubeconfig) as api:
            client.ApiextensionsV1Api(api).create_custom_resource_definition(build_crd())
            time.sleep(2)
            core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
            namespace = "bench"
            core.create_namespace({"metadata": {"name": namespace}})
            log = (state / "operator.log").open("wb")
            operator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "finetune_operator.cli",
                    "run",
                    "--metrics-port",
                    str(free_port()),
                    "--health-port",
                    str(free_port()),
                    "--bind-address",
                    "127.0.0.1",
                    "--resync-seconds",
                    "600",
                ],
                env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            time.sleep(3)
            watcher = JobWatcher(api, namespace)

            def create(name: str) -> float:
                started = time.monotonic()
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _manifest(name))
                return started

            sequential = []
            for i in range(args.sequential):
                name = f"seq-{i}"
                started = create(name)
                watcher.wait([name], 60)
                sequential.append(watcher.seen[name] - started)
            print(
                f"create -> Job, one at a time ({args.sequential} jobs): "
                f"p50 {statistics.median(sequential) * 1000:.0f} ms, p99 {_percentile(sequential, 0.99) * 1000:.0f} ms"
            )

            names = [f"burst-{i}" for i in range(args.jobs)]
            begin = time.monotonic()
            with ThreadPoolExecutor(max_workers=16) as pool:
                starts = dict(zip(names, pool.map(create, names), strict=True))
            created_in = time.monotonic() - begin
            complete = watcher.wait(names, 600)
            all_done = max(watcher.seen.get(n, float("nan")) for n in names) - begin
            burst = [watcher.seen[n] - starts[n] for n in names[: args.in_flight] if n in watcher.seen]
            print(
                f"create -> Job with {args.in_flight} in flight: p50 {statistics.median(burst) * 1000:.0f} ms, "
                f"p99 {_percentile(burst, 0.99) * 1000:.0f} ms"
            )
            print(
                f"{args.jobs} FineTuneJobs created in {created_in:.1f} s; all have their Job after {all_done:.1f} s"
                + ("" if complete else " (INCOMPLETE)")
            )
            time.sleep(5)
            print(f"operator RSS with {args.jobs + args.sequential} jobs: {_rss_mb(operator.pid):.0f} MB")
            watcher.stop()
    finally:
        if operator is not None:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(timeout=30)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
