"""``kubectl finetune``: the commands. Thin: read through ``kube``, render through ``render``/``plot``.

Everything rendered from an object goes through ``printable`` before it is printed: status and
Events hold text a trainer wrote, and a terminal would act on its escape sequences. ``-o json|yaml``
escape control characters themselves; ``logs`` prints the log as stored, like ``kubectl logs``.

Exit codes: 0 success; 1 error (and, for ``watch``, a Failed job); 2 no such FineTuneJob or FineTuneSweep
(argparse also uses 2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from kubernetes.client.rest import ApiException
from kubernetes.config import ConfigException
from urllib3.exceptions import HTTPError

from finetune_cli import kube as k
from finetune_cli import sweeps
from finetune_cli.render import describe, final_line, list_table, outcome, parse_job, progress_line
from finetune_cli.serving import ExportError, serving
from finetune_operator.api.job import ARTIFACT_KINDS, STOP_ANNOTATION
from finetune_operator.api.sweep import SWEEP_KIND
from finetune_operator.reconcile.redact import printable
from finetune_trainer.advice import advise
from finetune_trainer.config import RuntimeEnv, load_spec, local_path, resources_of
from finetune_trainer.errors import TrainerError
from finetune_trainer.memory_plan import GIB, Gpus, plan, print_memory_plan, read_config
from finetune_trainer.spec import TrainingSpec

EXIT_FAILED = 1
EXIT_NOT_FOUND = 2


def _now() -> datetime:
    return datetime.now(UTC)


def cmd_list(kube: k.Kube, args: argparse.Namespace) -> int:
    namespace = None if args.all_namespaces else _namespace(kube, args)
    jobs = [parse_job(o) for o in _listed(kube.list_jobs(namespace), namespace, args.output)]
    if jobs and args.output == "name":
        print("\n".join(f"finetunejob.finetune.dev/{j.name}" for j in jobs))
    elif jobs:
        print(printable(list_table(jobs, _now(), all_namespaces=namespace is None)))
    return 0


def _listed(items: list[k.Manifest], namespace: str | None, output: str | None) -> list[k.Manifest]:
    """What a list command shows as a table: none when it printed them as JSON/YAML, or said there are none."""
    if output in ("json", "yaml"):
        _dump({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}}, output)
        return []
    if not items:
        where = "" if namespace is None else f" in {namespace} namespace"
        print(f"No resources found{where}.", file=sys.stderr)
    return items


def cmd_describe(kube: k.Kube, args: argparse.Namespace) -> int:
    obj = kube.get_job(args.name, _namespace(kube, args))
    if args.output in ("json", "yaml"):
        _dump(obj, args.output)
    else:
        sys.stdout.write(printable(describe(parse_job(obj), _now())))
    return 0


def cmd_export(kube: k.Kube, args: argparse.Namespace) -> int:
    """Serving config for what the job published: KServe InferenceService YAML and vLLM command lines."""
    job = parse_job(kube.get_job(args.name, _namespace(kube, args)))
    try:
        config = serving(job.name, job.namespace, job.spec, job.status.artifacts, set(args.artifact or ()) or None)
    except ExportError as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return EXIT_FAILED
    if args.format == "vllm":
        text = "".join(f"{line}\n" for line in (*config.prepare, *config.vllm))
    else:
        text = config.yaml(comments=args.format == "all")
    sys.stdout.write(printable(text))
    return 0


def cmd_watch(kube: k.Kube, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Poll the job and redraw one progress line until a Complete or Failed condition appears."""
    out = out or sys.stdout
    tty = out.isatty()
    namespace = _namespace(kube, args)
    last = None
    while True:
        try:
            job = parse_job(kube.get_job(args.name, namespace))
        except k.JobNotFoundError:
            if tty and last is not None:
                out.write("\n")
            raise
        except (ApiException, HTTPError) as error:  # a flaky API server must not end a long watch
            print(f"warning: {_describe_error(error)}; retrying", file=sys.stderr)
            time.sleep(args.interval)
            continue
        line = printable(progress_line(job))
        if tty:
            width = shutil.get_terminal_size().columns - 1
            out.write("\r" + line[:width] + "\x1b[K")
        elif line != last:
            out.write(line + "\n")
        out.flush()
        last = line
        done = outcome(job.status)
        if done is not None:
            out.write(("\n" if tty else "") + printable(final_line(job)) + "\n")
            out.flush()
            return 0 if done.type == "Complete" else EXIT_FAILED
        time.sleep(args.interval)


def cmd_plot(kube: k.Kube, args: argparse.Namespace) -> int:
    # matplotlib takes about a second to import: only this command pays for it.
    from finetune_cli.plot import NothingToPlotError, curves_figure, save_png  # noqa: PLC0415

    job = parse_job(kube.get_job(args.name, _namespace(kube, args)))
    try:
        fig = curves_figure(job)
    except NothingToPlotError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    path = Path(args.output or f"{job.name}-curves.png")
    save_png(fig, path)
    print(f"wrote {path} ({len(job.status.evaluations)} evaluations)")
    return 0


def cmd_logs(kube: k.Kube, args: argparse.Namespace) -> int:
    """Trainer logs through the API server; on the local dev cluster, from its log files if need be."""
    namespace = _namespace(kube, args)
    pods = kube.trainer_pods(args.name, namespace)
    if args.pod:
        pods = [p for p in pods if p["metadata"]["name"] == args.pod]
    if not pods:
        job = parse_job(kube.get_job(args.name, namespace))  # JobNotFoundError when the job itself is missing
        print(
            f"error: finetunejob {job.name} has no trainer pod (phase {job.status.phase or 'Pending'})", file=sys.stderr
        )
        return EXIT_FAILED
    pod = _pick_pod(pods)
    out = sys.stdout.buffer
    written = False
    try:
        for chunk in kube.stream_log(pod, namespace, args.container, args.follow):
            out.write(chunk)
            out.flush()
            written = True
        return 0
    except (ApiException, HTTPError) as error:
        path = k.local_log_file(k.local_state_dirs(kube.kubeconfig), namespace, pod, args.container)
        if path is None or written:  # after a partial stream, the file would repeat what was printed
            raise
        print(f"(the API server could not serve the log: {_describe_error(error)}; reading {path})", file=sys.stderr)
    k.copy_file(path, out, args.follow, lambda: kube.pod_active(pod, namespace))
    return 0


def _pick_pod(pods: list[k.Manifest]) -> str:
    """The newest trainer pod; among a multi-node job's pods of the same age, rank 0 (its logs lead)."""

    def key(pod: k.Manifest) -> tuple[str, bool]:
        meta = pod["metadata"]
        rank = meta.get("labels", {}).get("batch.kubernetes.io/job-completion-index", "0")
        return meta.get("creationTimestamp", ""), rank == "0"

    return str(max(pods, key=key)["metadata"]["name"])


def cmd_stop(kube: k.Kube, args: argparse.Namespace) -> int:
    namespace = _namespace(kube, args)
    job = parse_job(kube.get_job(args.name, namespace))
    done = outcome(job.status)
    if done is not None:
        print(printable(f"finetunejob {job.name} already finished: {done}; nothing to stop"))
        return 0
    if job.annotations.get(STOP_ANNOTATION, "").lower() == "true":
        print(f"finetunejob {job.name}: a stop was already requested; waiting for the trainer to exit")
        return 0
    kube.annotate(job.name, namespace, {STOP_ANNOTATION: "true"})
    grace = job.spec.stop_grace_period_seconds if job.spec is not None else None
    restore = job.spec is not None and job.spec.early_stopping is not None and job.spec.early_stopping.restore_best
    print(f"finetunejob.finetune.dev/{job.name} stop requested ({STOP_ANNOTATION}=true).")
    print(
        "The operator asks the trainer to save a checkpoint and exit"
        + (f"; after {grace}s it stops the workload itself" if grace is not None else "")
        + ". The job then ends Complete with reason Stopped"
        + (", keeping the best evaluation's weights." if restore else ".")
    )
    print(f"Follow it with: kubectl finetune watch {job.name} -n {namespace}")
    return 0


def cmd_sweep_list(kube: k.Kube, args: argparse.Namespace) -> int:
    namespace = None if args.all_namespaces else _namespace(kube, args)
    found = [sweeps.parse_sweep(o) for o in _listed(kube.list_sweeps(namespace), namespace, args.output)]
    if found and args.output == "name":
        print("\n".join(f"finetunesweep.finetune.dev/{s.name}" for s in found))
    elif found:
        print(printable(sweeps.list_table(found, _now(), all_namespaces=namespace is None)))
    return 0


def cmd_sweep_describe(kube: k.Kube, args: argparse.Namespace) -> int:
    namespace = _namespace(kube, args)
    obj = kube.get_sweep(args.name, namespace)
    if args.output in ("json", "yaml"):
        _dump(obj, args.output)
        return 0
    trials = kube.sweep_trials(args.name, namespace)
    events = kube.events(SWEEP_KIND, args.name, namespace)
    sys.stdout.write(printable(sweeps.describe(sweeps.parse_sweep(obj), trials, events, _now())))
    return 0


def cmd_sweep_plot(kube: k.Kube, args: argparse.Namespace) -> int:
    from finetune_cli.plot import NothingToPlotError, save_png, sweep_figure  # noqa: PLC0415

    namespace = _namespace(kube, args)
    sweep = sweeps.parse_sweep(kube.get_sweep(args.name, namespace))
    rows = sweeps.trials(sweep, kube.sweep_trials(args.name, namespace))
    try:
        fig = sweep_figure(sweep, rows)
    except NothingToPlotError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    path = Path(args.output or f"{sweep.name}-sweep.png")
    save_png(fig, path)
    scored = [t for t in rows if t.value is not None]
    print(f"wrote {path} ({len(scored)} trials with a {sweep.metric} value, {sum(t.pruned for t in scored)} pruned)")
    return 0


def cmd_sweep_dashboard(kube: k.Kube, args: argparse.Namespace) -> int:
    # Optuna and optuna-dashboard take seconds to import: only this command pays for them.
    from pydantic import ValidationError  # noqa: PLC0415

    from finetune_cli.dashboard import replay, serve  # noqa: PLC0415

    namespace = _namespace(kube, args)
    try:
        storage, trials = replay(kube.get_sweep(args.name, namespace), kube.sweep_trials(args.name, namespace))
    except ValidationError as error:
        print(f"error: finetunesweep {args.name} cannot be read by this plugin's version: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"finetunesweep {args.name}: {trials} trials replayed (a snapshot; rerun to refresh)")
    print(f"optuna-dashboard on http://{args.address}:{args.port}/ (Ctrl-C to stop)", flush=True)
    serve(storage, args.address, args.port)
    return 0


COMMANDS: dict[str, Callable[[k.Kube, argparse.Namespace], int]] = {
    "list": cmd_list,
    "describe": cmd_describe,
    "watch": cmd_watch,
    "plot": cmd_plot,
    "logs": cmd_logs,
    "stop": cmd_stop,
    "export": cmd_export,
    "sweep list": cmd_sweep_list,
    "sweep describe": cmd_sweep_describe,
    "sweep plot": cmd_sweep_plot,
    "sweep dashboard": cmd_sweep_dashboard,
}


def _namespace(kube: k.Kube, args: argparse.Namespace) -> str:
    return getattr(args, "namespace", None) or kube.namespace


def _dump(obj: Any, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(obj, indent=4))
    else:
        sys.stdout.write(yaml.safe_dump(obj, sort_keys=False))


def _describe_error(error: Exception) -> str:
    if isinstance(error, ApiException):
        try:
            message = json.loads(error.body or "{}").get("message")
        except (ValueError, AttributeError):
            message = None
        return f"{error.status} {error.reason}" + (f": {message}" if message else "")
    return f"{type(error).__name__}: {error}"


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    """kubectl's flags, accepted before or after the subcommand (SUPPRESS keeps either from erasing the other)."""
    parser.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="namespace (default: the context's)")
    parser.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context to use")
    parser.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file (default: $KUBECONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl finetune",
        description="Follow and inspect FineTuneJobs and FineTuneSweeps (finetune.dev/v1alpha1).",
        epilog="Exit codes: 0 ok, 1 error or (watch) Failed, 2 FineTuneJob or FineTuneSweep not found.",
    )
    _connection_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, named: bool = True) -> argparse.ArgumentParser:
        return _subcommand(sub, name, help, "FineTuneJob" if named else None)

    p = command("list", "table of FineTuneJobs with phase, progress and best metric", named=False)
    p.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    p.add_argument("-o", "--output", choices=("json", "yaml", "name"), help="output format")
    p = command("watch", "live progress until the job completes (exit 0) or fails (exit 1)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    p = command("describe", "spec summary, status, conditions, evaluations and why it stopped")
    p.add_argument("-o", "--output", choices=("json", "yaml"), help="print the object instead")
    p = command("plot", "PNG of the evaluation curves with the best point marked")
    p.add_argument("-o", "--output", metavar="FILE", help="PNG to write (default NAME-curves.png)")
    p = command("logs", "trainer logs (newest trainer pod)")
    p.add_argument("-f", "--follow", action="store_true", help="stream until the pod ends")
    p.add_argument("-c", "--container", default=k.TRAINER_CONTAINER, help="container (default trainer)")
    p.add_argument("--pod", help="a specific trainer pod (default: the newest)")
    command("stop", "ask the trainer to save and stop (sets the stop annotation)")
    p = command("export", "serving config for the published model: KServe InferenceService YAML, vLLM command lines")
    p.add_argument(
        "--format",
        choices=("all", "kserve", "vllm"),
        default="all",
        help="all (default): InferenceService YAML with the vLLM lines as comments; kserve; vllm (shell lines)",
    )
    p.add_argument(
        "--artifact",
        action="append",
        choices=ARTIFACT_KINDS,
        help="only artifacts of this kind (repeatable; default: every published artifact)",
    )
    _sweep_commands(sub)
    p = sub.add_parser("advise", help=ADVISE_HELP, description=ADVISE_HELP)
    p.add_argument("-f", "--filename", required=True, help="FineTuneJob manifest or TrainingSpec (YAML/JSON)")
    p.add_argument(
        "--no-layer-map", action="store_true", help="skip loading the model for its layer map (large local models)"
    )
    return parser


def _subcommand(sub: Any, name: str, help: str, kind: str | None) -> argparse.ArgumentParser:
    """A subcommand with kubectl's connection flags and, when ``kind`` is given, the object's name."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    _connection_flags(p)
    if kind is not None:
        p.add_argument("name", help=f"{kind} name")
    return p


def _sweep_commands(parent: Any) -> None:
    """``kubectl finetune sweep list|describe|plot|dashboard``: the FineTuneSweeps and their trials."""
    help_ = "FineTuneSweeps: list, describe, plot, dashboard"
    sweep = parent.add_parser("sweep", help=help_, description=help_)
    _connection_flags(sweep)
    sub = sweep.add_subparsers(dest="sweep_command", required=True, metavar="COMMAND")

    def command(name: str, help: str, named: bool = True) -> argparse.ArgumentParser:
        return _subcommand(sub, name, help, "FineTuneSweep" if named else None)

    p = command("list", "table of FineTuneSweeps: state, trials, best value", named=False)
    p.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    p.add_argument("-o", "--output", choices=("json", "yaml", "name"), help="output format")
    p = command("describe", "the search, trials best first (pruned/failed marked), best parameters, conditions, events")
    p.add_argument("-o", "--output", choices=("json", "yaml"), help="print the object instead")
    p = command("plot", "PNG: objective per trial (pruned marked) and each parameter against the objective")
    p.add_argument("-o", "--output", metavar="FILE", help="PNG to write (default NAME-sweep.png)")
    p = command("dashboard", "replay the sweep into optuna-dashboard, served locally (a snapshot)")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")


ADVISE_HELP = (
    "offline: the best-practice warnings `kubectl apply` would print for a manifest (exit 0 either way), then, when "
    "the model is on this machine, its layer map and what the freeze policy trains (finetune-trainer --plan)"
)


def cmd_advise(path: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr, layer_map: bool = True) -> int:
    """The same rules as the cluster's warning policy, before anything is applied; 1 only for an invalid spec."""
    try:
        spec = load_spec(path)
    except TrainerError as error:
        print(f"error: {error}", file=err)
        return EXIT_FAILED
    found = advise(spec)
    for item in found:
        print(f"Warning: {item.message}", file=out)
    if not found:
        print(f"{path}: no advice: the spec follows the fine-tuning practices we check", file=out)
    print_memory_plans(spec, resources_of(path), out)
    if layer_map:
        print_layer_map(spec, out)
    return 0


WEIGHTS = ("*.safetensors", "*.bin")
"""What a model directory holds its weights in (the layer map loads them; the memory plan does not)."""
OTHER_GPUS: tuple[tuple[int, int], ...] = ((1, 24), (1, 80), (8, 24), (8, 80))
"""(GPUs, GiB each) that advise also plans for, so a user sees what the job would need elsewhere."""


def print_memory_plans(spec: TrainingSpec, resources: dict[str, Any], out: TextIO) -> None:
    """The memory plan for the GPUs the job asks for, then the strategy auto would pick on common setups."""
    env = RuntimeEnv.from_environ()
    print_memory_plan(spec, env, resources, out)
    source = spec.model.source
    config = None if source.startswith("hf://") else read_config(local_path(source, env.pvc_root))
    if config is None:
        return
    for world, gib in OTHER_GPUS:
        found = plan(spec, config, Gpus(world, gib * GIB, f"{world}x{gib} GiB"))
        need = found.per_gpu_gib(found.strategy)
        if need is None:  # a family the plan does not know (it said so above)
            return
        fits = "fits" if found.fits(found.strategy) else "fits no strategy"
        print(f"on {world} x {gib} GiB: auto picks {found.strategy} ({need:.1f} GiB per GPU, {fits})", file=out)


def print_layer_map(spec: TrainingSpec, out: TextIO) -> None:
    """``finetune-trainer --plan``'s table when the model's files are on this machine; otherwise one line why not.

    Stays offline (a hub model is not downloaded) and imports torch only for a model it can load."""
    source = spec.model.source
    env = RuntimeEnv()
    if source.startswith("hf://"):
        why = f"model.source {source} is on the Hugging Face Hub and advise stays offline"
    else:
        try:
            env = RuntimeEnv.from_environ()
            directory = local_path(source, env.pvc_root)
        except TrainerError as error:
            why = str(error)
        else:
            hint = "; FINETUNE_PVC_ROOT says where the claims are mounted" if source.startswith("pvc://") else ""
            where = f"model.source {source} is not reachable here ({directory} is not a directory{hint})"
            why = "" if directory.is_dir() else where
            if not why and not any(next(directory.glob(pattern), None) for pattern in WEIGHTS):
                why = f"{directory} holds no weights (the memory plan above needs only its config.json)"
    if not why:
        try:
            from finetune_trainer.plan import print_plan  # noqa: PLC0415  (torch: the trainer's [train] extra)
        except ImportError as error:
            why = f"it needs the trainer's torch and transformers (pip install 'finetune-trainer[train]'): {error}"
    if why:
        print(f"Layer map: not shown: {why}; run `finetune-trainer --config FILE --plan` where the model is", file=out)
        return
    print("Layer map (what `finetune-trainer --config FILE --plan` prints):", file=out)
    try:
        print_plan(spec, env, out)
    except TrainerError as error:
        print(f"Layer map: not shown: {error}", file=out)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "advise":  # offline: no kubeconfig needed
        sys.exit(cmd_advise(args.filename, layer_map=not args.no_layer_map))
    try:
        kube = k.Kube.connect(getattr(args, "kubeconfig", None), getattr(args, "context", None))
    except (ConfigException, OSError) as error:
        print(f"error: cannot load kubeconfig: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    try:
        command = f"sweep {args.sweep_command}" if args.command == "sweep" else args.command
        code = COMMANDS[command](kube, args)
    except k.JobNotFoundError as error:
        print(f"Error from server (NotFound): {error}", file=sys.stderr)
        code = EXIT_NOT_FOUND
    except (ApiException, HTTPError) as error:
        print(f"error: {_describe_error(error)}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    finally:
        kube.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
