"""The kinds a FineTuneJob owns, listed once: the watches, the resync's check, the API paths and the
order of creation all read this table. Pure data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChildKind:
    kind: str
    group: str
    version: str
    plural: str
    after: tuple[str, ...] = ()
    """The kinds this one is created after (those a job has: a Service only with several nodes), each
    found ours: a conflict or a refusal on one keeps this one uncreated. The rest are created at once."""
    content_free: bool = False
    """Nothing to drift: never rewritten (the operator may not update it)."""
    content: tuple[str, ...] = ()
    """Dotted paths of what the child holds: an edit of any of them is drift, reverted on the child's next
    event. Only fields the API server never defaults, so a child as stored hashes as it was rendered."""

    @property
    def collection(self) -> str:
        """The namespaced collection's API path, with ``{}`` for the namespace."""
        prefix = "/api/v1" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{prefix}/namespaces/{{}}/{self.plural}"


RBAC = "rbac.authorization.k8s.io"
CHILD_KINDS = (
    ChildKind("ConfigMap", "", "v1", "configmaps", content=("data", "binaryData", "immutable")),
    ChildKind("ServiceAccount", "", "v1", "serviceaccounts", content_free=True),
    ChildKind(
        "Service",
        "",
        "v1",
        "services",
        # Not clusterIPs, ipFamilies, sessionAffinity...: the API server fills those in.
        content=tuple(
            f"spec.{field}"
            for field in ("type", "clusterIP", "selector", "ports", "publishNotReadyAddresses", "externalIPs")
        ),
    ),
    ChildKind("Role", RBAC, "v1", "roles", content=("rules",)),
    # The API server checks that a binder without ``bind`` holds what the Role grants: the Role must exist,
    # and ours (a RoleBinding to someone else's Role would hand the trainer its rules).
    ChildKind("RoleBinding", RBAC, "v1", "rolebindings", after=("Role",), content=("roleRef", "subjects")),
    # Its pods mount the config, run as the account and meet at the Service. The Role and RoleBinding only
    # let the trainer report, and it waits for them (``finetune_trainer.reporting``): waiting here cost each
    # job two escalation checks, >= 100 ms each (a consistent LIST of ClusterRoleBindings per create).
    ChildKind("Job", "batch", "v1", "jobs", after=("ConfigMap", "ServiceAccount", "Service")),
)
"""Everything a FineTuneJob owns. The trainer Job (batch/v1) is watched for its status; the others
only for their deletion."""
TRAINER_JOB = CHILD_KINDS[-1]
SUPPORTING_KINDS = CHILD_KINDS[:-1]
"""The children beside the trainer Job: config, identity, rendezvous Service."""
BY_KIND = {k.kind: k for k in CHILD_KINDS}
