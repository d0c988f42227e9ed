"""The admission policy that splits status between its two writers, generated from the API models.

The trainer's token may patch its job's status, and so may any code in its pod (a
``trustRemoteCode`` model, a user-chosen ServiceAccount). RBAC cannot limit a patch to some
keys; a ``ValidatingAdmissionPolicy`` can. It lets the trainer change only
``TRAINER_STATUS_KEYS``, within bounds, and keeps every other status key (``OPERATOR_STATUS_KEYS``) the operator's.

Who counts as "a trainer": every ServiceAccount of the FineTuneJob's own namespace. That is
every identity a pod next to the job can run as (pods can only use ServiceAccounts of their
own namespace), so the per-job account and ``spec.resources.serviceAccountName`` are both
covered, and nothing about naming conventions has to hold. The operator runs as a
ServiceAccount of its own namespace (``finetune-system`` in the chart) and users as
themselves, so neither is matched; the operator's own writes in its namespace (where it refuses
every job) are exempt by name.

``python -m finetune_operator.crd`` writes the policy to ``deploy/`` and the chart;
``--check`` fails when those files drift from this module.
"""

from __future__ import annotations

import json
from typing import Any

from finetune_operator.api import (
    GROUP,
    MAX_CHECKPOINT_URI_LENGTH,
    MAX_EVALUATIONS,
    MAX_METRIC_NAME_LENGTH,
    MAX_METRICS_PER_EVALUATION,
    OPERATOR_STATUS_KEYS,
    PLURAL,
    TRAINER_STATUS_KEYS,
    FineTuneJobStatus,
)
from finetune_operator.rbac import OPERATOR_USERNAME

POLICY_NAME = f"finetune-trainer-status.{GROUP}"
TRAINER_IDENTITY = "request.userInfo.username.startsWith('system:serviceaccount:' + request.namespace + ':')"
"""CEL: the request comes from a ServiceAccount of the job's namespace (see the module docstring)."""

_TRAINER_KEYS = ", ".join(f"status.{key}" for key in TRAINER_STATUS_KEYS)


def _unchanged(key: str) -> str:
    """CEL: ``status.<key>`` is as it was. A key the API server defaults (``[]``, ``0``) counts
    as unchanged when it only appears with its default (a first status write)."""
    field = FineTuneJobStatus.model_fields[_python_name(key)]
    default = field.get_default(call_default_factory=True)
    new, old = f"object.?status.?{key}", f"oldObject.?status.?{key}"
    if default is None:
        return f"{new} == {old}"
    literal = json.dumps(default)
    return f"{new}.orValue({literal}) == {old}.orValue({literal})"


def _python_name(key: str) -> str:
    return next(name for name, field in FineTuneJobStatus.model_fields.items() if (field.alias or name) == key)


def _validation(expression: str, message: str) -> dict[str, Any]:
    return {"expression": expression, "message": message, "reason": "Forbidden"}


def _trainer_bounds() -> list[dict[str, Any]]:
    """Sizes and places the trainer's own keys must keep (checked only when the key changes)."""
    evaluations = "object.?status.?evaluations.orValue([])"
    unchanged = "object.?status.?evaluations == oldObject.?status.?evaluations"
    metrics_bounded = (
        f"size(e.metrics) <= {MAX_METRICS_PER_EVALUATION} && e.metrics.all(k, size(k) <= {MAX_METRIC_NAME_LENGTH})"
    )
    return [
        _validation(
            f"{unchanged} || size({evaluations}) <= {MAX_EVALUATIONS}",
            f"status.evaluations: at most {MAX_EVALUATIONS} evaluations",
        ),
        _validation(
            f"{unchanged} || {evaluations}.all(e, {metrics_bounded})",
            f"status.evaluations[].metrics: at most {MAX_METRICS_PER_EVALUATION} metrics per evaluation, "
            f"names of at most {MAX_METRIC_NAME_LENGTH} characters",
        ),
        _validation(
            "object.?status.?best == oldObject.?status.?best || "
            f"size(object.?status.?best.?metric.orValue('')) <= {MAX_METRIC_NAME_LENGTH}",
            f"status.best.metric: at most {MAX_METRIC_NAME_LENGTH} characters",
        ),
        _validation(
            "object.?status.?best.?checkpoint == oldObject.?status.?best.?checkpoint || variables.checkpoint == '' || "
            f"(size(variables.checkpoint) <= {MAX_CHECKPOINT_URI_LENGTH} && "
            "variables.checkpoint.startsWith(variables.output) && "
            "!variables.checkpoint.matches('(^|/)[.][.](/|$)'))",
            "status.best.checkpoint must lie inside the job's spec.output.location",
        ),
    ]


def validating_admission_policy() -> dict[str, Any]:
    """The ValidatingAdmissionPolicy: trainer identities may change only the trainer's status keys."""
    ownership = [
        _validation(
            _unchanged(key),
            f"status.{key} is the operator's: a trainer may change only {_TRAINER_KEYS}",
        )
        for key in OPERATOR_STATUS_KEYS
    ]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY_NAME, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        "resources": [f"{PLURAL}/status"],
                    }
                ]
            },
            "matchConditions": [
                {"name": "trainer-identity", "expression": TRAINER_IDENTITY},
                # The operator's writes in its own namespace, where it refuses jobs: the refusal is a status write.
                {"name": "not-the-operator", "expression": f"request.userInfo.username != '{OPERATOR_USERNAME}'"},
            ],
            "variables": [
                {
                    "name": "output",
                    "expression": "object.spec.output.location.endsWith('/') ? object.spec.output.location : "
                    "object.spec.output.location + '/'",
                },
                {"name": "checkpoint", "expression": "object.?status.?best.?checkpoint.orValue('')"},
            ],
            "validations": [*ownership, *_trainer_bounds()],
        },
    }


def policy_binding(name: str = POLICY_NAME) -> dict[str, Any]:
    """Binds the policy ``name`` cluster-wide with Deny: a forged write is rejected, not just audited."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }


def manifests() -> list[dict[str, Any]]:
    return [validating_admission_policy(), policy_binding()]
