"""The demo's MiniLM job trained twice on the local control plane: as a local process (the
checkout's venv, `make demo`) and inside the trainer image (a podman container: read-only root,
non-root, `make images`). Prints both wall times side by side.

    python benchmarks/container_vs_process.py [--train 544 --val 200] [--image localhost/finetune-trainer:latest]

Each run is `python -m finetune_demo` on a control plane of its own (FINETUNE_CLUSTER_DIR), so
nothing is shared but the machine; "training" is from `kubectl apply` to Complete.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune_localcluster.cluster import free_port


def run_demo(train: int, val: int, image: str | None) -> tuple[float, float]:
    """(training seconds, total seconds) of one demo run."""
    with tempfile.TemporaryDirectory(prefix="ftbench-") as tmp:
        env = {**os.environ, "FINETUNE_CLUSTER_DIR": str(Path(tmp) / "cluster")}
        ports = ["--operator-metrics-port", "--prometheus-port", "--trainer-metrics-port"]
        demo = [sys.executable, "-m", "finetune_demo"]
        argv = [*demo, "--train", str(train), "--val", str(val), "--output", str(Path(tmp) / "out")]
        argv += [str(x) for flag in ports for x in (flag, free_port())]
        argv += ["--trainer-image", image] if image else []
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
        finally:
            subprocess.run([*demo, "--down"], env=env, capture_output=True, timeout=300, check=False)
    found = re.search(r"setup (\d+) s, training (\d+) s, total (\d+) s", done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the demo failed ({'image ' + image if image else 'process'}):\n{done.stdout[-3000:]}")
    return float(found.group(2)), float(found.group(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--train", type=int, default=544)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--image", default="localhost/finetune-trainer:latest")
    args = parser.parse_args()
    process = run_demo(args.train, args.val, None)
    container = run_demo(args.train, args.val, args.image)
    print(f"{'':<22}{'process':>10}{'container':>11}{'ratio':>8}")
    for label, i in (("training (apply->done)", 0), ("demo total", 1)):
        print(f"{label:<22}{process[i]:>9.0f}s{container[i]:>10.0f}s{container[i] / process[i]:>8.2f}")


if __name__ == "__main__":
    main()
