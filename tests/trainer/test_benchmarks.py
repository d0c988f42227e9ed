"""The GPU benchmark script runs on CPU at tiny sizes, so it cannot break unseen before a GPU is lent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_prints_its_table_at_tiny_size() -> None:
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu.sh"), "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line.split() for line in proc.stdout.splitlines()]
    rows = {parts[0]: parts for parts in table if len(parts) >= 3 and parts[2] in ("tokens/s", "samples/s")}
    for row in ("lm:plain", "lm:ours", "minilm:ours", "minilm:ours+cache"):
        assert row in rows and float(rows[row][1]) > 0, proc.stdout
    assert "minilm:ours+cache vs minilm:ours:" in proc.stdout
