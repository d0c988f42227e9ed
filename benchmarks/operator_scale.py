"""Operator scale benchmark on the local control plane (prints figures; asserts nothing).

    .venv/bin/python benchmarks/operator_scale.py [--jobs 1000] [--in-flight 500] [--sequential 20]
        [--policies chart|none|both] [--profile] [--tracemalloc] [--without-escalation-checks] [--api-floor]

With the operator (kopf), the control plane and this load generator sharing the machine:
1. create -> Job created latency (p50/p99), one FineTuneJob at a time;
2. a burst: ``--jobs`` FineTuneJobs created as fast as the client can; the time until all have
   their Job, and the create -> Job latency across the burst (a queue forms: the worst case);
3. in flight: ``--in-flight`` of those jobs report progress every ``--report-interval`` seconds,
   as trainers do, while new jobs arrive at ``--arrival-rate`` per second; their create -> Job
   latency (p50/p99) is the operator's latency under that load; the three slowest, each with its
   timeline (the create answered, each child created as the operator's log says, the Job seen);
4. the operator's resident memory (RSS), and the API requests it made per job.
Beside the wall-clock figures, each phase prints the CPU seconds the operator (and the API server,
etcd and this load generator) spent in it, per job or per progress report: those do not inflate when
other work shares the machine, so they compare runs on a loaded machine where the latencies do not;
and how busy the whole machine was (near 100%, a latency is mostly queueing for a core).
As deployed, the API server runs every admission policy the chart ships (``chart_api_objects``:
the trainer-status policy checks each progress report, the advice policy each create);
``--policies none`` runs without them, ``--policies both`` runs twice (fresh control planes) and
prints both. ``--profile`` samples the running operator with py-spy through phases 2 and 3 and
prints where its CPU went by stage (observe, decide, serialise, API calls, metrics, logging, kopf).
``--without-escalation-checks`` (an experiment, never a deployment) also grants the operator ``escalate``
and ``bind`` on Roles, which the API server's RBAC then trusts instead of checking that the operator holds
every right a per-job Role or RoleBinding grants: that check reads the ClusterRoleBindings with a consistent
LIST from the watch cache, which waits for etcd's next progress notification (requested every 100 ms), so
each of the two creates costs at least 100 ms, in sequence, on every job's way to its Job. With ``escalate``
and ``bind`` the operator could grant itself anything, so the figures show the bound, not a setting to ship.
``--api-floor`` runs only phase 2's burst, on a control plane of its own with no operator: the writes the operator
makes for each job (its children as it renders them, its first status, its Event) made directly, with its client and
its token. What that takes, and the API server's CPU for it, no operator can beat on this machine.
``--tracemalloc`` runs the operator under tracemalloc (``traced_operator.py``: slower, so its
latencies are not the operator's) and prints what it holds per job, by holder (our caches, kopf's
per-object memories, metric series), by file and by allocating call, with every job there and
after every job is deleted (the ghost check: what a deleted job left behind).
As deployed, the operator runs with the chart's log format (json) and resync period (30 s), with only the
packages its image installs (``deployed_operator.py`` hides the
rest of the dev venv: kopf would import the tests' kubernetes client, 46 MB), with the Helm chart's ClusterRole
and a ServiceAccount token, and
each simulated trainer with its job's own ServiceAccount token (the API server's fairness and
authorisation then treat them as in a cluster, not as one administrator).
Jobs are created suspended so that no trainer pods start (the node would run 1000 processes);
the operator's work for them (ConfigMap, ServiceAccount, Role, RoleBinding, Job, status,
events) is the same as for a running job.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import yaml
from deployed_operator import modules_the_image_lacks
from kubernetes import client, watch
from prometheus_client.parser import text_string_to_metric_families

from finetune_localcluster.cluster import Cluster, free_port
from finetune_localcluster.kubeconfig import api_client, install_objects, service_account_kubeconfig
from finetune_operator.api.job import GROUP, PLURAL, VERSION, FineTuneJobStatus, read_stored
from finetune_operator.controller.clients import ApiError, Kube
from finetune_operator.generators.crd import chart_api_objects
from finetune_operator.generators.rbac import cluster_role
from finetune_operator.reconcile import Observed, decide, desired_children
from finetune_operator.reconcile.children import Names, Settings
from finetune_operator.reconcile.observe import observe_job, status_patch


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


def _watch_jobs(kubeconfig: str, namespace: str, seen: multiprocessing.Queue[tuple[str, float]]) -> None:
    """Put (job, monotonic time) on ``seen`` for every trainer Job event, until killed. Each watch resumes where
    the last one ended: one begun afresh (every 5 s, as it was) first sent every Job there is again, a thousand
    decoded into models while the new Jobs' events waited behind them (they were seen up to 1.2 s late)."""
    with api_client(Path(kubeconfig)) as api:
        batch = client.BatchV1Api(api)
        version: str | None = batch.list_namespaced_job(namespace, limit=1).metadata.resource_version
        seen.put(("", time.monotonic()))  # ready: imported and connected
        while True:
            stream = watch.Watch().stream(
                batch.list_namespaced_job,
                namespace,
                label_selector="finetune.dev/job",
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=60,
                deserialize=False,
            )
            for event in stream:
                if event["type"] == "ERROR":  # 410: too far behind to resume; every Job is sent again
                    version = None
                    break
                metadata = event["object"]["metadata"]
                version = metadata["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    seen.put((metadata["labels"]["finetune.dev/job"], time.monotonic()))


class JobWatcher:
    """Records when each trainer Job first appears: a watch, so polling does not skew the figures, in a process
    of its own: in this one it shared the interpreter lock with the simulated trainers and the creates
    (CLOCK_MONOTONIC is the same in both processes)."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self._seen: dict[str, float] = {}
        context = multiprocessing.get_context("spawn")
        self._queue: multiprocessing.Queue[tuple[str, float]] = context.Queue()
        self._process = context.Process(target=_watch_jobs, args=(str(kubeconfig), namespace, self._queue), daemon=True)
        self._process.start()
        self.pid = self._process.pid
        if not self.wait([""], 120):
            raise RuntimeError("the Job watcher did not start")

    @property
    def seen(self) -> dict[str, float]:
        """When each Job was first seen, by job."""
        while True:
            try:
                name, at = self._queue.get_nowait()
            except queue.Empty:
                return self._seen
            self._seen.setdefault(name, at)

    def wait(self, names: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.seen
            if all(n in seen for n in names):
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self._process.kill()
        self._process.join()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _latency(label: str, values: list[float]) -> None:
    print(
        f"{label}: p50 {statistics.median(values) * 1000:.0f} ms, p99 {_percentile(values, 0.99) * 1000:.0f} ms"
        f" (n={len(values)})"
    )


def _operator_steps(log: Path, namespace: str, names: list[str]) -> dict[str, list[tuple[float, str]]]:
    """(monotonic time, what) of each child the operator logged creating for each job (its json log)."""
    offset = time.time() - time.monotonic()
    steps: dict[str, list[tuple[float, str]]] = {name: [] for name in names}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{") or '"created ' not in line:
            continue
        record = json.loads(line)
        kind, _, child = record["message"].removeprefix("created ").partition(f" {namespace}/")
        owner = next((name for name in names if child.startswith(f"{name}-")), None)
        if owner is not None:
            stamp = datetime.fromisoformat(record["timestamp"]).timestamp() - offset
            steps[owner].append((stamp, kind))
    return steps


def _timeline(started: float, answered: float, steps: list[tuple[float, str]], seen: float) -> str:
    """When the create was answered, each child created, and the Job seen, in ms after the create began."""
    points = [(answered, "create answered"), *sorted(steps), (seen, "Job seen")]
    return ", ".join(f"{what} {(at - started) * 1000:.0f}" for at, what in points)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _connection(kubeconfig: Path) -> kopf.ConnectionInfo:
    """The identity a kubeconfig holds (a token or a client certificate), for our own API client."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=cluster["certificate-authority"],
        token=user.get("token"),
        certificate_path=user.get("client-certificate"),
        private_key_path=user.get("client-key"),
    )


def _trainer_credentials(kubeconfig: Path, namespace: str, names: list[str]) -> dict[str, kopf.ConnectionInfo]:
    """What each job's trainer pod authenticates with: a token of the job's own ServiceAccount,
    whose Role allows only reading its FineTuneJob and patching its status."""
    admin = _connection(kubeconfig)
    with api_client(kubeconfig) as api, ThreadPoolExecutor(max_workers=16) as pool:
        core = client.CoreV1Api(api)

        def token(name: str) -> str:
            account = Names.of(name).service_account
            return str(core.create_namespaced_service_account_token(account, namespace, {"spec": {}}).status.token)

        tokens = pool.map(token, names)
        return {
            name: dataclasses.replace(admin, token=t, certificate_path=None, private_key_path=None)
            for name, t in zip(names, tokens, strict=True)
        }


def _constant(info: kopf.ConnectionInfo) -> Callable[[], kopf.ConnectionInfo]:
    return lambda: info


class TrainerFleet:
    """Progress reports from ``names``, each every ``interval`` seconds, as running trainers send
    them: a status merge patch with a fresh heartbeat, on the trainer's own connection and with
    its own ServiceAccount token. All on one event loop in a thread of this process."""

    def __init__(self, kubeconfig: Path, namespace: str, names: list[str], interval: float) -> None:
        self.sent = self.failed = 0
        self._args = (_trainer_credentials(kubeconfig, namespace, names), namespace, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        credentials, namespace, interval = self._args
        trainers = {name: Kube(_constant(info), pool_size=1) for name, info in credentials.items()}
        limit = asyncio.Semaphore(16)

        async def report(name: str, step: int) -> None:
            progress: dict[str, Any] = {"step": step, "totalSteps": 10_000, "percent": step / 100}
            progress["lastHeartbeatTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            async with limit:
                try:
                    await trainers[name].patch_status(namespace, name, {"progress": progress})
                    self.sent += 1
                except ApiError:
                    self.failed += 1

        step, pending = 0, set()
        while not self._stop.is_set():
            step += 1
            for name in trainers:  # spread each round over the interval
                due = time.monotonic() + interval / len(trainers)
                pending.add(asyncio.create_task(report(name, step)))
                pending = {t for t in pending if not t.done()}
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if self._stop.is_set():
                    break
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(kube.close() for kube in trainers.values()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used (``/proc/PID/stat``): unlike wall-clock time, not
    inflated by other work on the machine."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU since boot, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CpuMeter:
    """CPU seconds of the operator, the API server, etcd and this load generator between two calls of ``lap``,
    and how busy the whole machine was meanwhile (near 100%: the latencies are queueing for a core)."""

    def __init__(self, pids: dict[str, tuple[int | None, ...]]) -> None:
        self._pids = pids
        self._last = self._now()
        self._machine = _machine_busy()

    def _now(self) -> dict[str, float]:
        return {name: sum(_cpu_seconds(pid) for pid in pids) for name, pids in self._pids.items()}

    def lap(self, per: int, unit: str) -> str:
        now, machine = self._now(), _machine_busy()
        used = {name: now[name] - self._last[name] for name in now}
        busy = (machine[0] - self._machine[0]) / max(machine[1] - self._machine[1], 1.0)
        self._last, self._machine = now, machine
        each = ", ".join(f"{name} {used[name]:.1f} s" for name in used)
        per_unit = ", ".join(f"{name} {used[name] / max(per, 1) * 1000:.1f}" for name in used)
        return f"      CPU: {each} (machine {busy:.0%} busy); ms per {unit}: {per_unit}"


STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging", ("/logging/", "pythonjsonlogger", "kopf/_core/engines/posting", "kopf/_cogs/helpers/loggers")),
    ("metrics", ("prometheus_client/", "finetune_operator/controller/metrics.py")),
    ("serialise", ("/json/", "yaml/", "model_dump", "_serializ")),
    (
        "api calls",
        ("aiohttp/", "yarl/", "multidict/", "ssl.py", "finetune_operator/controller/clients.py", "asyncio/sslproto"),
    ),
    (
        "decide",
        (
            "finetune_operator/reconcile/status.py",
            "finetune_operator/reconcile/steer.py",
            "finetune_operator/reconcile/children.py",
            "finetune_operator/reconcile/health.py",
            "finetune_operator/reconcile/diagnosis.py",
        ),
    ),
    ("observe", ("finetune_operator/reconcile/observe.py", "finetune_operator/api/job.py", "pydantic")),
    ("operator shell", ("finetune_operator/",)),
    ("kopf", ("kopf/",)),
    ("event loop", ("asyncio/", "selectors.py")),
)
"""A sample's stage: the first of these its stack matches, from the innermost frame outwards."""


def _stage(stack: list[str]) -> str:
    for frame in reversed(stack):
        for stage, marks in STAGES:
            if any(mark in frame for mark in marks):
                return stage
    return "other"


class Profiler:
    """py-spy sampling the running operator (no change to it); ``stop`` returns samples by stage and
    the hottest functions (self time)."""

    def __init__(self, pid: int, output: Path) -> None:
        self._output = output
        spy = Path(sys.executable).with_name("py-spy")
        self._process = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--full-filenames",
                "--nolineno",
                "--rate",
                "200",
                "--nonblocking",
                "--gil",
                "--output",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, dict[str, int]]:
        """Samples by stage, by function (self time) and by our own function (inclusive time)."""
        self._process.send_signal(signal.SIGINT)
        self._process.wait(timeout=120)
        found: dict[str, dict[str, int]] = {"stage": {}, "self": {}, "ours": {}}

        def add(table: str, key: str, count: int) -> None:
            found[table][key] = found[table].get(key, 0) + count

        for line in self._output.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            add("stage", _stage(frames), int(count))
            add("self", frames[-1], int(count))
            for frame in {f.split(" (")[0] for f in frames if "finetune_operator/" in f}:
                add("ours", frame, int(count))
        return found


def _print_profile(phase: str, found: dict[str, dict[str, int]], per: int, unit: str) -> None:
    total = sum(found["stage"].values()) or 1
    print(f"      profile of {phase} ({total} samples holding the GIL, 200/s: {total / 200:.1f} CPU s):")
    for stage, count in sorted(found["stage"].items(), key=lambda item: -item[1]):
        print(f"        {stage:15} {100 * count / total:5.1f} %  {count / 200 / max(per, 1) * 1000:6.2f} ms per {unit}")
    for table, title in (("self", "hottest functions, self time"), ("ours", "the operator's functions, inclusive")):
        print(f"      {title}:")
        for frame, count in sorted(found[table].items(), key=lambda item: -item[1])[:12]:
            print(f"        {100 * count / total:5.1f} %  {frame.replace(str(Path(sys.prefix)), '')[:120]}")


def _reconciles(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "finetune_reconcile_duration_seconds_count":
                return sample.value
    return float("nan")


def _job_series(metrics_port: int, namespace: str) -> int:
    """The operator's metric series of single jobs in ``namespace`` (each job's progress, loss, ...)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        1
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("namespace") == namespace and "name" in sample.labels
    )


def _api_requests(metrics_port: int) -> dict[tuple[str, str], float]:
    """The operator's own count of its API requests, by (verb, kind)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "finetune_operator_api_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["verb"], sample.labels["kind"])
                    counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def _apiserver_histogram(
    api: client.ApiClient, family_name: str, labels: tuple[str, str]
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """One of the API server's own histograms by two of its labels: (observations, mean seconds, share over
    1 s). Cumulative since it started."""
    response = api.call_api("GET", f"{api.configuration.host}/metrics")
    sums: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(response.read().decode()):
        if family.name != family_name:
            continue
        for sample in family.samples:
            key = (sample.labels.get(labels[0], ""), sample.labels.get(labels[1], ""))
            entry = sums.setdefault(key, [0.0, 0.0, 0.0])
            if sample.name.endswith("_count"):
                entry[0] += sample.value
            elif sample.name.endswith("_sum"):
                entry[1] += sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels.get("le", "nan")) == 1.0:
                entry[2] += sample.value
    return {k: (n, total / n, 1 - within / n) for k, (n, total, within) in sums.items() if n}


def _wait_ready(health_port: int) -> None:
    """Until the operator answers its liveness probe (kopf has started)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)


class MemoryTrace:
    """Snapshots of the operator run by ``traced_operator.py``: each ``take`` signals it and waits."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pid = 0
        self._taken = 0

    def command(self, hidden: list[str]) -> list[str]:
        launcher = str(Path(__file__).with_name("traced_operator.py"))
        return [sys.executable, launcher, str(self.directory), ",".join(hidden)]

    def take(self) -> int:
        """A snapshot once the operator has worked off what it was sent (its backlog is not what it holds)."""
        deadline, used = time.monotonic() + 300, _cpu_seconds(self.pid)
        while time.monotonic() < deadline:
            time.sleep(2)
            used, before = _cpu_seconds(self.pid), used
            if used - before < 0.1:
                break
        done = self.directory / f"{self._taken}.done"
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 300
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._taken += 1
        return self._taken - 1

    def census(self, n: int) -> dict[str, Any]:
        return dict(json.loads((self.directory / f"{n}.json").read_text()))

    def snapshot(self, n: int) -> tracemalloc.Snapshot:
        return tracemalloc.Snapshot.load(str(self.directory / f"{n}.snapshot"))


def _short(frame: str) -> str:
    for mark in ("site-packages/", "/src/", "/lib/python3"):
        if mark in frame:
            return frame.split(mark, 1)[1]
    return frame


def _print_memory(trace: MemoryTrace, idle: int, full: int, after: int, jobs: int) -> None:
    """What the operator holds per job (``full`` against ``idle``) and what deleted jobs left (``after``)."""
    before, now, gone = trace.census(idle), trace.census(full), trace.census(after)
    traced = (now["traced"][0] - before["traced"][0]) / jobs
    print(
        f"   tracemalloc: {traced / 1024:.1f} KB per job traced ({now['traced'][0] / 2**20:.1f} MB with {jobs} jobs,"
        f" {before['traced'][0] / 2**20:.1f} MB with none; peak {now['traced'][1] / 2**20:.1f} MB);"
        f" after every job is deleted {(gone['traced'][0] - before['traced'][0]) / jobs:.0f} B per job"
    )
    print("   holder                                     entries   KB per job   entries after deletion")
    for holder in sorted(set(now["holders"]) | set(gone["holders"])):
        with_jobs = now["holders"].get(holder, {"len": 0, "bytes": 0})
        idle_bytes = before["holders"].get(holder, {"bytes": 0})["bytes"]
        left = gone["holders"].get(holder, {"len": 0})["len"]
        print(
            f"     {holder:40} {with_jobs['len']:8} {(with_jobs['bytes'] - idle_bytes) / jobs / 1024:10.2f}"
            f"   {left:8}{'  <- left behind' if left > before['holders'].get(holder, {'len': 0})['len'] else ''}"
        )
    types = {t: (n - before["types"].get(t, 0)) / jobs for t, n in now["types"].items()}
    print(
        "   live objects per job, by type: "
        + ", ".join(f"{t.rsplit('.', 1)[-1]} {n:.1f}" for t, n in sorted(types.items(), key=lambda i: -i[1])[:12])
    )
    snapshot_idle, snapshot_full, snapshot_gone = trace.snapshot(idle), trace.snapshot(full), trace.snapshot(after)
    print("   bytes per job by file (every job there; after deletion):")
    left_by_file = {
        str(s.traceback[0].filename): s.size_diff for s in snapshot_gone.compare_to(snapshot_idle, "filename")
    }
    for stat in snapshot_full.compare_to(snapshot_idle, "filename")[:14]:
        name = str(stat.traceback[0].filename)
        print(f"     {stat.size_diff / jobs:9.0f} B  {left_by_file.get(name, 0) / jobs:7.0f} B  {_short(name)}")
    print("   bytes per job by allocating call (innermost frames):")
    for stat in snapshot_full.compare_to(snapshot_idle, "traceback")[:12]:
        frames = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in reversed(list(stat.traceback)[-4:]))
        print(f"     {stat.size_diff / jobs:9.0f} B  {frames}")


CHART_VALUES: dict[str, Any] = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "charts" / "finetune-operator" / "values.yaml").read_text()
)
"""The operator's settings as the chart deploys it."""


def _install(api: client.ApiClient, policies: bool) -> None:
    """The CRDs, and with ``policies`` every admission policy the chart ships (as deployed)."""
    installed = [o for o in chart_api_objects() if policies or o["kind"] == "CustomResourceDefinition"]
    install_objects(api, installed)
    print(
        f"== admission policies: {'as the chart ships them' if policies else 'none'}"
        f" ({', '.join(o['metadata']['name'] for o in installed if o['kind'] == 'ValidatingAdmissionPolicy')})"
    )


def _operator_kubeconfig(args: argparse.Namespace, cluster: Cluster, state: Path) -> Path:
    """As deployed: the chart's ClusterRole, a ServiceAccount token (not admin certificates); with
    ``--without-escalation-checks`` also ``escalate`` and ``bind`` on Roles."""
    role = cluster_role()
    if args.without_escalation_checks:
        trusted = {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate", "bind"]}
        role = {**role, "rules": [*role["rules"], trusted]}
        print("== experiment: the operator may escalate and bind Roles (no RBAC escalation checks; never shipped)")
    return service_account_kubeconfig(cluster.kubeconfig, role, "finetune-system", state / "operator-kubeconfig.yaml")


def run(args: argparse.Namespace, policies: bool) -> None:
    """One whole benchmark on a fresh control plane, with or without the chart's admission policies."""
    state = Path(tempfile.mkdtemp(prefix="ftj-bench-"))
    cluster = Cluster(state)
    cluster.start(reuse=False)
    operator: subprocess.Popen[bytes] | None = None
    try:
        with api_client(cluster.kubeconfig) as api:
            _install(api, policies)
            core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
            namespace = "bench"
            core.create_namespace({"metadata": {"name": namespace}})
            log = (state / "operator.log").open("wb")
            operator_kubeconfig = _operator_kubeconfig(args, cluster, state)
            metrics_port, health_port = free_port(), free_port()
            trace = None
            if args.tracemalloc:
                trace = MemoryTrace(state / "tracemalloc")
                trace.directory.mkdir()
            # As deployed: without the dev venv's extra distributions (kopf would import the kubernetes client).
            hidden = modules_the_image_lacks()
            deployed = [sys.executable, str(Path(__file__).with_name("deployed_operator.py")), ",".join(hidden)]
            launcher = trace.command(hidden) if trace else deployed
            operator = subprocess.Popen(
                [
                    *launcher,
                    "run",
                    "--metrics-port",
                    str(metrics_port),
                    "--health-port",
                    str(health_port),
                    "--bind-address",
                    "127.0.0.1",
                    # The chart's own defaults: its log format (json) and resync period (every job's children
                    # checked against the API server every 30 s, on the same event loop as the reconciles).
                    f"--log-format={CHART_VALUES['logFormat']}",
                    f"--resync-seconds={args.resync_seconds or CHART_VALUES['resyncSeconds']}",
                ],
                env={**os.environ, "KUBECONFIG": str(operator_kubeconfig)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            _wait_ready(health_port)
            time.sleep(3)
            idle_rss = _rss_mb(operator.pid)
            if trace is not None:
                trace.pid = operator.pid
                idle_trace = trace.take()
            pids = cluster.pids()
            watcher = JobWatcher(cluster.kubeconfig, namespace)
            cpu = CpuMeter(
                {
                    "operator": (operator.pid,),
                    "apiserver": (pids.get("kube-apiserver"),),
                    "etcd": (pids.get("etcd"),),
                    "load generator": (os.getpid(), watcher.pid),
                }
            )

            answered: dict[str, float] = {}

            def create(name: str) -> float:
                started = time.monotonic()
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _manifest(name))
                answered[name] = time.monotonic()
                return started

            sequential = []
            for i in range(args.sequential):
                name = f"seq-{i}"
                started = create(name)
                watcher.wait([name], 60)
                sequential.append(watcher.seen[name] - started)
            _latency("1. create -> Job, one at a time", sequential)
            print(cpu.lap(args.sequential, "job"))

            profiler = Profiler(operator.pid, state / "profile-2.txt") if args.profile else None
            reconciles_before = _reconciles(metrics_port)
            names = [f"burst-{i}" for i in range(args.jobs)]
            begin = time.monotonic()
            with ThreadPoolExecutor(max_workers=16) as pool:
                starts = dict(zip(names, pool.map(create, names), strict=True))
            created_in = time.monotonic() - begin
            complete = watcher.wait(names, 600)
            all_done = max(watcher.seen.get(n, float("nan")) for n in names) - begin
            print(
                f"2. {args.jobs} FineTuneJobs created in {created_in:.1f} s; all have their Job after {all_done:.1f} s"
                + ("" if complete else " (INCOMPLETE)")
            )
            _latency(
                f"   create -> Job across the burst ({args.jobs / created_in:.0f} creates/s)",
                [watcher.seen[n] - starts[n] for n in names if n in watcher.seen],
            )
            time.sleep(2)  # the burst's last status writes and events
            print(cpu.lap(args.jobs, "job"))
            print(f"      reconciles per job: {(_reconciles(metrics_port) - reconciles_before) / args.jobs:.1f}")
            if profiler is not None:
                _print_profile("phase 2", profiler.stop(), args.jobs, "job")

            fleet = None
            if args.report_interval > 0:
                fleet = TrainerFleet(cluster.kubeconfig, namespace, names[: args.in_flight], args.report_interval)
                time.sleep(2 * args.report_interval)  # the reports reach a steady rate
            cpu.lap(1, "job")
            profiler = Profiler(operator.pid, state / "profile-3.txt") if args.profile else None
            sent_before, fleet_begin = fleet.sent if fleet else 0, time.monotonic()
            arrivals, arrival_starts = [f"arrival-{i}" for i in range(args.arrivals)], {}
            for name in arrivals:
                due = time.monotonic() + 1 / args.arrival_rate
                arrival_starts[name] = create(name)
                time.sleep(max(0.0, due - time.monotonic()))
            watcher.wait(arrivals, 120)
            report_rate, reports = 0.0, 0
            if fleet is not None:
                reports = fleet.sent - sent_before
                report_rate = reports / (time.monotonic() - fleet_begin)
                if fleet.failed:
                    print(f"   ({fleet.failed} progress reports were refused)")
                fleet.stop()
            _latency(
                f"3. create -> Job with {args.in_flight} jobs in flight ({report_rate:.0f} progress reports/s, "
                f"{args.arrival_rate:g} new jobs/s)",
                [watcher.seen[n] - arrival_starts[n] for n in arrivals if n in watcher.seen],
            )
            slowest = sorted(
                ((watcher.seen[n] - arrival_starts[n], n) for n in arrivals if n in watcher.seen), reverse=True
            )[:3]
            print("   slowest: " + ", ".join(f"{name} {latency * 1000:.0f} ms" for latency, name in slowest))
            steps = _operator_steps(state / "operator.log", namespace, [name for _, name in slowest])
            for _, name in slowest:
                print(
                    f"     {name}: " + _timeline(arrival_starts[name], answered[name], steps[name], watcher.seen[name])
                )
            print(cpu.lap(reports + args.arrivals, "report or new job") + f" ({reports} reports)")
            if profiler is not None:
                _print_profile("phase 3", profiler.stop(), reports + args.arrivals, "report or new job")
            time.sleep(3)
            total = args.sequential + args.jobs + args.arrivals
            all_names = [f"seq-{i}" for i in range(args.sequential)] + names + arrivals
            print(f"4. operator RSS with {total} jobs: {_rss_mb(operator.pid):.0f} MB ({idle_rss:.0f} MB with none)")
            full_trace = trace.take() if trace is not None else 0
            requests = _api_requests(metrics_port)
            print(f"   operator API requests per job: {sum(requests.values()) / total:.1f}")
            for (verb, kind), value in sorted(requests.items()):
                print(f"     {verb:6} {kind:15} {value:8.0f}")
            print("   API server latency by request (cumulative; the operator's writes and the trainers' reports):")
            kinds = {"configmaps", "serviceaccounts", "roles", "rolebindings", "jobs", "finetunejobs"}
            latency = _apiserver_histogram(api, "apiserver_request_duration_seconds", ("verb", "resource"))
            for (verb, resource), (n, mean, slow) in sorted(latency.items()):
                if resource in kinds and verb in {"POST", "PATCH", "PUT"}:
                    print(f"     {verb:6} {resource:15} {n:8.0f}  mean {mean * 1000:6.1f} ms  > 1 s: {slow:.1%}")
            # How far the API server's watch cache was behind etcd: what a consistent read (the RBAC escalation
            # check's LIST of ClusterRoleBindings) waited for, and about what a watcher's events are late by.
            print("   API server watch cache behind etcd (a consistent read's wait, cumulative):")
            waits = _apiserver_histogram(api, "apiserver_watch_cache_read_wait_seconds", ("group", "resource"))
            for (_group, resource), (n, mean, slow) in sorted(waits.items()):
                if n < 100:
                    continue  # the API server's own start-up reads
                print(f"     {resource:22} {n:8.0f}  mean {mean * 1000:6.1f} ms  > 1 s: {slow:.1%}")
            series = _job_series(metrics_port, namespace)
            deleted = time.monotonic()  # one by one: a deletecollection of a thousand times out at the API server
            with ThreadPoolExecutor(max_workers=16) as pool:
                list(
                    pool.map(
                        lambda n: custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, n),
                        all_names,
                    )
                )
            while _job_series(metrics_port, namespace) and time.monotonic() - deleted < 120:
                time.sleep(0.5)
            time.sleep(5)  # the garbage collector's deletions of the children reach the operator too
            print(
                f"5. every job deleted: {_job_series(metrics_port, namespace)} of {series} per-job metric series left"
                f" after {time.monotonic() - deleted:.0f} s; operator RSS {_rss_mb(operator.pid):.0f} MB"
            )
            if trace is not None:
                _print_memory(trace, idle_trace, full_trace, trace.take(), total)
            watcher.stop()
    finally:
        if operator is not None:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(timeout=30)
        cluster.stop()


async def _write_as_the_operator_would(admin: Kube, operator: Kube, namespace: str, names: list[str]) -> None:
    """Each FineTuneJob created (16 at a time, as phase 2's creates), then what the operator writes for it (its
    children as it renders them, its first status, its Event) made directly, 64 jobs at a time (its reconcile
    limit); the decisions come from the operator's pure core, in this process."""
    created: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    creating = asyncio.Semaphore(16)

    async def create(name: str) -> None:
        manifest = _manifest(name)
        manifest["metadata"]["namespace"] = namespace
        async with creating:
            await created.put(await admin.create(manifest))

    async def write() -> None:
        while (stored := await created.get()) is not None:
            job, trainer_job = read_stored(stored), None
            for child in desired_children(job, Settings()):
                made = await operator.create(child)
                trainer_job = made if child["kind"] == "Job" else trainer_job
            now = datetime.now(UTC)
            decision = decide(job, Observed(job=observe_job(trainer_job) if trainer_job else None), now)
            patch = status_patch(FineTuneJobStatus(), decision.status)
            await operator.patch_status(namespace, job.metadata.name, patch, stored["metadata"]["resourceVersion"])
            for event in decision.events:
                await operator.post_event(stored, event.type, event.reason, event.message, now)

    writers = [asyncio.create_task(write()) for _ in range(64)]
    await asyncio.gather(*(create(name) for name in names))
    for _ in writers:
        await created.put(None)
    await asyncio.gather(*writers)


def api_floor(args: argparse.Namespace, policies: bool) -> None:
    """Phase 2's burst with no operator logic: what the operator writes for each job, made directly with its own
    client, token and renderings, on a fresh control plane (``policies`` as ``run``) and no operator running. The
    time until every job has its Job, and the API server's CPU for it, bound any operator's burst on this machine."""
    state = Path(tempfile.mkdtemp(prefix="ftj-bench-"))
    cluster = Cluster(state)
    cluster.start(reuse=False)
    try:
        with api_client(cluster.kubeconfig) as api:
            _install(api, policies)
            namespace = "bench"
            client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
        operator_kubeconfig = _operator_kubeconfig(args, cluster, state)
        watcher = JobWatcher(cluster.kubeconfig, namespace)
        pids = cluster.pids()
        cpu = CpuMeter(
            {
                "apiserver": (pids.get("kube-apiserver"),),
                "etcd": (pids.get("etcd"),),
                "load generator": (os.getpid(), watcher.pid),
            }
        )
        names = [f"burst-{i}" for i in range(args.jobs)]

        async def burst() -> None:
            admin = Kube(_constant(_connection(cluster.kubeconfig)), pool_size=16)
            operator = Kube(_constant(_connection(operator_kubeconfig)), pool_size=32)
            try:
                await _write_as_the_operator_would(admin, operator, namespace, names)
            finally:
                await asyncio.gather(admin.close(), operator.close())

        begin = time.monotonic()
        asyncio.run(burst())
        complete = watcher.wait(names, 600)
        all_done = max(watcher.seen.get(n, float("nan")) for n in names) - begin
        print(
            f"2. with no operator: {args.jobs} FineTuneJobs and the operator's writes for each made directly;"
            f" all have their Job after {all_done:.1f} s" + ("" if complete else " (INCOMPLETE)")
        )
        time.sleep(2)  # the Job controller's status writes for the burst's Jobs
        print(cpu.lap(args.jobs, "job"))
        watcher.stop()
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="FineTuneJobs in the burst")
    parser.add_argument("--in-flight", type=int, default=500, help="jobs reporting progress in step 3")
    parser.add_argument(
        "--report-interval",
        type=float,
        default=Settings().report_interval_seconds,
        help="seconds between a trainer's reports (default: the operator's; 0: none)",
    )
    parser.add_argument("--arrival-rate", type=float, default=2.0, help="new jobs per second in step 3")
    parser.add_argument("--arrivals", type=int, default=100, help="new jobs created in step 3")
    parser.add_argument("--sequential", type=int, default=20, help="jobs created one at a time in step 1")
    parser.add_argument(
        "--policies",
        choices=("chart", "none", "both"),
        default="chart",
        help="admission policies installed: the chart's (as deployed), none, or one run of each",
    )
    parser.add_argument(
        "--resync-seconds", type=int, default=0, help="the operator's resync period (default: the chart's)"
    )
    parser.add_argument(
        "--without-escalation-checks",
        action="store_true",
        help="experiment: grant the operator escalate and bind on Roles, to measure the RBAC checks' cost",
    )
    parser.add_argument("--profile", action="store_true", help="sample the operator with py-spy in phases 2-3")
    parser.add_argument(
        "--tracemalloc", action="store_true", help="what the operator holds per job, and what deleted jobs leave"
    )
    parser.add_argument(
        "--api-floor",
        action="store_true",
        help="only phase 2's burst with no operator: its writes made directly (the API server's bound)",
    )
    args = parser.parse_args()
    for policies in {"chart": (True,), "none": (False,), "both": (True, False)}[args.policies]:
        (api_floor if args.api_floor else run)(args, policies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
