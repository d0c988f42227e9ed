"""`finetune-operator`: run the controller, or print the CRD it serves.

finetune-operator run [--namespace NS ...] [--operator-namespace NS] [--metrics-port 8080] [--health-port 8081]
                      [--log-format json]
finetune-operator crd
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from typing import Any

import kopf

from finetune_operator.api.job import DEFAULT_METRICS_PORT, DEFAULT_REPORT_INTERVAL_SECONDS, DEFAULT_TRAINER_IMAGE
from finetune_operator.controller.allocator import release_free_memory_periodically
from finetune_operator.controller.clients import Kube, login
from finetune_operator.controller.handlers import NoMemories, Reconciler, register
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.metrics_auth import KubernetesAuth
from finetune_operator.controller.sweep_handlers import SweepReconciler
from finetune_operator.controller.sweep_handlers import register as register_sweeps
from finetune_operator.generators.crd import render_crd
from finetune_operator.reconcile import Settings

OPERATOR_NAMESPACE_ENV = "FINETUNE_OPERATOR_NAMESPACE"
"""Where the operator's namespace comes from when the flag is not given (the chart sets it from the pod's)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the controller (kopf)")
    run.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable; default: all)"
    )
    run.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0: off)")
    run.add_argument(
        "--metrics-auth",
        choices=["none", "kubernetes"],
        default="none",
        help="kubernetes: /metrics only for bearer tokens allowed to get /metrics (TokenReview + SubjectAccessReview)",
    )
    run.add_argument("--health-port", type=int, default=8081, help="liveness/readiness /healthz port (0: off)")
    run.add_argument("--bind-address", default="0.0.0.0", help="address for the metrics and health servers")
    run.add_argument("--log-format", choices=["plain", "json"], default="plain", help="json for clusters")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE, help="image of the training pods")
    run.add_argument(
        "--trainer-metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="port the trainer serves /metrics on"
    )
    run.add_argument(
        "--operator-namespace",
        default=os.environ.get(OPERATOR_NAMESPACE_ENV) or None,
        help=f"the operator's own namespace, where jobs and sweeps are refused (default: ${OPERATOR_NAMESPACE_ENV})",
    )
    run.add_argument("--resync-seconds", type=float, default=30.0, help="how often each job is re-checked")
    run.add_argument(
        "--api-concurrency", type=int, default=32, help="connections to the API server (calls in flight at once)"
    )
    run.add_argument(
        "--max-concurrent-reconciles", type=int, default=64, help="jobs reconciled at once (the rest wait in order)"
    )
    run.add_argument(
        "--report-interval-seconds",
        type=int,
        default=DEFAULT_REPORT_INTERVAL_SECONDS,
        help="trainer progress heartbeat interval (evaluations are reported at once)",
    )
    commands.add_parser("crd", help="print the FineTuneJob CRD")
    return parser


def run(args: argparse.Namespace) -> None:
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("finetune_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # kopf logs every handler run at INFO: thousands of lines an hour per job
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings = Settings(
        trainer_image=args.trainer_image,
        trainer_metrics_port=args.trainer_metrics_port,
        report_interval_seconds=args.report_interval_seconds,
        operator_namespace=args.operator_namespace,
    )
    metrics = OperatorMetrics()
    if args.metrics_port:
        auth = KubernetesAuth(login) if args.metrics_auth == "kubernetes" else None
        metrics.serve(args.metrics_port, args.bind_address, auth)
    asyncio.run(_operate(args, settings, metrics))


async def _operate(args: argparse.Namespace, settings: Settings, metrics: OperatorMetrics) -> None:
    """kopf plus our API client, both on this event loop (the client's session binds to it)."""
    kube = Kube(pool_size=args.api_concurrency, on_response=metrics.count_request)
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(kube, settings, metrics, args.max_concurrent_reconciles, tuple(args.namespace))
    register(registry, reconciler, args.resync_seconds)
    register_sweeps(registry, SweepReconciler(kube, metrics, settings.operator_namespace), args.resync_seconds)

    @kopf.on.login(registry=registry)
    def kopf_login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        """The watches log in exactly as our client does."""
        return login(settings)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: object) -> None:
        settings.posting.enabled = False  # our own Events say what happened; kopf's would be noise
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60
        # No cap on kopf's per-object workers: with a cap, the workers of jobs whose trainers
        # report every few seconds never idle out, and new jobs queue behind them for seconds.
        settings.queueing.worker_limit = None
        # A worker holds its object's last event until it idles out. At kopf's 5 s, a burst's thousand jobs'
        # children (each ConfigMap with the whole training config) were all held at once, and the heap they
        # grew stayed: 198-205 MB with 1,120 jobs, 185-193 MB at 1 s (benchmarks/operator_scale.py).
        settings.queueing.idle_timeout = 1.0
        # What is alive now lives as long as the operator (modules, kopf's registry, our reconcilers): 65 K objects.
        # Frozen, they are left out of the cyclic collector's full collections, which walked them every time: 63-127
        # ms a collection with 500 trainers reporting, 24-64 ms frozen. Garbage first: a frozen object is never freed.
        gc.collect()
        gc.freeze()

    liveness = f"http://{args.bind_address}:{args.health_port}/healthz" if args.health_port else None
    trimmer = asyncio.create_task(release_free_memory_periodically(), name="malloc-trim")
    try:
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=liveness,
            memories=NoMemories(),
        )
    finally:
        trimmer.cancel()
        await kube.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(render_crd())
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
