"""What MLflow tracking costs a training step (issue 28).

Trains the tests' tiny BERT in-process with an evaluation (and a log line) at every step, three ways,
interleaved round by round: without tracking, tracking to a live ``mlflow server`` (SQLite, started here), and
tracking to a server that is down (a port nothing listens on). Prints the median wall time of a training step
including its evaluation, from a callback's timestamps, and the difference to the untracked run: the cost per
evaluation step. Training only queues; the MLflow client runs on its own thread, so what remains is the
queueing and that thread's share of the CPU (on a busy 2-core machine, mostly the latter).

    python benchmarks/tracking_overhead.py [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train(root: Path, name: str, steps: int, uri: str | None, flush: float) -> list[float]:
    from transformers import TrainerCallback

    from finetune_trainer import run as run_mod
    from finetune_trainer import tracking
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.reporting import JsonLines
    from finetune_trainer.spec import TrainingSpec
    from finetune_trainer.trainer import FineTuneTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter())

    original = FineTuneTrainer.__init__

    def with_clock(self: Any, *a: Any, **k: Any) -> None:
        original(self, *a, **k)
        self.add_callback(Clock())

    spec: dict[str, Any] = {
        "model": {"source": str(root / "model"), "task": "sequence-classification", "numLabels": 2},
        "dataset": {"source": str(root / "data"), "validation": "validation.jsonl", "maxSeqLength": 32},
        "hyperparameters": {"learningRate": 1e-3, "batchSize": 8, "maxSteps": steps},
        "evaluation": {"strategy": "steps", "interval": 1, "metrics": ["loss", "accuracy"]},
        "output": {"location": str(root / "out" / name), "saveFinalModel": False},
    }
    if uri is not None:
        spec["tracking"] = {"uri": uri, "experiment": "overhead"}
    FineTuneTrainer.__init__ = with_clock  # type: ignore[method-assign]
    try:
        env = RuntimeEnv(metrics_port=0, log_every_steps=1, job_uid=f"{name}-{time.time_ns()}")
        tracking.FLUSH_SECONDS = flush  # a server that is down: give up at once at the end
        run_mod.run(TrainingSpec.model_validate(spec), env, JsonLines(io.StringIO()))
    finally:
        FineTuneTrainer.__init__ = original  # type: ignore[method-assign]
    return [b - a for a, b in itertools.pairwise(times)][2:]  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from finetune_devtools.mlflow_server import MlflowServer
    from tests.trainer import tiny

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny.save_model(root / "model")
        tiny.write_sentiment(root / "data", n_train=64, n_val=16)
        server = MlflowServer(root / "mlflow")
        server.start()
        try:
            modes = {"none": (None, 0.0), "live": (server.uri, 300.0), "down": ("http://127.0.0.1:9", 0.0)}
            results: dict[str, list[float]] = {mode: [] for mode in modes}
            for round_ in range(args.repeats):
                for mode, (uri, flush) in modes.items():
                    results[mode] += train(root, f"{mode}-{round_}", args.steps, uri, flush)
        finally:
            server.stop()
    base = statistics.median(results["none"])
    print(f"{'tracking':10} {'median step+eval (ms)':>22} {'cost per step (ms)':>19}")
    for mode, times in results.items():
        median = statistics.median(times)
        print(f"{mode:10} {median * 1000:22.1f} {(median - base) * 1000:19.1f}")


if __name__ == "__main__":
    main()
