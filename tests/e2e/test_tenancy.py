"""Issue 25 with real identities: a tenant who holds only ``finetune-author`` (by impersonation) cannot get
more from a FineTuneJob or FineTuneSweep than its own rights, and a trainer's real token (TokenRequest, used
by a token-only client) writes only its own job's status.

On a control plane of its own: the operator runs with ``--trainer-image`` set to a scripted trainer and the
author policy is baked with that image, as the chart bakes its ``trainerImage``; those cluster-wide objects
never meet the other tests. The scenarios share the cluster and one operator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_localcluster.kubeconfig import install_objects
from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_operator.api.sweep import SWEEP_PLURAL
from finetune_operator.generators import admission, author_policy
from finetune_operator.generators.crd import USER_ROLES_FILE, chart_api_objects
from finetune_operator.generators.rbac import AUTHOR_ROLE
from finetune_operator.reconcile.children import Names
from finetune_testsupport.pytest_plugin import LocalCluster, own_cluster
from tests.e2e.conftest import Operator, fake_job, running_operator
from tests.e2e.test_sweeps import fake_sweep
from tests.integration.test_trainer_status_policy import token_client

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
TRAINER = "finetune-test/sweep:1"
"""The operator's trainer image here (``--trainer-image``; the chart's ``trainerImage``)."""
FOREIGN = "finetune-test/sweep:2"
"""The same scripted trainer under another name: an image the operator was not configured with."""
TENANT = "alice"
UNREADABLE, READABLE, PRIVILEGED = "prod-db-credentials", "hf-token", "ci-deployer"
VICTIM = "victim"
"""A job of another tenant of the namespace: its per-job ServiceAccount is what an attacker wants."""


@dataclass
class Tenancy:
    cluster: LocalCluster
    namespace: str
    operator: Operator
    tmp: Path
    admin: client.ApiClient
    tenant: client.ApiClient

    def create(self, api: client.ApiClient, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        plural = SWEEP_PLURAL if body["kind"] == "FineTuneSweep" else PLURAL
        created: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, body, dry_run="All" if dry_run else None
        )
        return created

    def get(self, plural: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = client.CustomObjectsApi(self.admin).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name
        )
        return found

    def wait(self, plural: str, name: str, what: str, holds: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while True:
            body = self.get(plural, name)
            if holds(body):
                return body
            assert time.monotonic() < deadline, f"{name}: no {what}: {body.get('status')}\n{self.operator.tail()}"
            time.sleep(0.5)


def _complete(body: dict[str, Any]) -> bool:
    return any(c["type"] == "Complete" and c["status"] == "True" for c in body.get("status", {}).get("conditions", []))


def _refused(call: Callable[[], object]) -> str:
    with pytest.raises(client.ApiException) as error:
        call()
    assert error.value.status in (403, 422), error.value.body
    message: str = json.loads(error.value.body)["message"]
    return message


def _namespace_objects(admin: client.ApiClient, namespace: str) -> None:
    """alice bound to finetune-author; a Secret she may read and one she may not; a privileged
    ServiceAccount (CI: it manages FineTuneJobs and their status)."""
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    for secret in (UNREADABLE, READABLE):
        core.create_namespaced_secret(namespace, {"metadata": {"name": secret}, "stringData": {"token": "x"}})
    core.create_namespaced_service_account(namespace, {"metadata": {"name": PRIVILEGED}})
    roles = {
        "read-hf-token": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [READABLE], "verbs": ["get"]}],
        "ci": [{"apiGroups": [GROUP], "resources": [PLURAL, f"{PLURAL}/status"], "verbs": ["get", "patch", "update"]}],
    }
    subjects = {
        "read-hf-token": {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT},
        "ci": {"kind": "ServiceAccount", "name": PRIVILEGED, "namespace": namespace},
    }
    for name, rules in roles.items():
        rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
    bindings = {**{name: ("Role", name) for name in roles}, "author": ("ClusterRole", AUTHOR_ROLE)}
    subjects["author"] = subjects["read-hf-token"]
    for name, (kind, role) in bindings.items():
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
                "subjects": [subjects[name]],
            },
        )


@pytest.fixture(scope="module")
def tenancy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenancy]:
    tmp = tmp_path_factory.mktemp("tenancy")
    with (
        own_cluster(tmp_path_factory.mktemp("tenancy-cluster")) as cluster,
        cluster.api_client() as admin,
        cluster.api_client() as tenant,
    ):
        baked = {author_policy.JOB_POLICY_NAME, author_policy.SWEEP_POLICY_NAME}
        shipped = [o for o in chart_api_objects() if o["metadata"]["name"] not in baked]
        install_objects(admin, [*shipped, *author_policy.manifests(trainer_images=(TRAINER,))])
        cluster.kubectl("apply", "-f", str(ROOT / USER_ROLES_FILE))
        namespace = cluster.create_namespace("tenant")
        _namespace_objects(admin, namespace)
        tenant.set_default_header("Impersonate-User", TENANT)
        with running_operator(cluster, tmp, extra_args=("--trainer-image", TRAINER)) as operator:
            tenancy = Tenancy(cluster, namespace, operator, tmp, admin, tenant)
            _wait_enforced(tenancy)
            yield tenancy


def _wait_enforced(tenancy: Tenancy) -> None:
    """A new policy reaches the API server's admission chain a moment after it is type-checked."""
    probe = _job(tenancy, "probe", resources={"image": FOREIGN, "gpusPerNode": 1})
    deadline = time.monotonic() + 30
    while True:
        try:
            tenancy.create(tenancy.tenant, probe, dry_run=True)
        except client.ApiException as error:
            if error.status == 403:
                return
            raise
        assert time.monotonic() < deadline, "the author policy is not enforced"
        time.sleep(0.2)


def _job(tenancy: Tenancy, name: str, **spec: Any) -> dict[str, Any]:
    body = fake_job(name, TRAINER, tenancy.tmp)
    del body["spec"]["resources"]["image"]  # the operator's trainer image
    body["spec"].update(spec)
    return body


def _with_token(spec: dict[str, Any], secret: str) -> None:
    spec["model"] = {**spec["model"], "source": "hf://org/model", "tokenSecretRef": {"name": secret}}


def _sweep(tenancy: Tenancy, name: str, change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    body = fake_sweep(name, tenancy.tmp, maxTrials=2)
    del body["spec"]["trialTemplate"]["spec"]["resources"]["image"]
    if change is not None:
        change(body["spec"])
    return body


def _template(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda spec: change(spec["trialTemplate"]["spec"])


def _parameter(parameter: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec["parameters"].append(parameter)


def _resources(**fields: str) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec["resources"].update(fields)


ANOTHER_JOBS_ACCOUNT = Names.of(VICTIM).service_account
ATTACKS: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    "job-foreign-image": ("job", _resources(image=FOREIGN), "spec.resources.image: " + FOREIGN),
    "job-privileged-account": ("job", _resources(serviceAccountName=PRIVILEGED), "spec.resources.serviceAccountName"),
    "job-unreadable-secret": (
        "job",
        lambda spec: _with_token(spec, UNREADABLE),
        f"spec.model.tokenSecretRef.name: {UNREADABLE}",
    ),
    "job-another-jobs-account": (
        "job",
        _resources(serviceAccountName=ANOTHER_JOBS_ACCOUNT),
        f"spec.resources.serviceAccountName: {ANOTHER_JOBS_ACCOUNT}",
    ),
    "sweep-template-image": (
        "sweep",
        _template(_resources(image=FOREIGN)),
        "spec.trialTemplate.spec.resources.image",
    ),
    "sweep-template-account": (
        "sweep",
        _template(_resources(serviceAccountName=ANOTHER_JOBS_ACCOUNT)),
        "spec.trialTemplate.spec.resources.serviceAccountName",
    ),
    "sweep-template-secret": (
        "sweep",
        _template(lambda spec: _with_token(spec, UNREADABLE)),
        "spec.trialTemplate.spec.model.tokenSecretRef.name",
    ),
    "sweep-image-values": (
        "sweep",
        _parameter({"name": "img", "path": "resources.image", "categorical": {"values": [TRAINER, FOREIGN]}}),
        "spec.parameters (img) can set resources.image",
    ),
    "sweep-account-preset": (
        "sweep",
        _parameter(
            {
                "name": "who",
                "categorical": {"presets": [{"label": "ci", "set": {"resources.serviceAccountName": PRIVILEGED}}]},
            }
        ),
        "spec.parameters (who) can set resources.serviceAccountName",
    ),
    "sweep-secret-values": (
        "sweep",
        lambda spec: (
            _with_token(spec["trialTemplate"]["spec"], READABLE),
            _parameter(
                {
                    "name": "token",
                    "path": "model.tokenSecretRef.name",
                    "categorical": {"values": [READABLE, UNREADABLE]},
                }
            )(spec),
        ),
        "spec.parameters (token) can set model.tokenSecretRef.name",
    ),
}


def test_the_shipped_policies_type_check_cleanly(tenancy: Tenancy) -> None:
    names = [admission.POLICY_NAME, admission.IDENTITY_POLICY_NAME]
    names += [author_policy.JOB_POLICY_NAME, author_policy.SWEEP_POLICY_NAME]
    policies = client.AdmissionregistrationV1Api(tenancy.admin)
    for name in names:
        checking = policies.read_validating_admission_policy(name).status.type_checking
        warnings = checking.expression_warnings if checking is not None else None
        assert not warnings, (name, warnings)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_of_a_tenant_is_refused_naming_the_field(tenancy: Tenancy, attack: str) -> None:
    """On main: every one admitted (only RBAC on the FineTuneJob itself was checked)."""
    kind, change, named = ATTACKS[attack]
    if kind == "job":
        body = _job(tenancy, attack)
        change(body["spec"])
    else:
        body = _sweep(tenancy, attack, change)
    message = _refused(lambda: tenancy.create(tenancy.tenant, body))
    assert named in message and TENANT in message, message


def test_what_the_tenant_may_do_itself_is_admitted_and_an_admin_may_do_more(tenancy: Tenancy) -> None:
    readable = _job(tenancy, "readable")
    _with_token(readable["spec"], READABLE)
    explicit = _job(tenancy, "explicit", resources={"image": TRAINER, "gpusPerNode": 1})
    for body in (readable, explicit):
        tenancy.create(tenancy.tenant, body, dry_run=True)
    foreign = _job(tenancy, "foreign", resources={"image": FOREIGN, "serviceAccountName": PRIVILEGED})
    _with_token(foreign["spec"], UNREADABLE)
    tenancy.create(tenancy.admin, foreign, dry_run=True)  # the admin may create pods and read Secrets


def test_a_tenant_cannot_change_a_field_to_what_it_lacks(tenancy: Tenancy) -> None:
    """Update: the fields that changed are checked (a suspended job's spec may change)."""
    tenancy.create(tenancy.tenant, _job(tenancy, "mutable", suspend=True))
    patch = {"spec": {"resources": {"image": FOREIGN}}}
    custom = client.CustomObjectsApi(tenancy.tenant)
    call = lambda: custom.patch_namespaced_custom_object(GROUP, VERSION, tenancy.namespace, PLURAL, "mutable", patch)  # noqa: E731
    message = _refused(call)
    assert f"spec.resources.image: {FOREIGN}" in message, message
    label = {"metadata": {"labels": {"team": "nlp"}}, "spec": {"hyperparameters": {"learningRate": 1e-4}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, tenancy.namespace, PLURAL, "mutable", label)


@pytest.fixture(scope="module")
def finished(tenancy: Tenancy) -> dict[str, dict[str, Any]]:
    """The tenant's ordinary job and sweep, an admin's sweep whose trials (the operator's writes) use another
    image, and a suspended job of CI's ServiceAccount: each once its status holds what the tests read."""
    tenancy.create(tenancy.tenant, _job(tenancy, VICTIM))
    tenancy.create(tenancy.tenant, _sweep(tenancy, "search"))
    admins = _sweep(tenancy, "admins", _template(_resources(image=FOREIGN)))
    admins["spec"]["maxTrials"] = 1
    tenancy.create(tenancy.admin, admins)
    ci = _job(tenancy, "ci-job", suspend=True, resources={"serviceAccountName": PRIVILEGED, "gpusPerNode": 1})
    tenancy.create(tenancy.admin, ci)
    recorded = lambda body: bool(body.get("status", {}).get("workload", {}).get("serviceAccount"))  # noqa: E731
    return {
        VICTIM: tenancy.wait(PLURAL, VICTIM, "Complete", _complete),
        "search": tenancy.wait(SWEEP_PLURAL, "search", "Complete", _complete),
        "admins": tenancy.wait(SWEEP_PLURAL, "admins", "Complete", _complete),
        "ci-job": tenancy.wait(PLURAL, "ci-job", "a recorded ServiceAccount", recorded),
    }


def test_the_tenants_ordinary_job_and_sweep_complete(finished: dict[str, dict[str, Any]]) -> None:
    assert finished[VICTIM]["status"]["best"]["metric"] == "accuracy"
    assert finished["search"]["status"]["trialCounts"]["total"] == 2
    assert finished["admins"]["status"]["trialCounts"]["total"] == 1, "the operator's trials are its own writes"


def test_each_job_records_the_account_its_pods_run_as(finished: dict[str, dict[str, Any]]) -> None:
    assert finished[VICTIM]["status"]["workload"]["serviceAccount"] == Names.of(VICTIM).service_account
    assert finished["ci-job"]["status"]["workload"]["serviceAccount"] == PRIVILEGED


def _progress(step: int) -> dict[str, Any]:
    return {"status": {"progress": {"step": step, "totalSteps": 100, "percent": float(step)}}}


def test_a_trainer_token_writes_only_its_own_jobs_status(tenancy: Tenancy, finished: dict[str, dict[str, Any]]) -> None:
    """The victim's per-job token (its name read from the status, as the policy does) and CI's token (a
    user-chosen ServiceAccount with rights on every FineTuneJob of the namespace). On main: CI's token
    patched the victim's status and its own job's spec."""
    for job, other in ((VICTIM, "ci-job"), ("ci-job", VICTIM)):
        _only_its_own_status(tenancy, finished[job]["status"]["workload"]["serviceAccount"], job, other)


def _only_its_own_status(tenancy: Tenancy, account: str, job: str, other: str) -> None:
    ns = tenancy.namespace
    with token_client(tenancy.cluster, ns, account) as api:
        custom = client.CustomObjectsApi(api)

        def status(name: str, body: dict[str, Any]) -> dict[str, Any]:
            patched: dict[str, Any] = custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, PLURAL, name, body
            )
            return patched

        def main(name: str, body: dict[str, Any]) -> object:
            return custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, body)

        assert status(job, _progress(42))["status"]["progress"]["step"] == 42, "its own progress lands"
        refused = [
            _refused(lambda: status(other, _progress(7))),
            _refused(lambda: main(job, {"spec": {"hyperparameters": {"learningRate": 0.5}}})),
        ]
        if job == VICTIM:  # per-job RBAC: its own job only, status only
            _refused(lambda: main(other, {"metadata": {"labels": {"forged": "yes"}}}))
        else:  # CI's RBAC allows both; the policies refuse them, naming the recorded identity
            assert all("status.workload.serviceAccount" in m for m in refused), refused
    assert tenancy.get(PLURAL, other)["status"].get("progress", {}).get("step") != 7
