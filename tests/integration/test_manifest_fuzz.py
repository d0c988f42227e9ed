"""Manifest fuzzing on the real API server: pydantic and the CRD agree, the core never crashes, and the advice
policy (installed as the chart does) warns exactly what `kubectl finetune advise` prints, never rejecting.

Seeded and capped here (FINETUNE_FUZZ_EXAMPLES, default 200); ``benchmarks/manifest_fuzz.py`` runs more."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from finetune_testsupport.pytest_plugin import LocalCluster
from tests.advice_cases import advice_in_force
from tests.fuzz_manifests import Verdicts, judge, spec_strategy

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FINETUNE_FUZZ_EXAMPLES", "200"))


def test_generated_manifests(local_cluster: LocalCluster, crd: Any, namespace: str) -> None:
    verdicts = Verdicts()
    with local_cluster.api_client() as api, advice_in_force(local_cluster, namespace):

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(spec_strategy())
        def case(spec: dict[str, Any]) -> None:
            findings: list[str] = []
            judge(api, namespace, spec, verdicts, note=findings.append, advised=True)
            assert not findings, findings[0]  # hypothesis then shrinks it to a minimal manifest

        case()
    print(
        f"manifest fuzzing: {verdicts.cases} cases, {verdicts.accepted} accepted ({verdicts.warned} with advice), "
        f"{verdicts.rejected} rejected"
    )
    assert verdicts.cases >= EXAMPLES
    assert verdicts.warned > 0, "no generated spec got advice: the comparison with advise() checked nothing"
