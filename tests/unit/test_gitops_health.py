"""The Argo CD health check and the Flux expressions on the checked-in dumps, without a cluster.

The dumps in gitops/argocd/.../testdata come from the end-to-end run (tests/e2e/test_gitops.py
checks they still match what the operator produces). The Go harness builds once from the Go
module proxy and is cached like the control plane.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from finetune_operator.api.job import FineTuneJobStatus, Progress
from finetune_operator.reconcile import Observed, ObservedJob, decide
from finetune_operator.reconcile.health import derive_health
from finetune_operator.reconcile.status import set_condition
from finetune_testsupport import gitops_harness
from tests.e2e.test_gitops import EXPECTED
from tests.unit.test_reconcile import NOW, job

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


def _with_status(phase: str, status: FineTuneJobStatus, tmp_path: Path) -> Path:
    """A checked-in dump of ``phase`` carrying a status made by the reconcile core."""
    body = yaml.safe_load((TESTDATA / f"{phase}.yaml").read_text())
    body["status"] = status.to_wire()
    path = tmp_path / f"{phase}-variant.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_phases_without_a_real_dump_yet_compute_right(tmp_path: Path) -> None:
    """Queued by Kueue (no Kueue support yet) and a stalled job the user then paused."""
    queued = decide(job(), Observed(job=ObservedJob(suspended=True)), NOW).status
    set_condition(queued, "Suspended", True, "Queued", "waiting for admission by ClusterQueue gpu", NOW, 1)
    derive_health(queued, 1, NOW)
    stalled = job(stallTimeoutSeconds=60)
    stalled.status.progress = Progress(step=5, last_heartbeat_time=NOW - timedelta(seconds=61))
    stalled.status = decide(stalled, Observed(job=ObservedJob(active=1)), NOW).status
    stalled.spec.suspend = True
    paused = decide(stalled, Observed(job=ObservedJob(suspended=True)), NOW).status
    report = gitops_harness.report(
        [_with_status("running", queued, tmp_path), _with_status("stalled", paused, tmp_path)]
    )
    verdicts = {
        name: (r["kstatus"]["status"], r["argocd"]["status"], r["flux"]["status"]) for name, r in report.items()
    }
    assert verdicts == {
        "running-variant.yaml": ("InProgress", "Progressing", "InProgress"),
        "stalled-variant.yaml": ("Current", "Suspended", "Current"),
    }
