"""The Helm chart: values it references exist and its schema refuses typos; dashboard and alerts use
metrics the operator serves; rendered by the real helm, its RBAC, CRD and PodMonitor match the operator."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_devtools.helm import ensure_helm
from finetune_operator.api.job import FineTuneJob
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.generators import admission, operator_policy
from finetune_operator.generators.crd import build_crd, build_sweep_crd, chart_api_objects
from finetune_operator.generators.rbac import CLUSTER_SCOPED_RESOURCES, split_by_scope, user_cluster_roles
from finetune_operator.reconcile.children import Settings, batch_job

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"


def _served_series() -> set[str]:
    names: set[str] = set()
    for family in OperatorMetrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def _series_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(finetune_[a-z_]+)", expr))


def test_dashboard_and_alerts_only_use_served_metrics() -> None:
    served = _served_series()
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    exprs += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    used = set().union(*(_series_in(e) for e in exprs))
    assert used, "no metrics referenced"
    assert used <= served, f"unknown series: {sorted(used - served)}"


def _has_path(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_templates_reference_existing_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for template in (CHART / "templates").glob("*"):
        for path in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()):
            assert _has_path(values, path), f"{template.name}: .Values.{path} is not in values.yaml"


def test_chart_files_exist_for_every_files_get() -> None:
    for template in (CHART / "templates").glob("*"):
        for name in re.findall(r'\.Files\.Get "([^"]+)"', template.read_text()):
            assert (CHART / name).is_file(), f"{template.name} reads missing {name}"


# --- rendered with the real helm (built from the Go module proxy, cached: `make helm`) ---


@pytest.fixture(scope="module")
def helm() -> Path:
    return ensure_helm()


def _render(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", "rel", str(CHART), "-n", "finetune-system", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _objects(helm: Path, *args: str) -> list[dict[str, Any]]:
    proc = _render(helm, *args)
    assert proc.returncode == 0, proc.stderr
    return [o for o in yaml.safe_load_all(proc.stdout) if o]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (["--set", "watchAllNamespace=false"], "watchAllNamespace"),  # top level
        (["--set", "metrics.serviceMonitr.enabled=true"], "serviceMonitr"),  # a section
        (["--set", "crds.kep=false"], "kep"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),  # wrong enum
        (["--set-json", 'resyncSeconds="30"'], "resyncSeconds"),  # wrong type
        (["--set-json", "metrics.port=80000"], "port"),
        (["--set-json", 'trainerMetricsPort="9400"'], "trainerMetricsPort"),
        (["--set", "watchAllNamespaces=false"], "namespaces"),  # namespaced mode needs namespaces
    ],
)
def test_values_typos_and_wrong_types_are_refused_naming_the_key(helm: Path, values: list[str], named: str) -> None:
    proc = _render(helm, *values)
    assert proc.returncode != 0, f"helm accepted {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert named in proc.stderr


def test_namespaced_mode_grants_roles_only_in_the_listed_namespaces(helm: Path) -> None:
    objs = _objects(helm, "-f", str(CHART / "ci" / "namespaced-values.yaml"))
    namespaced, cluster_wide = split_by_scope()
    roles = {o["metadata"]["namespace"]: o for o in objs if o["kind"] == "Role"}
    assert set(roles) == {"ml-team", "research"}
    assert all(role["rules"] == namespaced for role in roles.values())
    bindings = {o["metadata"]["namespace"] for o in objs if o["kind"] == "RoleBinding"}
    assert bindings == {"ml-team", "research"}
    operator_role = next(o for o in objs if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "finetune-operator")
    assert operator_role["rules"] == cluster_wide
    granted = {r for rule in operator_role["rules"] for r in rule["resources"]}
    assert granted <= CLUSTER_SCOPED_RESOURCES, "a namespaced resource is granted cluster-wide"
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ml-team" in args and "--namespace=research" in args and "--all-namespaces" not in args


def test_default_mode_grants_every_rule_cluster_wide(helm: Path) -> None:
    objs = _objects(helm)
    operator_role = next(o for o in objs if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "finetune-operator")
    namespaced, cluster_wide = split_by_scope()
    assert operator_role["rules"] == cluster_wide + namespaced
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding")]


@pytest.mark.parametrize("values", [[], ["-f", str(CHART / "ci" / "namespaced-values.yaml")]])
def test_user_roles_are_the_generated_ones_in_both_modes(helm: Path, values: list[str]) -> None:
    """finetune-author, and edit/view aggregated for both kinds (on main: edit/view named finetunejobs only)."""
    rendered = {o["metadata"]["name"]: o for o in _objects(helm, *values) if o["kind"] == "ClusterRole"}
    for role in user_cluster_roles():
        chart_role = rendered[role["metadata"]["name"]]
        assert chart_role["rules"] == role["rules"]
        assert role["metadata"]["labels"].items() <= chart_role["metadata"]["labels"].items()


def test_crd_is_the_generated_one_kept_on_uninstall_and_optional(helm: Path) -> None:
    crds = sorted(
        (o for o in _objects(helm) if o["kind"] == "CustomResourceDefinition"), key=lambda o: o["metadata"]["name"]
    )
    assert len(crds) == 2
    for crd in crds:
        assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert crds == [build_crd(), build_sweep_crd()]
    unkept = [o for o in _objects(helm, "--set", "crds.keep=false") if o["kind"] == "CustomResourceDefinition"]
    assert "annotations" not in unkept[0]["metadata"]
    assert not [o for o in _objects(helm, "--set", "crds.enabled=false") if o["kind"] == "CustomResourceDefinition"]
    assert not list(CHART.glob("crds/*")), "helm never upgrades crds/: the CRD must be a template"


def test_pod_monitor_selects_the_trainer_pods_and_their_metrics_port(helm: Path) -> None:
    objs = _objects(helm, "-f", str(CHART / "ci" / "monitoring-values.yaml"))
    monitor = next(o for o in objs if o["kind"] == "PodMonitor")
    manifest = yaml.safe_load((ROOT / "examples" / "minilm-rotten-tomatoes.yaml").read_text())
    manifest.setdefault("metadata", {}).setdefault("namespace", "ml-team")
    pod = batch_job(FineTuneJob.model_validate(manifest), Settings())["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    scoped = _objects(
        helm, "-f", str(CHART / "ci" / "namespaced-values.yaml"), "--set", "metrics.podMonitor.enabled=true"
    )
    scoped_monitor = next(o for o in scoped if o["kind"] == "PodMonitor")
    assert scoped_monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-team", "research"]}


def test_the_demo_and_the_tests_install_every_crd_and_admission_policy_the_chart_does(helm: Path) -> None:
    """``chart_api_objects`` is what `make demo` and the test fixtures install: without the advice policy
    there, the README's "kubectl apply warns" was not true on the demo's cluster."""
    api_kinds = ("CustomResourceDefinition", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    rendered = {(o["kind"], o["metadata"]["name"]): o for o in _objects(helm) if o["kind"] in api_kinds}
    installed = {(o["kind"], o["metadata"]["name"]): o for o in chart_api_objects()}
    assert set(installed) == set(rendered)
    for key, obj in installed.items():
        assert rendered[key]["spec"] == obj["spec"], key


def test_the_operator_writes_policy_names_the_releases_account_and_the_operator_its_namespace(helm: Path) -> None:
    """The plain YAML names the default identity (finetune-system/finetune-operator); the chart its own."""
    objs = _objects(helm, "-n", "platform")
    policy = next(o for o in objs if o["metadata"]["name"] == operator_policy.POLICY_NAME)
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert condition == "request.userInfo.username == 'system:serviceaccount:platform:finetune-operator'"
    status_policy = next(o for o in objs if o["metadata"]["name"] == admission.POLICY_NAME)
    exempt = {c["name"]: c["expression"] for c in status_policy["spec"]["matchConditions"]}["not-the-operator"]
    assert exempt == "request.userInfo.username != 'system:serviceaccount:platform:finetune-operator'"
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    assert deployment["metadata"]["namespace"] == "platform"
    assert "--operator-namespace=platform" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    disabled = _objects(helm, "--set", "operatorWritesPolicy.enabled=false")
    assert not [o for o in disabled if o["metadata"]["name"] == operator_policy.POLICY_NAME]


def test_network_policies_select_the_pods_the_operator_renders_and_their_ports(helm: Path) -> None:
    """The local cluster has no CNI, so nothing enforces them there: their selectors and ports are checked
    against the pods as rendered (here) and the objects by the API server's dry-run (tests/integration)."""
    objs = _objects(helm, "--set", "metrics.networkPolicy.enabled=true", "--set-json", 'namespaces=["ml-team"]')
    policies = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {
        ("finetune-system", "finetune-operator-metrics"),
        ("ml-team", "finetune-operator-trainers"),
    }
    manifest = yaml.safe_load((ROOT / "examples" / "minilm-rotten-tomatoes.yaml").read_text())
    manifest.setdefault("metadata", {}).setdefault("namespace", "ml-team")
    pod = batch_job(FineTuneJob.model_validate(manifest), Settings())["spec"]["template"]
    trainers = policies["ml-team", "finetune-operator-trainers"]["spec"]
    assert trainers["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    peers, scrapers = trainers["ingress"]
    assert peers == {"from": [{"podSelector": trainers["podSelector"]}]}, "all ports, from this namespace's trainers"
    assert scrapers["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    trainer_ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {p["port"] for p in scrapers["ports"]} == {"metrics"} <= trainer_ports
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    operator = policies["finetune-system", "finetune-operator-metrics"]["spec"]
    operator_pod = deployment["spec"]["template"]
    assert operator["podSelector"]["matchLabels"].items() <= operator_pod["metadata"]["labels"].items()
    operator_ports = {p["name"] for c in operator_pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {p["port"] for p in operator["ingress"][0]["ports"]} == {"metrics"} <= operator_ports
    assert not [o for o in _objects(helm) if o["kind"] == "NetworkPolicy"], "off by default"
