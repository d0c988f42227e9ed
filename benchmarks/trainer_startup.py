"""How soon the trainer reports a bad input, and what its torch-free preflight stage costs.

1. Wall and CPU seconds of ``finetune-trainer --config X`` (a fresh process, as a pod runs it) until it exits
   with a data error (a missing label column, exit 3) and a run-level config error (earlyStopping without
   validation data, exit 2); the median of ``--repeats``. CPU seconds are what other tenants of a shared
   machine cannot inflate.
2. Seconds the preflight stage takes to read and check ``--rows`` rows of JSON lines (the tables it reads are
   the ones training uses: the data is read once).

    python benchmarks/trainer_startup.py [--repeats 5] [--rows 100000] [--trainer PATH_TO_finetune-trainer]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cases(root: Path) -> dict[str, tuple[Path, int]]:
    from tests.trainer import tiny

    model = tiny.save_model(root / "bert", "bert", "sequence-classification", layers=2)
    no_label = root / "no-label"
    no_label.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (no_label / name).write_text(json.dumps({"text": "good film"}) + "\n")
    data_error = tiny.spec(model, no_label, root / "out-data")
    good = tiny.write_sentiment(root / "sentiment", 32, 16)
    config_error = tiny.spec(model, good, root / "out-config", dataset={"validation": None}, earlyStopping={})
    cases = {}
    for name, wire, code in (("data error", data_error, 3), ("config error", config_error, 2)):
        path = root / f"{name.replace(' ', '-')}.json"
        path.write_text(json.dumps(wire))
        cases[name] = (path, code)
    return cases


def _time_to_error(trainer: str, config: Path, code: int) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([trainer, "--config", str(config)], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != code:
        raise SystemExit(f"expected exit {code}, got {proc.returncode}: {proc.stderr[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _preflight_seconds(root: Path, rows: int) -> float:
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.preflight import preflight
    from finetune_trainer.spec import TrainingSpec
    from tests.trainer import tiny

    data = tiny.write_sentiment(root / "large", rows, max(rows // 10, 1))
    spec = TrainingSpec.model_validate(tiny.spec(root / "bert", data, root / "out-large"))
    start = time.perf_counter()
    preflight(spec, RuntimeEnv())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100_000, help="0: skip the preflight measurement")
    parser.add_argument("--trainer", default=str(Path(sys.executable).parent / "finetune-trainer"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FINETUNE_METRICS_PORT", "0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report: dict[str, Any] = {}
        for name, (config, code) in _cases(root).items():
            runs = [_time_to_error(args.trainer, config, code) for _ in range(args.repeats)]
            report[name] = {
                "wall_s": round(statistics.median(w for w, _ in runs), 2),
                "cpu_s": round(statistics.median(c for _, c in runs), 2),
            }
        if args.rows:
            seconds = _preflight_seconds(root, args.rows)
            report[f"preflight of {args.rows} rows (+10% validation)"] = {"wall_s": round(seconds, 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
