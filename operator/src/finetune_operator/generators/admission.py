"""The admission policies that split status between its two writers and give each job its own trainer
identity, generated from the API models.

The trainer's token may patch its job's status, and so may any code in its pod (a
``trustRemoteCode`` model, a user-chosen ServiceAccount). RBAC cannot limit a patch to some
keys; a ``ValidatingAdmissionPolicy`` can. It lets the trainer change only
``TRAINER_STATUS_KEYS``, within bounds, and keeps every other status key (``OPERATOR_STATUS_KEYS``) the operator's.

Who is held to it: every ServiceAccount of the FineTuneJob's own namespace. That is every identity
a pod next to the job can run as (pods can only use ServiceAccounts of their own namespace). The
operator runs as a ServiceAccount of its own namespace (``finetune-system`` in the chart) and
users as themselves, so neither is matched. Of those ServiceAccounts, only the one the operator
recorded in the job's ``status.workload.serviceAccount`` (the per-job account or
``spec.resources.serviceAccountName``; read from ``oldObject``, since per-job names are hashed
and the operator's record is the source) may write the job's status at all, and it may not write
the FineTuneJob itself (spec, metadata, deletion): a pod cannot take another job's identity, nor
change its own job around the spec's validation. Jobs that share a user-chosen ServiceAccount
share its rights (docs/security.md). The operator's own status writes in its namespace (where it
refuses every job, which is a status write) are exempt by name.

``python -m finetune_operator.generators.crd`` writes the policies to ``deploy/`` and the chart;
``--check`` fails when those files drift from this module.
"""

from __future__ import annotations

import json
from typing import Any

from finetune_operator.api.job import (
    GROUP,
    MAX_ARTIFACTS,
    MAX_CHECKPOINT_URI_LENGTH,
    MAX_EVALUATIONS,
    MAX_METRIC_NAME_LENGTH,
    MAX_METRICS_PER_EVALUATION,
    OPERATOR_STATUS_KEYS,
    PLURAL,
    TRAINER_STATUS_KEYS,
    FineTuneJobStatus,
)
from finetune_operator.generators.rbac import OPERATOR_USERNAME

POLICY_NAME = f"finetune-trainer-status.{GROUP}"
IDENTITY_POLICY_NAME = f"finetune-trainer-identity.{GROUP}"
TRAINER_IDENTITY = "request.userInfo.username.startsWith('system:serviceaccount:' + request.namespace + ':')"
"""CEL: the request comes from a ServiceAccount of the job's namespace (see the module docstring)."""
RECORDED = "oldObject.?status.?workload.?serviceAccount.orValue('')"
"""CEL: the ServiceAccount the operator recorded as the one the job's pods run as ('' before it did)."""
_IS_RECORDED = f"request.userInfo.username == 'system:serviceaccount:' + request.namespace + ':' + {RECORDED}"

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
        _validation(
            "object.?status.?artifacts == oldObject.?status.?artifacts || "
            f"(size(object.?status.?artifacts.orValue([])) <= {MAX_ARTIFACTS} && "
            "object.?status.?artifacts.orValue([]).all(a, "
            f"size(a.uri) <= {MAX_CHECKPOINT_URI_LENGTH} && a.uri.startsWith(variables.output) && "
            "!a.uri.matches('(^|/)[.][.](/|$)')))",
            f"status.artifacts: at most {MAX_ARTIFACTS}, each uri inside the job's spec.output.location",
        ),
    ]


def _identity() -> dict[str, Any]:
    """Only the job's own recorded ServiceAccount reports its status."""
    return {
        "expression": _IS_RECORDED,
        "messageExpression": "'status: ' + request.userInfo.username + ' is not the ServiceAccount this job runs as "
        f"(status.workload.serviceAccount: ' + {RECORDED} + '); only that one may write its status'",
        "message": "status: only the ServiceAccount recorded in status.workload.serviceAccount may write it",
        "reason": "Forbidden",
    }


def policy(
    name: str,
    rule: tuple[list[str], str, str],
    match_conditions: list[dict[str, str]],
    validations: list[dict[str, Any]],
    variables: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A ValidatingAdmissionPolicy of ours: ``rule`` is (operations, resource, apiVersion) in our group; a
    rule that cannot be evaluated denies (failurePolicy Fail)."""
    operations, resource, version = rule
    spec: dict[str, Any] = {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                {"apiGroups": [GROUP], "apiVersions": [version], "operations": operations, "resources": [resource]}
            ]
        },
        "matchConditions": match_conditions,
    }
    if variables:
        spec["variables"] = variables
    spec["validations"] = validations
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "spec": spec,
    }


def validating_admission_policy() -> dict[str, Any]:
    """The ValidatingAdmissionPolicy: only the job's own trainer identity writes its status, and only the
    trainer's status keys."""
    ownership = [
        _validation(
            _unchanged(key),
            f"status.{key} is the operator's: a trainer may change only {_TRAINER_KEYS}",
        )
        for key in OPERATOR_STATUS_KEYS
    ]
    return policy(
        POLICY_NAME,
        (["UPDATE"], f"{PLURAL}/status", "*"),
        [
            {"name": "trainer-identity", "expression": TRAINER_IDENTITY},
            # The operator's writes in its own namespace, where it refuses jobs: the refusal is a status write.
            {"name": "not-the-operator", "expression": f"request.userInfo.username != '{OPERATOR_USERNAME}'"},
        ],
        [_identity(), *ownership, *_trainer_bounds()],
        variables=[
            {
                "name": "output",
                "expression": "object.spec.output.location.endsWith('/') ? object.spec.output.location : "
                "object.spec.output.location + '/'",
            },
            {"name": "checkpoint", "expression": "object.?status.?best.?checkpoint.orValue('')"},
        ],
    )


def identity_policy() -> dict[str, Any]:
    """The ValidatingAdmissionPolicy: a job's trainer identity never writes the FineTuneJob itself."""
    return policy(
        IDENTITY_POLICY_NAME,
        (["UPDATE", "DELETE"], PLURAL, "*"),
        [{"name": "trainer-identity", "expression": TRAINER_IDENTITY}],
        [
            {
                "expression": f"!({_IS_RECORDED})",
                "messageExpression": "'metadata/spec: ' + request.userInfo.username + ' is the trainer identity "
                "of this job (status.workload.serviceAccount): it may write only its status, not the FineTuneJob "
                "itself'",
                "message": "a job's trainer identity may not write the FineTuneJob itself, only its status",
                "reason": "Forbidden",
            }
        ],
    )


def policy_binding(name: str = POLICY_NAME) -> dict[str, Any]:
    """Binds a policy cluster-wide with Deny: a forged write is rejected, not just audited."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }


def manifests() -> list[dict[str, Any]]:
    return [
        validating_admission_policy(),
        policy_binding(),
        identity_policy(),
        policy_binding(IDENTITY_POLICY_NAME),
    ]
