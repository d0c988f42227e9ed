"""Multi-node vs one node: samples/s of the same job trained by 1 rank and by N ranks (torchrun, gloo).

The ranks run the real trainer through ``finetune_trainer.launch`` exactly as the pods of a
``nodes: N`` FineTuneJob do (rendezvous on loopback here, as on the local cluster's nodes, which
share the host), each rank with ``--threads`` intra-op threads. The job is the same: model, data,
per-rank batch size and epochs, so N ranks take 1/N of the steps with an N-times larger global
batch. samples/s is the trainer's own figure (``samplesPerSecond`` of its last log line: steps
done * global batch / time since training began). Prints figures and the ratio; asserts nothing.
On one machine the ranks share its cores: the ratio shows DDP's overhead and what the CPUs allow,
not the scaling of separate GPU nodes.

    .venv/bin/python benchmarks/multinode.py [--ranks 2] [--epochs 2] [--train 512] [--layers 4] [--hidden 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.trainer import tiny


def measure(ranks: int, spec: dict[str, Any], work: Path, threads: int, tag: str = "") -> dict[str, float]:
    out = work / f"out-{ranks}{tag}"
    config = work / f"spec-{ranks}{tag}.json"
    config.write_text(json.dumps({**spec, "output": {"location": str(out)}}))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "FINETUNE_METRICS_PORT": "0",
        "FINETUNE_LOG_EVERY_STEPS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    launch = [sys.executable, "-m", "finetune_trainer.launch", "--nnodes=1", "--standalone"]
    command = [*launch, f"--nproc-per-node={ranks}", "-m", "finetune_trainer.cli", "--config", str(config)]
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    logs = [e for e in events if e["event"] == "log" and e.get("samplesPerSecond")]
    result = next(e for e in events if e["event"] == "result")
    return {"samples/s": logs[-1]["samplesPerSecond"], "steps": result["finalStep"], "wall s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train", type=int, default=512, help="training examples")
    p.add_argument("--batch", type=int, default=16, help="per-rank batch size")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument(
        "--strategies", default="ddp", help="distributed.strategy of the N-rank runs, comma-separated: ddp,fsdp"
    )
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="multinode-bench-") as tmp:
        work = Path(tmp)
        model = work / "model"
        hidden = {"hidden_size": a.hidden, "intermediate_size": 4 * a.hidden, "num_attention_heads": 4}
        built = tiny.build("bert", "sequence-classification", a.layers, **hidden)
        built.save_pretrained(str(model))
        tiny.save_tokenizer(model)
        data = tiny.write_sentiment(work / "data", n_train=a.train, n_val=32)
        spec: dict[str, Any] = {
            "model": {"source": str(model), "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": str(data), "train": "train.jsonl", "maxSeqLength": 32},
            "freeze": {"strategy": "none"},
            "hyperparameters": {"learningRate": 1e-3, "batchSize": a.batch, "epochs": a.epochs, "seed": 0},
            "evaluation": {"strategy": "no", "metrics": ["loss"]},
        }
        one = measure(1, spec, work, a.threads)
        many = {
            strategy: measure(a.ranks, {**spec, "distributed": {"strategy": strategy}}, work, a.threads, strategy)
            for strategy in a.strategies.split(",")
        }
    shape = f"{a.layers} layers, hidden {a.hidden}"
    print(f"model: bert, {shape}; {a.train} examples x {a.epochs} epochs, batch {a.batch}/rank")
    print(f"{'ranks':>5} {'strategy':>8} {'steps':>6} {'samples/s':>10} {'wall s':>7}")
    for ranks, strategy, row in ((1, "-", one), *((a.ranks, s, r) for s, r in many.items())):
        print(f"{ranks:>5} {strategy:>8} {row['steps']:>6.0f} {row['samples/s']:>10.1f} {row['wall s']:>7.1f}")
    for strategy, row in many.items():
        ratio = row["samples/s"] / one["samples/s"]
        print(f"{a.ranks} ranks ({strategy}) / 1 rank: {ratio:.2f}x samples/s (cpus: {os.cpu_count()})")


if __name__ == "__main__":
    main()
