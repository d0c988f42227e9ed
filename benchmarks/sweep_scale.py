"""Sweep scale benchmark: a 300-trial TPE sweep with median pruning and scripted trainers, driven through the
operator's pure sweep core (prints figures; asserts nothing).

    .venv/bin/python benchmarks/sweep_scale.py [--trials 300] [--parallelism 4] [--evaluations 10]

The sweep controller keeps no state between reconciles: each one observes every trial FineTuneJob, rebuilds
an in-memory Optuna study from them, asks the pruner about the running ones and ``ask()``s new trials up to
``parallelism`` (``finetune_operator.reconcile.sweep.decide_sweep``). Its cost therefore grows with the
number of trials. This runs that core on ``examples/minilm-sweep-tpe.yaml`` (lr, weight decay, freeze
presets; TPE, median pruning) with ``maxTrials`` raised, against scripted trainers: each reconcile, every
running trial reports one more evaluation whose accuracy is a fixed function of its parameters plus seeded
noise; the core's prune and create decisions are applied as the operator would (Complete/Pruned, new trial
FineTuneJobs). It prints, as the trial count grows: the whole reconcile (observe + decide), the study
rebuild, the pruning check and one ``ask()`` measured on their own (all in CPU time of this process, so
that a loaded machine does not inflate them), the size of the sweep's status (what
etcd stores) and this process's peak resident memory (the core's share of the operator's RSS).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api.sweep import FineTuneSweep
from finetune_operator.reconcile.status import PRUNED
from finetune_operator.reconcile.sweep import decide_sweep
from finetune_operator.reconcile.sweep_engine import build_study, suggest, to_prune
from finetune_operator.reconcile.trials import observe_trial

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "minilm-sweep-tpe.yaml"
T0 = "2026-01-01T00:00:00Z"


def accuracy(params: dict[str, Any], evaluation: int, rng: random.Random) -> float:
    """Scripted accuracy at an evaluation: best near lr 1e-4 with bottom-2; rises, then plateaus."""
    quality = 0.9 - 0.08 * abs(math.log10(params["lr"]) + 4) - 0.2 * params["decay"]
    quality -= {"bottom-2": 0.0, "bottom-4": 0.03, "head-only": 0.1}[params["freeze"]]
    return quality * (1 - math.exp(-evaluation / 3)) + rng.gauss(0, 0.01)


def condition(type_: str, reason: str) -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "message": "", "lastTransitionTime": T0}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(action: Callable[[], object]) -> float:
    start = time.process_time()
    action()
    return (time.process_time() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--parallelism", type=int, default=4)
    parser.add_argument("--evaluations", type=int, default=10, help="evaluations of a trial that is not pruned")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["uid"] = "bench"
    manifest["spec"].update(maxTrials=args.trials, parallelism=args.parallelism)
    manifest["spec"]["objective"].pop("goal", None)  # run the whole budget
    manifest["spec"]["algorithm"]["seed"] = args.seed
    sweep = FineTuneSweep.model_validate(manifest)
    interval = sweep.spec.trial_template.spec.evaluation.interval or 1
    rng = random.Random(args.seed)
    bodies: dict[str, dict[str, Any]] = {}
    reconciles: list[tuple[int, float]] = []  # trials created so far, reconcile ms
    report_at = [n for n in (10, 25, 50, 100, 150, 200, 250, 300) if n < args.trials] + [args.trials]
    print(
        f"{sweep.spec.algorithm.name} + {sweep.spec.pruning.name} pruning, parallelism {args.parallelism}, "
        f"up to {args.evaluations} evaluations per trial; CPU ms, means over the reconciles since the last row"
    )
    print(
        f"{'trials':>6} {'reconcile ms':>12} {'per trial ms':>12} {'rebuild ms':>10} {'prune ms':>8} "
        f"{'ask ms':>7} {'status KiB':>10} {'pruned':>6} {'RSS MiB':>7}"
    )
    started = time.process_time()
    while True:
        for body in bodies.values():  # the scripted trainers: one more evaluation each, or finish
            status = body["status"]
            if status.get("conditions"):
                continue
            evaluations = status.setdefault("evaluations", [])
            if len(evaluations) >= args.evaluations:
                best = max(evaluations, key=lambda e: e["metrics"]["accuracy"])
                status["best"] = {"metric": "accuracy", "value": best["metrics"]["accuracy"], "step": best["step"]}
                status["conditions"] = [condition("Complete", "Succeeded")]
                continue
            n = len(evaluations) + 1
            params = json.loads(body["metadata"]["annotations"]["finetune.dev/parameters"])
            evaluations.append({"step": n * interval, "metrics": {"accuracy": accuracy(params, n, rng)}})
            status["phase"] = "Running"
        t0 = time.process_time()
        observed = [t for t in (observe_trial(sweep, b) for b in bodies.values()) if t is not None]
        decision = decide_sweep(sweep, observed, datetime.now(UTC))
        reconciles.append((len(bodies), (time.process_time() - t0) * 1000))
        for name in decision.prune:  # the trainer checkpoints and exits: Complete/Pruned
            bodies[name]["status"]["conditions"] = [condition("Complete", PRUNED)]
        for created in decision.create:
            bodies[created["metadata"]["name"]] = {**created, "status": {}}
        sweep.status = decision.status
        finished = decision.status.phase in ("Complete", "Failed")
        if report_at and (len(bodies) >= report_at[0] or finished):
            n = report_at.pop(0)
            while report_at and len(bodies) >= report_at[0]:
                report_at.pop(0)
            window = [ms for count, ms in reconciles if count >= n * 0.8] or [reconciles[-1][1]]
            created_in_window = max(1, len(bodies) - min(c for c, _ in reconciles if c >= n * 0.8))
            rebuild = timed(partial(build_study, sweep, observed))
            prune = timed(partial(to_prune, sweep, observed))
            ask = timed(partial(suggest, sweep, observed, [len(observed)]))
            size = len(json.dumps(decision.status.model_dump(mode="json", by_alias=True, exclude_none=True))) / 1024
            print(
                f"{len(bodies):>6} {statistics.mean(window):>12.1f} {sum(window) / created_in_window:>12.1f} "
                f"{rebuild:>10.1f} {prune:>8.1f} {ask:>7.1f} {size:>10.1f} "
                f"{decision.status.trial_counts.pruned:>6} {rss_mib():>7.0f}"
            )
        if finished:
            break
    total = time.process_time() - started
    best = decision.status.best_trial
    print(
        f"{len(reconciles)} reconciles in {total:.1f} s; {decision.status.phase} "
        f"({decision.status.message}); counts {decision.status.trial_counts.model_dump()}; "
        f"best {best.name if best else '-'} = {best.value if best else float('nan'):.4f} "
        f"{best.parameters if best else ''}; peak RSS {rss_mib():.0f} MiB"
    )


if __name__ == "__main__":
    main()
