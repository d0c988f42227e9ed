"""The trainer-status admission policies: generated from the one list of trainer-owned keys, shipped unchanged;
the authors' policy generated from its one table of guarded spec paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml

from finetune_operator.api.job import OPERATOR_STATUS_KEYS, TRAINER_STATUS_KEYS, FineTuneJobSpec, FineTuneJobStatus
from finetune_operator.generators import author_policy
from finetune_operator.generators.crd import POLICY_FILES, render_policy

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
    policy, binding, *_identity = yaml.safe_load_all(render_policy())
    identity, *validations = policy["spec"]["validations"]
    assert "status.workload.serviceAccount" in identity["messageExpression"], "the recorded identity comes first"
    for key in OPERATOR_STATUS_KEYS:
        assert sum(f"?status.?{key}" in v["expression"] for v in validations) == 1, key
    messages = " ".join(v["message"] for v in validations)
    assert "status.best.checkpoint" in messages and "status.evaluations" in messages
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["finetunejobs/status"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}


def test_every_guarded_path_is_a_field_of_the_spec() -> None:
    """CEL against a field the schema lacks fails type-checking: the table names only real fields."""
    for guard in author_policy.GUARDED:
        model: type[Any] = FineTuneJobSpec
        for key in guard.path.replace("[]", "").split("."):
            fields = {field.alias or name: field for name, field in model.model_fields.items()}
            assert key in fields, guard.path
            model = next(
                (
                    arg
                    for arg in (fields[key].annotation, *get_args(fields[key].annotation))
                    if hasattr(arg, "model_fields")
                ),
                str,
            )
        if guard.check is author_policy.Check.SECRET:
            assert "name" in model.model_fields, guard.path


def test_each_guard_is_checked_in_the_job_the_template_and_the_search_space() -> None:
    job, _, sweep, _ = author_policy.manifests()
    job_messages = [v["message"] for v in job["spec"]["validations"]]
    sweep_messages = " ".join(v["message"] for v in sweep["spec"]["validations"])
    for guard in author_policy.GUARDED:
        assert any(m.startswith(f"spec.{guard.path}") for m in job_messages), guard.path
        assert f"spec.trialTemplate.spec.{guard.path}" in sweep_messages, guard.path
        leaf = f"{guard.path}.name" if guard.check is author_policy.Check.SECRET else guard.path
        assert f"spec.parameters can set {leaf} " in sweep_messages, guard.path
