"""The trainer-status admission policy: generated from the one list of trainer-owned keys, shipped unchanged."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune_operator.api import OPERATOR_STATUS_KEYS, TRAINER_STATUS_KEYS, FineTuneJobStatus
from finetune_operator.crd import POLICY_FILES, render_policy

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_policy_files_match_the_models() -> None:
    for path in POLICY_FILES:
        assert (ROOT / path).read_text() == render_policy(), f"{path} is stale: run `make crds`"


def test_chart_installs_the_generated_policy() -> None:
    template = (ROOT / "charts/finetune-operator/templates/trainer-status-policy.yaml").read_text()
    assert '.Files.Get "files/trainer-status-policy.yaml"' in template


def test_every_status_key_has_exactly_one_owner() -> None:
    keys = {field.alias or name for name, field in FineTuneJobStatus.model_fields.items()}
    assert set(TRAINER_STATUS_KEYS) <= keys
    operator = set(OPERATOR_STATUS_KEYS)
    assert operator | set(TRAINER_STATUS_KEYS) == keys and not operator & set(TRAINER_STATUS_KEYS)
    assert {"conditions", "phase", "stopRequest", "earlyStopping", "restarts", "message", "workload"} <= operator


def test_one_ownership_rule_per_operator_key_and_bounds_for_the_trainers() -> None:
    policy, binding = yaml.safe_load_all(render_policy())
    validations = policy["spec"]["validations"]
    for key in OPERATOR_STATUS_KEYS:
        assert sum(f"?status.?{key}" in v["expression"] for v in validations) == 1, key
    messages = " ".join(v["message"] for v in validations)
    assert "status.best.checkpoint" in messages and "status.evaluations" in messages
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["finetunejobs/status"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
