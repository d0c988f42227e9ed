"""The chart's alert rules, loaded and unit-tested by Prometheus' own promtool.

tests/alerts/alerts_test.yaml holds the cases; this module checks that every alert has one
where it fires and one where it stays quiet, and that promtool passes them (and fails a
broken rule). `make lint` runs the same promtool commands.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "finetune-operator" / "files" / "alerts.yaml"
TESTS = ROOT / "tests" / "alerts" / "alerts_test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is not installed: run `make system-deps` (Debian's prometheus package ships it)"
    return found


def _alerts() -> list[str]:
    return [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_is_quiet() -> None:
    cases = [case for test in yaml.safe_load(TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in _alerts():
        outcomes = [bool(case["exp_alerts"]) for case in cases if case["alertname"] == alert]
        assert True in outcomes, f"{alert}: no case where it fires"
        assert False in outcomes, f"{alert}: no case where it stays quiet"


def test_promtool_checks_and_tests_the_rules(promtool: str) -> None:
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", str(TESTS)], capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stdout + test.stderr


def test_a_broken_rule_fails_the_tests(promtool: str, tmp_path: Path) -> None:
    rules = RULES.read_text().replace('finetune_jobs{phase="Stalled"} > 0', 'finetune_jobs{phase="Stalled"} > 1')
    assert rules != RULES.read_text()
    layout = tmp_path / "charts" / "finetune-operator" / "files"
    layout.mkdir(parents=True)
    (layout / "alerts.yaml").write_text(rules)
    (tmp_path / "tests" / "alerts").mkdir(parents=True)
    shutil.copy(TESTS, tmp_path / "tests" / "alerts" / "alerts_test.yaml")
    test = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "tests" / "alerts" / "alerts_test.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert test.returncode != 0
    assert "FineTuneJobStalled" in test.stdout + test.stderr
