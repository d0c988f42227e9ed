"""Manifest fuzzing at length: generated FineTuneJobs against pydantic, the real API server and the core.

    python benchmarks/manifest_fuzz.py [--cases 2000] [--seed 0]

The same judge as tests/integration/test_manifest_fuzz.py (a few hundred seeded cases in `make test`),
on a control plane of its own, without stopping at the first finding: prints the number of cases,
accepted / rejected, disagreements between pydantic and the API server, core crashes and cases/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from kubernetes import client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune_localcluster.cluster import Cluster  # noqa: E402
from finetune_localcluster.kubeconfig import api_client, install_crd  # noqa: E402
from finetune_operator.generators.crd import build_crd  # noqa: E402
from tests.fuzz_manifests import Verdicts, judge, spec_strategy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    verdicts = Verdicts()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        cluster = Cluster(Path(tmp) / "cluster").start(reuse=False)
        try:
            with api_client(cluster.kubeconfig) as api:
                install_crd(api, build_crd())
                client.CoreV1Api(api).create_namespace({"metadata": {"name": "fuzz"}})

                @seed(args.seed)
                @settings(
                    max_examples=args.cases, database=None, deadline=None, suppress_health_check=list(HealthCheck)
                )
                @given(spec_strategy())
                def case(spec: dict[str, Any]) -> None:
                    judge(api, "fuzz", spec, verdicts, note=lambda finding: print(f"FINDING {finding}", flush=True))

                began = time.monotonic()
                case()
                elapsed = time.monotonic() - began
        finally:
            cluster.stop()
    print(f"cases            {verdicts.cases}")
    print(f"accepted         {verdicts.accepted}")
    print(f"rejected         {verdicts.rejected}")
    print(f"disagreements    {len(verdicts.disagreements)}")
    print(f"core crashes     {len(verdicts.crashes)}")
    print(f"cases per second {verdicts.cases / max(elapsed, 1e-9):.1f}")
    return 1 if verdicts.disagreements or verdicts.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
