"""Fault injection on a control plane of its own (prints figures; asserts nothing).

    .venv/bin/python benchmarks/chaos.py [--jobs 100] [--operator-kills 10] [--apiserver-restarts 2]
                                          [--etcd-restarts 1] [--trainer-seconds 90] [--resync 5]

``--jobs`` FineTuneJobs run scripted trainers (tests/e2e/fake_trainer.py ``quick``: a report every
5 s, then a clean exit) while the operator is SIGKILLed (and restarted) ``--operator-kills`` times
at random moments, the kube-apiserver is restarted ``--apiserver-restarts`` times and etcd
``--etcd-restarts`` times. Reported:

- jobs lost: not Complete at the end;
- duplicate children: a FineTuneJob that ever had two different trainer Jobs (a re-run);
- jobs not converged within two resyncs of the last fault: their status did not reflect their Job;
- the time to converge after each fault: until every FineTuneJob's status agrees with its Job
  (Job complete <=> Complete=True, a ready pod <=> Running=True).

``run`` is also what tests/e2e/test_chaos.py calls, with a few jobs and faults.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch

from finetune_localcluster.cluster import Cluster, free_port
from finetune_localcluster.kubeconfig import api_client, install_crd, service_account_kubeconfig
from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_operator.generators.crd import build_crd
from finetune_operator.generators.rbac import cluster_role

FAKE_TRAINER = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "fake_trainer.py"
NAMESPACE = "chaos"
IMAGE = "finetune-test/quick"


@dataclass
class Report:
    jobs: int
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    not_converged: list[str] = field(default_factory=list)
    convergence: list[tuple[str, float | None]] = field(default_factory=list)
    """(fault, seconds until every status agreed with its Job; None: not within the limit)."""
    total_seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"jobs: {self.jobs}   lost: {len(self.lost)}   duplicate Jobs: {len(self.duplicates)}   "
            f"not converged within two resyncs: {len(self.not_converged)}   run: {self.total_seconds:.0f} s",
            *(f"  lost: {name}" for name in self.lost),
            *(f"  duplicated: {name}" for name in self.duplicates),
            *(f"  not converged: {name}" for name in self.not_converged),
        ]
        for fault, seconds in self.convergence:
            out.append(f"  {fault:<28} converged in {'-' if seconds is None else f'{seconds:.1f} s'}")
        return out


class _Operator:
    """`finetune-operator run` with the chart's permissions; SIGKILL and restart at will."""

    def __init__(self, kubeconfig: Path, log: Path, resync: float) -> None:
        self.kubeconfig, self.log, self.resync = kubeconfig, log, resync
        self.health_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "finetune_operator.controller.cli",
                    "run",
                    "--metrics-port",
                    "0",
                    "--health-port",
                    str(self.health_port),
                    "--bind-address",
                    "127.0.0.1",
                    "--resync-seconds",
                    str(self.resync),
                ],
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"operator never became healthy; see {self.log}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)


class _JobWatch:
    """Every trainer Job uid each FineTuneJob ever had (a second one is a duplicate run)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.uids: dict[str, set[str]] = defaultdict(set)
        self._api = api
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        batch = client.BatchV1Api(self._api)
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    batch.list_namespaced_job, NAMESPACE, label_selector="finetune.dev/job", timeout_seconds=5
                ):
                    job = event["object"]
                    owners = [o for o in job.metadata.owner_references or [] if o.controller]
                    if owners:
                        self.uids[owners[0].name].add(job.metadata.uid)
            except Exception:  # the API server is being restarted: watch again
                time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()


def _manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "file:///models/none", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "file:///data/none"},
            "output": {"location": f"file:///tmp/chaos/{name}"},
            "resources": {"image": f"{IMAGE}:1", "gpusPerNode": 0},
            "stopGracePeriodSeconds": 5,
        },
    }


def _true(body: dict[str, Any], type_: str) -> bool:
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c["type"] == type_ and c["status"] == "True" for c in conditions)


def disagreements(api: client.ApiClient) -> list[str] | None:
    """FineTuneJobs whose status does not reflect their Job (None: the API server did not answer)."""
    try:
        custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
        ftjs = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
        trainers = {j.metadata.name: j for j in batch.list_namespaced_job(NAMESPACE).items}
    except Exception:
        return None
    wrong = []
    for body in ftjs:
        name = body["metadata"]["name"]
        job = trainers.get(f"{name}-trainer")
        complete = job is not None and any(
            c.type == "Complete" and c.status == "True" for c in job.status.conditions or []
        )
        running = job is not None and not complete and (job.status.ready or 0) > 0
        if (_true(body, "Complete") != complete and not (job is None and _true(body, "Complete"))) or (
            running != _true(body, "Running") and not complete
        ):
            wrong.append(name)
    return wrong


def _converge(api: client.ApiClient, limit: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if disagreements(api) == []:
            return time.monotonic() - started
        time.sleep(0.5)
    return None


def run(
    state_dir: Path,
    jobs: int = 100,
    operator_kills: int = 10,
    apiserver_restarts: int = 2,
    etcd_restarts: int = 1,
    trainer_seconds: float = 90.0,
    resync: float = 5.0,
    seed: int = 12,
    say: Callable[[str], None] = print,
) -> Report:
    """Start a control plane in ``state_dir``, run the jobs through the faults, stop it all."""
    rng = random.Random(seed)
    image_map = state_dir / "image-map.yaml"
    state_dir.mkdir(parents=True, exist_ok=True)
    entrypoint = [sys.executable, str(FAKE_TRAINER), "quick", str(trainer_seconds)]
    image_map.write_text(yaml.safe_dump([{"match": rf"{IMAGE}(:|$)", "entrypoint": entrypoint}]))
    cluster = Cluster(state_dir / "cluster", quiet=True)
    previous = os.environ.get("FINETUNE_IMAGE_MAP")
    os.environ["FINETUNE_IMAGE_MAP"] = str(image_map)  # read by this cluster's node agent only
    try:
        cluster.start(reuse=False)
    finally:
        if previous is None:
            os.environ.pop("FINETUNE_IMAGE_MAP", None)
        else:
            os.environ["FINETUNE_IMAGE_MAP"] = previous
    report = Report(jobs=jobs)
    operator: _Operator | None = None
    started = time.monotonic()
    try:
        with api_client(cluster.kubeconfig) as api:
            install_crd(api, build_crd())
            client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
            kubeconfig = service_account_kubeconfig(
                cluster.kubeconfig, cluster_role(), "finetune-system", state_dir / "operator-kubeconfig.yaml"
            )
            operator = _Operator(kubeconfig, state_dir / "operator.log", resync)
            operator.start()
            watcher = _JobWatch(api)
            custom = client.CustomObjectsApi(api)
            names = [f"chaos-{i:03d}" for i in range(jobs)]
            for name in names:
                custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _manifest(name))
            say(f"created {jobs} jobs")

            faults = (
                ["operator SIGKILL"] * operator_kills
                + ["kube-apiserver restart"] * apiserver_restarts
                + ["etcd restart"] * etcd_restarts
            )
            rng.shuffle(faults)
            limit = 2 * resync + 10
            for number, fault in enumerate(faults, 1):
                time.sleep(rng.uniform(0.5, 3.0))
                if fault == "operator SIGKILL":
                    operator.kill()
                    time.sleep(rng.uniform(0.2, 2.0))
                    operator.start()
                elif fault == "kube-apiserver restart":
                    cluster.restart("kube-apiserver", kill=True, down_seconds=1.0)
                else:
                    cluster.restart("etcd", down_seconds=1.0)
                seconds = _converge(api, limit)
                report.convergence.append((f"{number:2d}. {fault}", seconds))
                say(f"{number:2d}. {fault}: converged in {'-' if seconds is None else f'{seconds:.1f} s'}")

            time.sleep(2 * resync)  # two resyncs after the last fault
            report.not_converged = sorted(disagreements(api) or [])
            deadline = time.monotonic() + trainer_seconds + 120
            while time.monotonic() < deadline:
                bodies = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
                if all(_true(b, "Complete") for b in bodies):
                    break
                time.sleep(1)
            bodies = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
            trainers = {j.metadata.name: j for j in client.BatchV1Api(api).list_namespaced_job(NAMESPACE).items}
            for body in sorted(bodies, key=lambda b: str(b["metadata"]["name"])):
                if not _true(body, "Complete"):
                    name, status = body["metadata"]["name"], body.get("status") or {}
                    trainer = trainers.get(f"{name}-trainer")
                    report.lost.append(
                        f"{name} (phase {status.get('phase')}: {status.get('message')}; "
                        f"Job: {trainer.status.to_dict() if trainer is not None else 'none'})"
                    )
            report.lost += sorted(set(names) - {b["metadata"]["name"] for b in bodies})
            watcher.stop()
            report.duplicates = sorted(name for name, uids in watcher.uids.items() if len(uids) > 1)
    finally:
        if operator is not None:
            operator.kill(signal.SIGTERM)
        cluster.stop(purge=not report.lost, quiet=True)  # a loss keeps its evidence
        if report.lost:
            say(f"kept the cluster's state for a look: {state_dir}")
    report.total_seconds = time.monotonic() - started
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--operator-kills", type=int, default=10)
    parser.add_argument("--apiserver-restarts", type=int, default=2)
    parser.add_argument("--etcd-restarts", type=int, default=1)
    parser.add_argument("--trainer-seconds", type=float, default=90.0, help="how long each scripted trainer runs")
    parser.add_argument("--resync", type=float, default=5.0, help="the operator's --resync-seconds")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    report = run(
        Path(tempfile.mkdtemp(prefix="ftj-chaos-")),
        jobs=args.jobs,
        operator_kills=args.operator_kills,
        apiserver_restarts=args.apiserver_restarts,
        etcd_restarts=args.etcd_restarts,
        trainer_seconds=args.trainer_seconds,
        resync=args.resync,
        seed=args.seed,
    )
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
