"""The Argo CD health check and the Flux expressions on the checked-in dumps, without a cluster.

The dumps in gitops/argocd/.../testdata come from the end-to-end run (tests/e2e/test_gitops.py
checks they still match what the operator produces). The Go harness builds once from the Go
module proxy and is cached like the control plane.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_localcluster import gitops_harness
from tests.e2e.test_gitops import EXPECTED

pytestmark = pytest.mark.slow
TESTDATA = gitops_harness.ARGOCD_DIR / "testdata"


def test_argocd_health_test_yaml_passes_in_argocds_lua_vm() -> None:
    run = gitops_harness.argocd_test()
    assert run.returncode == 0, run.stdout + run.stderr
    tests = yaml.safe_load((gitops_harness.ARGOCD_DIR / "health_test.yaml").read_text())["tests"]
    assert {Path(t["inputPath"]).stem for t in tests} == set(EXPECTED), "one Argo CD test per phase"


def test_checked_in_dumps_compute_as_expected_in_kstatus_argocd_and_flux() -> None:
    report = gitops_harness.report(sorted(TESTDATA.glob("*.yaml")))
    got = {
        Path(name).stem: (r["kstatus"]["status"], r["argocd"]["status"], r["flux"]["status"])
        for name, r in report.items()
    }
    assert got == EXPECTED


def test_a_broken_health_check_fails_the_argocd_tests(tmp_path: Path) -> None:
    """The harness is not a rubber stamp: a health.lua that calls every job Healthy fails."""
    broken = tmp_path / "FineTuneJob"
    broken.mkdir()
    (broken / "health.lua").write_text('return {status = "Healthy", message = ""}\n')
    (broken / "health_test.yaml").write_text((gitops_harness.ARGOCD_DIR / "health_test.yaml").read_text())
    (broken / "testdata").symlink_to(TESTDATA)
    run = gitops_harness.argocd_test(broken)
    assert run.returncode == 1
    assert "FAIL testdata/running.yaml: got Healthy" in run.stdout


def test_argocd_libraries_are_off_as_in_argocd(tmp_path: Path) -> None:
    """Argo CD runs health checks without the string library; the harness must too."""
    lua = tmp_path / "health.lua"
    lua.write_text('return {status = string.upper("healthy")}\n')
    report = gitops_harness.report([TESTDATA / "running.yaml"], lua=lua)["running.yaml"]
    assert report["argocd"]["status"] == "Error"
    assert "string" in report["argocd"]["message"]
