"""``finetune-dev up|down|status|logs|kubeconfig|build|helm|images|s3-up|s3-down``.

The state dir is ``$FINETUNE_CLUSTER_DIR`` or ``~/.cache/finetune-operator/cluster``;
the admin kubeconfig is always ``<state dir>/kubeconfig``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune_devtools import images, mlflow_server
from finetune_devtools.helm import ensure_helm
from finetune_devtools.kueue import Kueue
from finetune_devtools.seaweedfs import SeaweedFS
from finetune_localcluster import build
from finetune_localcluster.cluster import Cluster, ClusterError, default_state_dir
from finetune_localcluster.procs import tail


def _logs(state: Path, ns: str, pod: str, container: str | None) -> int:
    dirs = sorted((state / "pods").glob(f"{ns}_{pod}_*"), key=lambda p: p.stat().st_mtime)
    if not dirs:
        print(f"no pod {ns}/{pod} has run on the local node (looked in {state / 'pods'})", file=sys.stderr)
        return 1
    logs = sorted(dirs[-1].glob("*.log"))
    if container is None:
        if len(logs) != 1:
            names = ", ".join(p.stem for p in logs) or "none yet"
            print(f"pod {ns}/{pod} has several containers, pick one with -c ({names})", file=sys.stderr)
            return 1
        f = logs[0]
    else:
        f = dirs[-1] / f"{container}.log"
        if not f.exists():
            print(f"no log for container {container!r} in {dirs[-1]}", file=sys.stderr)
            return 1
    sys.stdout.buffer.write(f.read_bytes())
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="finetune-dev", description=__doc__)
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="default: $FINETUNE_CLUSTER_DIR or ~/.cache/finetune-operator/cluster",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster (reuses a running one)")
    up.add_argument("--gpus", type=int, default=4, help="nvidia.com/gpu capacity of each local node")
    up.add_argument("--nodes", type=int, default=1, help="local nodes to register (local-node, local-node-2, ...)")
    up.add_argument("--no-reuse", action="store_true", help="fail if a cluster already runs")
    down = sub.add_parser("down", help="stop every component and pod process")
    down.add_argument("--purge", action="store_true", help="also delete etcd data, pods, volumes and logs")
    sub.add_parser("status", help="show each component; exit 1 unless all healthy")
    lg = sub.add_parser("logs", help="print a pod's container log")
    lg.add_argument("namespace")
    lg.add_argument("pod")
    lg.add_argument("-c", "--container")
    sub.add_parser("kubeconfig", help="print the admin kubeconfig path")
    sub.add_parser("build", help="build (or find cached) binaries and print their directory")
    sub.add_parser("helm", help="build (or find cached) helm and print its path")
    sub.add_parser("kueue-up", help="install Kueue's CRDs and start its manager against the running cluster")
    sub.add_parser("kueue-down", help="stop Kueue's manager (its CRDs and queues stay)")
    sub.add_parser("mlflow-up", help="start an MLflow tracking server (SQLite) in STATE/mlflow; print its URI last")
    sub.add_parser("mlflow-down", help="stop the MLflow tracking server of mlflow-up (its data stays)")
    sub.add_parser("s3-up", help="start the S3 server (SeaweedFS, authentication on); prints S3_ENDPOINT and keys")
    sub.add_parser("s3-down", help="stop the S3 server (its data stays in <state dir>/s3)")
    im = sub.add_parser(
        "images", help="build (or find) the operator and trainer images with podman; print refs and sizes"
    )
    im.add_argument(
        "targets",
        nargs="*",
        choices=["operator", "trainer"],
        help="default: both (trainer builds its dependency image first)",
    )
    a = p.parse_args(argv)
    state = (a.state_dir or default_state_dir()).resolve()
    try:
        if a.cmd == "up":
            c = Cluster(state, gpus=a.gpus, nodes=a.nodes).start(reuse=not a.no_reuse)
            print(f"export KUBECONFIG={c.kubeconfig}")
        elif a.cmd == "down":
            Kueue(state).down()  # it would only retry against a stopped API server
            Cluster(state).stop(purge=a.purge)
        elif a.cmd == "status":
            c = Cluster(state)
            st = c.status()
            info = c.info()
            for comp, s in st.items():
                print(f"{comp:24} {s}")
            if info:
                print(f"{'server':24} {info.get('server')}")
                print(f"{'kubeconfig':24} {c.kubeconfig}")
            if not all(s.startswith("healthy") for s in st.values()):
                for comp, s in st.items():
                    if s == "not running" and c.log(comp).exists() and any(v != "not running" for v in st.values()):
                        print(f"--- {comp} is down; last lines of {c.log(comp)}:", file=sys.stderr)
                        print(tail(c.log(comp)), file=sys.stderr)
                sys.exit(1)
        elif a.cmd == "logs":
            sys.exit(_logs(state, a.namespace, a.pod, a.container))
        elif a.cmd == "kubeconfig":
            print(state / "kubeconfig")
        elif a.cmd == "build":
            b = build.ensure()
            print(b.dir)
            print(json.dumps(b.build_info, indent=2))
        elif a.cmd == "helm":
            print(ensure_helm())
        elif a.cmd == "kueue-up":
            if not Cluster(state).is_running():
                raise ClusterError(f"no local cluster runs in {state}: start one first (make cluster-up)")
            kueue = Kueue(state)
            kueue.up()
            print(f"kueue {kueue.version} running; log: {kueue.log}")
        elif a.cmd == "kueue-down":
            print("kueue stopped" if Kueue(state).down() else "kueue was not running")
        elif a.cmd == "mlflow-up":
            print(f"MLFLOW_TRACKING_URI={mlflow_server.up(state / 'mlflow')}")
        elif a.cmd == "mlflow-down":
            mlflow_server.down(state / "mlflow")
        elif a.cmd == "s3-up":
            server = SeaweedFS(state / "s3")
            endpoint = server.up()
            print(f"# SeaweedFS S3 running; log: {server.log}; stop with make s3-down", file=sys.stderr)
            print(endpoint.shell(), end="")
        elif a.cmd == "s3-down":
            print("s3 stopped" if SeaweedFS(state / "s3").down() else "s3 was not running")
        elif a.cmd == "images":
            images.main(tuple(a.targets) or ("operator", "trainer"))
    except (ClusterError, build.BuildError, mlflow_server.MlflowServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
