#!/usr/bin/env bash
# One table for a GPU machine, in at most 9.5 minutes; installs nothing (it uses the project's .venv).
#   benchmarks/gpu.sh          # full sizes (on a GPU)
#   benchmarks/gpu.sh --tiny   # tiny sizes: runs on CPU (tests/trainer/test_benchmarks.py keeps it working)
#   benchmarks/gpu.sh --only mem   # only the memory rows: ddp vs fsdp (~0.9B), LoRA vs QLoRA, plan vs peak
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec timeout 570 "$PY" benchmarks/gpu_table.py "$@"
