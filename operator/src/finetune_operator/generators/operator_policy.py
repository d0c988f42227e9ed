"""An admission policy on the operator's own writes: its reach bounded to the children of our kinds.

In cluster mode the operator may create Jobs, ConfigMaps, Services, Roles and RoleBindings in every
namespace; RBAC cannot say "only for a FineTuneJob". This ValidatingAdmissionPolicy, matched on the
operator's own identity (``request.userInfo.username``), can: every object it creates, updates or
deletes among ``GUARDED`` must carry its managed-by label and a controller owner reference to one of
our kinds (a FineTuneJob; for a sweep's trials, a FineTuneSweep). An owner reference names no
namespace: it always means the child's own, and a child whose owner does not exist there is removed
by the garbage collector. A RoleBinding may bind only the job's Role to ServiceAccounts of its own
namespace. A stolen operator token, or a bug, thus cannot create a pod-running Job, an
``externalIPs`` Service or a binding anywhere outside that shape.

Generated from ``reconcile.kinds.CHILD_KINDS`` (``python -m finetune_operator.generators.crd``): into ``deploy/``
for the chart's default identity, and into the chart, which puts its own release's ServiceAccount in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

from finetune_operator.api.job import GROUP, KIND, PLURAL
from finetune_operator.api.sweep import SWEEP_KIND
from finetune_operator.generators.admission import policy_binding
from finetune_operator.generators.rbac import OPERATOR_USERNAME
from finetune_operator.reconcile.children import JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from finetune_operator.reconcile.kinds import CHILD_KINDS

POLICY_NAME: Final = f"finetune-operator-writes.{GROUP}"
POLICY_FILE: Final = Path("deploy") / "operator-writes-policy.yaml"
CHART_POLICY_FILE: Final = Path("charts") / "finetune-operator" / "files" / "operator-writes-policy.yaml"

GUARDED: Final[tuple[tuple[str, str, tuple[str, ...], str], ...]] = (
    *((k.group, k.plural, ("CREATE", "UPDATE", "DELETE"), KIND) for k in CHILD_KINDS),
    # A sweep's trials, and the stop annotations with which it prunes one.
    (GROUP, PLURAL, ("CREATE", "UPDATE"), SWEEP_KIND),
    # Trainer pods left terminating on a lost node.
    ("", "pods", ("DELETE",), "Job"),
)
"""(API group, resource, operations, owner kind) of everything the operator writes."""

_OWNER_KIND = f"request.resource.resource == '{PLURAL}' ? '{SWEEP_KIND}' : '{KIND}'"
"""CEL: the kind of ours that must control the object (``GUARDED``'s last column; pods are checked by label)."""


def _validation(expression: str, message: str) -> dict[str, Any]:
    return {"expression": expression, "message": message, "reason": "Forbidden"}


_VALIDATIONS = [
    _validation(
        f"variables.target.metadata.?labels[?'{MANAGED_BY_LABEL}'].orValue('') == '{MANAGED_BY}'",
        f"the operator may write only objects labelled {MANAGED_BY_LABEL}={MANAGED_BY}",
    ),
    _validation(
        # a trainer pod (deleted only when stuck terminating) is its Job's: its label says whose
        "request.resource.resource == 'pods' ? "
        f"variables.target.metadata.?labels[?'{JOB_LABEL}'].hasValue() : "
        "variables.target.metadata.?ownerReferences.orValue([]).exists(r, r.?controller.orValue(false)"
        f" && r.apiVersion.startsWith('{GROUP}/') && r.kind == variables.ownerKind)",
        f"the operator may write only objects controlled by a {KIND} (a trial: by a {SWEEP_KIND}) of their namespace",
    ),
    _validation(
        "request.resource.resource != 'rolebindings' || request.operation == 'DELETE' || "
        "(object.roleRef.kind == 'Role' && object.subjects.all(s, s.kind == 'ServiceAccount' && "
        "s.namespace == request.namespace))",
        "the operator may bind only a Role of the namespace to ServiceAccounts of the namespace",
    ),
]


def validating_admission_policy(username: str = OPERATOR_USERNAME) -> dict[str, Any]:
    """The policy, matched on the operator's identity only: users and controllers are not concerned."""
    rules = [
        {"apiGroups": [group], "apiVersions": ["*"], "operations": list(operations), "resources": [resource]}
        for group, resource, operations, _ in GUARDED
    ]
    spec = {
        "failurePolicy": "Fail",
        "matchConstraints": {"resourceRules": rules},
        "matchConditions": [{"name": "operator-identity", "expression": f"request.userInfo.username == '{username}'"}],
        "variables": [
            # A deletion has no new object: the one being deleted must be ours.
            {"name": "target", "expression": "request.operation == 'DELETE' ? oldObject : object"},
            {"name": "ownerKind", "expression": _OWNER_KIND},
        ],
        "validations": _VALIDATIONS,
    }
    metadata = {"name": POLICY_NAME, "labels": {"app.kubernetes.io/name": "finetune-operator"}}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": metadata,
        "spec": spec,
    }


def manifests(username: str = OPERATOR_USERNAME) -> list[dict[str, Any]]:
    return [validating_admission_policy(username), policy_binding(POLICY_NAME)]


def render_policy() -> str:
    header = (
        "# Generated by `python -m finetune_operator.generators.crd` from "
        "finetune_operator.generators.operator_policy. Do not edit.\n"
    )
    return header + yaml.safe_dump_all(manifests(), sort_keys=False, width=120)
