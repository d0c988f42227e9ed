"""The operator's own permissions: the least it needs, in one place.

The Helm chart's ClusterRole is generated from these rules (``make crds`` writes it next to
the CRD), and the end-to-end tests run the operator with a token bound to exactly them.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api import GROUP, PLURAL

READ = ["get", "list", "watch"]

OPERATOR_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": READ},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    # Children carry `blockOwnerDeletion: true`; setting it needs `update` on the owner's finalizers
    # where the OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift, the local tests).
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": [*READ, "create", "patch", "delete"]},
    # update: children edited while the job was suspended (or by hand) are brought back to the spec.
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": [*READ, "create", "update"]},
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": [*READ, "create"]},
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": [*READ, "create", "update"],
    },
    # delete: only pods left terminating long after their grace period (a lost node).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # kopf discovers resources and namespaces at start-up.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]
"""Creating the per-job Role needs no extra grant: it holds only permissions listed here."""


def cluster_role(name: str = "finetune-operator") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "rules": OPERATOR_RULES,
    }
