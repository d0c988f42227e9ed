"""The operator's own permissions, and the roles users get, each in one place.

The Helm chart's ClusterRole is generated from these rules (``make crds`` writes it next to
the CRD), and the end-to-end tests run the operator with a token bound to exactly them.
The user roles (``USER_ROLES``) are generated into the chart and into ``deploy/`` the same way.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api.job import GROUP, KUEUE_GROUP, KUEUE_WORKLOADS, PLURAL
from finetune_operator.api.sweep import SWEEP_PLURAL

READ = ["get", "list", "watch"]
OPERATOR_ACCOUNT = ("finetune-system", "finetune-operator")
"""(namespace, name) of the operator's ServiceAccount as the chart installs it by default: the admission
policies' plain YAML names it; the chart's templates put their release's in."""
OPERATOR_USERNAME = f"system:serviceaccount:{OPERATOR_ACCOUNT[0]}:{OPERATOR_ACCOUNT[1]}"

OPERATOR_RULES: list[dict[str, Any]] = [
    # Every verb is justified in docs/security.md ("The operator's rights, verb by verb"); the e2e tests run the
    # operator with exactly these (cluster-wide, and split as the chart's namespaced mode grants them).
    # get: a job read afresh after a conflict; list/watch: kopf's watch and the resync's check;
    # create: a sweep's trials; patch: the stop annotations with which a sweep prunes one.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": [*READ, "create", "patch"]},
    {"apiGroups": [GROUP], "resources": [SWEEP_PLURAL], "verbs": READ},
    # patch only: status is written as a merge patch, never read through the subresource.
    {"apiGroups": [GROUP], "resources": [f"{SWEEP_PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [GROUP], "resources": [f"{SWEEP_PLURAL}/finalizers"], "verbs": ["update"]},
    # get: not used by the operator, but the per-job Role grants it to the trainer, and RBAC lets a Role be
    # created only by someone who holds what it grants.
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
    # Kueue's Workloads of queued jobs: their messages go to the status, and their changes are watched so it stays
    # live; patch flips spec.active only, to keep a job the user suspended (or a stop being enforced) from being
    # admitted and unsuspended again.
    {"apiGroups": [KUEUE_GROUP], "resources": [KUEUE_WORKLOADS], "verbs": ["list", "watch", "patch"]},
    # /metrics behind authentication (--metrics-auth=kubernetes): who holds a scraper's token, and may it get
    # /metrics. The built-in system:auth-delegator grants the same; it reads no object.
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
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


CLUSTER_SCOPED_RESOURCES = frozenset(
    {
        "namespaces",
        "nodes",
        "persistentvolumes",
        "customresourcedefinitions",
        "clusterroles",
        "clusterrolebindings",
        "priorityclasses",
        "storageclasses",
        "runtimeclasses",
        "validatingadmissionpolicies",
        "validatingadmissionpolicybindings",
        "validatingwebhookconfigurations",
        "mutatingwebhookconfigurations",
        "tokenreviews",
        "subjectaccessreviews",
    }
)
"""Kubernetes resources that have no namespace: a namespaced Role cannot grant them."""


def split_by_scope(rules: list[dict[str, Any]] = OPERATOR_RULES) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(namespaced, cluster_wide)`` rules, so that the chart's namespaced mode grants Roles in
    the watched namespaces and keeps only the cluster-scoped rest in a small ClusterRole."""
    namespaced: list[dict[str, Any]] = []
    cluster_wide: list[dict[str, Any]] = []
    for rule in rules:
        scoped = {r.split("/")[0] in CLUSTER_SCOPED_RESOURCES for r in rule["resources"]}
        if len(scoped) != 1:
            raise ValueError(f"rule mixes namespaced and cluster-scoped resources: {rule['resources']}")
        (cluster_wide if scoped == {True} else namespaced).append(rule)
    return namespaced, cluster_wide


KINDS = [PLURAL, SWEEP_PLURAL]
WRITE = ["create", "update", "patch", "delete", "deletecollection"]
AUTHOR_ROLE = "finetune-author"
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"

_EDIT = {"apiGroups": [GROUP], "resources": KINDS, "verbs": [*READ, *WRITE]}
_VIEW = {"apiGroups": [GROUP], "resources": [*KINDS, *(f"{kind}/status" for kind in KINDS)], "verbs": READ}

USER_ROLES: dict[str, dict[str, Any]] = {
    # Aggregated into the built-in roles: whoever may edit (or view) a namespace may do so for both kinds.
    "finetune-operator-edit": {"aggregate": ["edit", "admin"], "rules": [_EDIT]},
    "finetune-operator-view": {"aggregate": ["view"], "rules": [_VIEW]},
    # A tenant who uses the product and nothing else, bound by a RoleBinding in its namespace: no pod
    # creation, no Secrets. Reads what `kubectl finetune` reads: trainer pods (logs, `kubectl finetune
    # logs`), Events (describe), and the trainer Jobs the operator made.
    AUTHOR_ROLE: {
        "aggregate": [],
        "rules": [
            _EDIT,
            {**_VIEW, "resources": [f"{kind}/status" for kind in KINDS], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": READ},
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": READ},
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": READ},
        ],
    },
}
"""ClusterRoles for users, by name: which built-in roles each aggregates into, and its rules."""


def user_cluster_roles() -> list[dict[str, Any]]:
    """``USER_ROLES`` as ClusterRole manifests (``deploy/user-roles.yaml``)."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {
                "name": name,
                "labels": {
                    "app.kubernetes.io/name": "finetune-operator",
                    **{f"{AGGREGATE}{target}": "true" for target in role["aggregate"]},
                },
            },
            "rules": role["rules"],
        }
        for name, role in USER_ROLES.items()
    ]
