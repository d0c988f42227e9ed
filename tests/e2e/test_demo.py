"""`make demo`, end to end, on smaller data: the flow a newcomer runs first.

This is the suite's one real MiniLM fine-tune (real weights, real reviews), so it also carries the
quality bar a trainer-only run used to check on its own: clearly better than the majority class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from finetune_localcluster.cluster import Cluster, free_port
from finetune_testsupport.pytest_plugin import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_fine_tunes_minilm_and_reports_everywhere(tmp_path: Path) -> None:
    state, output = tmp_path / "cluster", tmp_path / "out"
    ports = {
        "--operator-metrics-port": free_port(),
        "--prometheus-port": free_port(),
        "--trainer-metrics-port": free_port(),
    }
    flags = [str(x) for pair in ports.items() for x in pair]
    env = {**os.environ, "FINETUNE_CLUSTER_DIR": str(state)}
    demo = [sys.executable, "-m", "finetune_demo"]
    try:
        run = subprocess.run(
            [*demo, "--train", "256", "--val", "96", "--output", str(output), *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        log = run.stdout + run.stderr
        assert run.returncode == 0, f"`kubectl finetune watch` must exit 0 on Complete:\n{log[-4000:]}"

        kubeconfig = state / "kubeconfig"
        plugin = [
            str(Path(sys.executable).parent / "kubectl-finetune"),
            "--kubeconfig",
            str(kubeconfig),
            "-n",
            "finetune-demo",
        ]
        job = json.loads(
            subprocess.run(
                [*plugin, "describe", "minilm-sentiment", "-o", "json"], capture_output=True, text=True, check=True
            ).stdout
        )
        conditions = {c["type"]: c for c in job["status"]["conditions"]}
        assert conditions["Complete"]["status"] == "True", log[-3000:]
        assert conditions["Complete"]["reason"] in ("Succeeded", "EarlyStopped")

        validation = state / "volumes" / "finetune-demo" / "datasets" / "rotten-tomatoes" / "validation.jsonl"
        labels = [json.loads(line)["label"] for line in validation.read_text().splitlines()]
        majority = max(labels.count(0), labels.count(1)) / len(labels)
        best = job["status"]["best"]
        assert best["metric"] == "accuracy"
        assert best["value"] >= majority + 0.15, f"accuracy {best['value']} vs majority baseline {majority}"
        print(f"best accuracy {best['value']:.3f} vs majority baseline {majority:.3f}")

        too_fast = yaml.safe_load(
            (Path(__file__).resolve().parents[2] / "examples" / "minilm-rotten-tomatoes.yaml").read_text()
        )
        too_fast["metadata"] = {"name": "too-fast", "namespace": "finetune-demo"}
        too_fast["spec"]["hyperparameters"]["learningRate"] = 0.1
        applied = LocalCluster(Cluster(state)).kubectl(
            "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(too_fast), check=False
        )
        assert applied.returncode == 0 and "Warning:" in applied.stderr, applied.stderr  # the README's promise

        png = (output / "curves.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

        query = 'finetune_job_best_metric{namespace="finetune-demo",name="minilm-sentiment"}'
        url = f"http://127.0.0.1:{ports['--prometheus-port']}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(url, timeout=5) as response:
            series = json.loads(response.read())["data"]["result"]
        assert series and float(series[0]["value"][1]) == pytest.approx(best["value"])
        assert "finetune_job_best_metric" in log and "timings" in log
        assert yaml.safe_load(kubeconfig.read_text())["clusters"]
    finally:
        subprocess.run([*demo, "--down"], env=env, capture_output=True, timeout=120, check=False)
        assert not Cluster(state).is_running()
