"""Sweep scale benchmark: a 300-trial TPE sweep with median pruning and scripted trainers (prints figures;
asserts nothing).

    .venv/bin/python benchmarks/sweep_scale.py [--trials 300] [--parallelism 4] [--evaluations 10]

The sweep controller keeps no state between reconciles: each one rebuilds an in-memory Optuna study from
the trials' statuses (state, parameters, evaluations as intermediate values numbered by absolute
evaluation), checks the running trials for pruning, and ``ask()``s new trials up to ``parallelism``. Its
cost therefore grows with the number of trials. This drives that loop with scripted trainers (each trial's
curve is a fixed function of its parameters plus seeded noise; one evaluation per running trial per
reconcile) and prints, as the trial count grows: the study rebuild, the pruning checks, ``ask()``, the whole
reconcile and the time per created trial, and this process's resident memory (RSS).

The rebuild here follows the issue's recipe with Optuna's public API (``create_trial`` + ``add_trials``,
seeded ``TPESampler`` with its arguments pinned, ``MedianPruner``); it stands in for the controller's own
engine until the benchmark can drive that directly.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

DISTRIBUTIONS: dict[str, BaseDistribution] = {
    "lr": FloatDistribution(1e-5, 3e-4, log=True),
    "decay": CategoricalDistribution([0.0, 0.01, 0.1]),
    "freeze": CategoricalDistribution(["bottom-2", "bottom-4", "head-only"]),
}


@dataclass
class Record:
    """What a trial FineTuneJob's status gives the controller."""

    params: dict[str, Any]
    state: TrialState = TrialState.RUNNING
    evaluations: list[float] = field(default_factory=list)


def curve(params: dict[str, Any], n: int, rng: random.Random) -> float:
    """Scripted accuracy at evaluation ``n``: best near lr 1e-4, freeze bottom-2; rises then plateaus."""
    quality = (
        0.9
        - 0.08 * abs(math.log10(params["lr"]) + 4)
        - {"bottom-2": 0, "bottom-4": 0.03, "head-only": 0.1}[params["freeze"]]
    )
    quality -= 0.2 * params["decay"]
    return quality * (1 - math.exp(-(n + 1) / 3)) + rng.gauss(0, 0.01)


def rebuild(records: list[Record], seed: int, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=10,
        n_ei_candidates=24,
        multivariate=False,
        group=False,
        constant_liar=True,  # running trials count as "lied" values: parallel asks do not collide
    )
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.add_trials(
        [
            optuna.trial.create_trial(
                state=r.state,
                params=r.params,
                distributions=DISTRIBUTIONS,
                value=max(r.evaluations) if r.state == TrialState.COMPLETE else None,
                intermediate_values=dict(enumerate(r.evaluations)),
            )
            for r in records
        ]
    )
    return study


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--parallelism", type=int, default=4)
    parser.add_argument("--evaluations", type=int, default=10, help="evaluations of a trial that is not pruned")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(args.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1, interval_steps=1)
    records: list[Record] = []
    samples: list[tuple[int, float, float, float, float]] = []  # trials, rebuild, prune, ask, reconcile (s)
    report_at = sorted({n for n in (10, 25, 50, 100, 150, 200, 250, 300, args.trials) if n <= args.trials})
    print(
        f"{'trials':>6} {'rebuild ms':>10} {'prune ms':>9} {'ask ms':>8} {'reconcile ms':>12} "
        f"{'per new trial ms':>16} {'pruned':>6} {'RSS MiB':>8}"
    )
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        study = rebuild(records, args.seed, pruner)
        t1 = time.perf_counter()
        frozen = study.get_trials(deepcopy=False)
        for record, trial in zip(records, frozen, strict=True):  # one evaluation per running trial
            if record.state != TrialState.RUNNING:
                continue
            if record.evaluations and pruner.prune(study, trial):
                record.state = TrialState.PRUNED
            elif len(record.evaluations) >= args.evaluations:
                record.state = TrialState.COMPLETE
            else:
                record.evaluations.append(curve(record.params, len(record.evaluations), rng))
        t2 = time.perf_counter()
        running = sum(r.state == TrialState.RUNNING for r in records)
        new = min(args.parallelism - running, args.trials - len(records))
        for _ in range(new):
            records.append(Record(study.ask(DISTRIBUTIONS).params))
        t3 = time.perf_counter()
        samples.append((len(records), t1 - t0, t2 - t1, t3 - t2, t3 - t0))
        if not any(r.state == TrialState.RUNNING for r in records) and len(records) >= args.trials:
            break
        while report_at and len(records) >= report_at[0]:
            n = report_at.pop(0)
            window = [s for s in samples if s[0] > n * 0.8 and s[0] <= n] or samples[-1:]
            ms = [statistics.mean(s[i] for s in window) * 1000 for i in range(1, 5)]
            asked = sum(1 for s in window if s[3] > 0) or 1
            per_trial = sum(s[4] for s in window) * 1000 / max(1, window[-1][0] - window[0][0] + asked)
            pruned = sum(r.state == TrialState.PRUNED for r in records)
            print(
                f"{n:>6} {ms[0]:>10.1f} {ms[1]:>9.1f} {ms[2]:>8.1f} {ms[3]:>12.1f} {per_trial:>16.1f} "
                f"{pruned:>6} {rss_mib():>8.0f}"
            )
    total = time.perf_counter() - start
    best = max((max(r.evaluations), i) for i, r in enumerate(records) if r.state == TrialState.COMPLETE)
    counts = {s.name: sum(r.state == s for r in records) for s in (TrialState.COMPLETE, TrialState.PRUNED)}
    print(
        f"{len(samples)} reconciles in {total:.1f} s ({total / len(records) * 1000:.0f} ms per trial overall); "
        f"{counts}; best trial t{best[1]:03d} = {best[0]:.4f} {records[best[1]].params}; peak RSS {rss_mib():.0f} MiB"
    )


if __name__ == "__main__":
    main()
