"""Kubeconfig files and API clients for the local control plane."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

CONTEXT = "finetune-local"


def write(path: Path, server: str, ca: Path, *, cert: Path, key: Path, user: str) -> Path:
    """Write a kubeconfig that uses absolute paths to the PEM files (no embedded secrets)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": user}}],
        "current-context": CONTEXT,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def service_account_kubeconfig(
    admin: Path,
    cluster_role: dict[str, Any],
    namespace: str,
    path: Path,
    expiration_seconds: int = 86400,
    *,
    role_rules: list[dict[str, Any]] | None = None,
    role_namespaces: tuple[str, ...] = (),
) -> Path:
    """A kubeconfig for a ServiceAccount bound to exactly ``cluster_role`` (named after both),
    as a pod running under that account would be; created with the ``admin`` kubeconfig. With
    ``role_rules``, it is also bound to a Role of those rules in each of ``role_namespaces`` (the
    chart's namespaced mode)."""
    name = cluster_role["metadata"]["name"]
    subjects = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    with api_client(admin) as api:
        core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
        binding = {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": subjects,
        }
        roles: list[tuple[Any, dict[str, Any]]] = []
        for watched in role_namespaces if role_rules is not None else ():
            metadata = {"name": name, "namespace": watched}
            role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
            roles += [
                (lambda b, ns=watched: rbac.create_namespaced_role(ns, b), {"metadata": metadata, "rules": role_rules}),
                (
                    lambda b, ns=watched: rbac.create_namespaced_role_binding(ns, b),
                    {"metadata": metadata, "roleRef": role_ref, "subjects": subjects},
                ),
            ]
        for create, body in (
            (core.create_namespace, {"metadata": {"name": namespace}}),
            (lambda b: core.create_namespaced_service_account(namespace, b), {"metadata": {"name": name}}),
            (rbac.create_cluster_role, cluster_role),
            (rbac.create_cluster_role_binding, binding),
            *roles,
        ):
            try:
                create(body)
            except ApiException as error:
                if error.status != 409:
                    raise
        token = core.create_namespaced_service_account_token(
            name, namespace, {"spec": {"expirationSeconds": expiration_seconds}}
        ).status.token
    cluster = yaml.safe_load(admin.read_text())["clusters"][0]
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": cluster["name"], "user": name}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


def api_client(kubeconfig: Path, pool: int = 16) -> client.ApiClient:
    """A fresh ApiClient for ``kubeconfig`` (never touches the global default config)."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call,unused-ignore]
    cfg.connection_pool_maxsize = pool
    return client.ApiClient(cfg)


def install_crd(api: client.ApiClient, manifest: dict[str, Any], timeout: float = 30.0) -> None:
    """Create or update a CustomResourceDefinition and wait until it is Established."""
    extensions = client.ApiextensionsV1Api(api)
    name = manifest["metadata"]["name"]
    try:
        extensions.create_custom_resource_definition(manifest)
    except ApiException as error:
        if error.status != 409:
            raise
        current = extensions.read_custom_resource_definition(name)
        extensions.replace_custom_resource_definition(
            name,
            {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": current.metadata.resource_version}},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conditions = extensions.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} not Established after {timeout:.0f}s")


def install_objects(api: client.ApiClient, manifests: list[dict[str, Any]]) -> None:
    """Create or replace CRDs (waiting until Established) and admission policies with their bindings
    (waiting until type-checked), in the order given."""
    crds = [m for m in manifests if m["kind"] == "CustomResourceDefinition"]
    for crd in crds:
        install_crd(api, crd)
    install_admission_policy(api, [m for m in manifests if m["kind"] != "CustomResourceDefinition"])


def install_admission_policy(api: client.ApiClient, manifests: list[dict[str, Any]], timeout: float = 30.0) -> None:
    """Create or replace ValidatingAdmissionPolicies and their bindings; wait until each policy is
    type-checked (the API server reports the generation it has compiled in its status)."""
    admission = client.AdmissionregistrationV1Api(api)
    kinds = {
        "ValidatingAdmissionPolicy": (
            admission.create_validating_admission_policy,
            admission.read_validating_admission_policy,
            admission.replace_validating_admission_policy,
        ),
        "ValidatingAdmissionPolicyBinding": (
            admission.create_validating_admission_policy_binding,
            admission.read_validating_admission_policy_binding,
            admission.replace_validating_admission_policy_binding,
        ),
    }
    for manifest in manifests:
        create, read, replace = kinds[manifest["kind"]]
        name = manifest["metadata"]["name"]
        try:
            create(manifest)
        except ApiException as error:
            if error.status != 409:
                raise
            version = read(name).metadata.resource_version
            replace(name, {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": version}})
    deadline = time.monotonic() + timeout
    for manifest in manifests:
        if manifest["kind"] != "ValidatingAdmissionPolicy":
            continue
        while True:
            policy = admission.read_validating_admission_policy(manifest["metadata"]["name"])
            if policy.status is not None and policy.status.observed_generation == policy.metadata.generation:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"admission policy {policy.metadata.name} not type-checked after {timeout:.0f}s")
            time.sleep(0.1)
