"""The generated CRD: in sync with the models, structural, self-describing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.generators.crd import (
    CHART_CRD_DIR,
    CHART_RULES_FILE,
    CHART_USER_ROLES_FILE,
    CLUSTER_RULES_NAME,
    CRD_FILE,
    USER_ROLES_FILE,
    build_crd,
    generated_files,
    render_crd,
    render_rules,
    render_user_roles,
)

ROOT = Path(__file__).resolve().parents[2]


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_every_generated_file_is_current() -> None:
    stale = [str(path) for path, text in generated_files().items() if (ROOT / path).read_text() != text]
    assert not stale, f"stale generated files (run `make crds`): {stale}"


def test_checked_in_crd_matches_the_models() -> None:
    checked_in = (ROOT / "crds" / CRD_FILE).read_text()
    assert checked_in == render_crd(), "crds/ is stale: run `make crds`"


def test_chart_rbac_rules_match_the_operator_rules() -> None:
    namespaced, cluster_wide = render_rules()
    assert (ROOT / CHART_RULES_FILE).read_text() == namespaced, "chart RBAC is stale: run `make crds`"
    assert (ROOT / CHART_RULES_FILE).with_name(CLUSTER_RULES_NAME).read_text() == cluster_wide, "run `make crds`"


def test_user_roles_match_the_table() -> None:
    plain, chart = render_user_roles()
    assert (ROOT / USER_ROLES_FILE).read_text() == plain, "deploy/ user roles are stale: run `make crds`"
    assert (ROOT / CHART_USER_ROLES_FILE).read_text() == chart, "chart user roles are stale: run `make crds`"


def test_chart_uses_the_generated_crd() -> None:
    chart_crd = ROOT / CHART_CRD_DIR / CRD_FILE
    assert not chart_crd.is_symlink(), "helm package and GitOps tools need the file itself"
    assert chart_crd.read_text() == render_crd(), "the chart's CRD is stale: run `make crds`"


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
            assert forbidden not in node, f"{path} has {forbidden}"
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"


def test_every_spec_field_is_described_for_kubectl_explain() -> None:
    spec = _schema()["properties"]["spec"]
    fields = [(path, node) for path, node in _nodes(spec, "spec") if path != "spec" and path[-2:] not in ("[]", "{}")]
    missing = [path for path, node in fields if not node.get("description")]
    assert not missing, f"fields without description: {missing}"


def test_optional_fields_are_nullable_and_required_ones_listed() -> None:
    spec = _schema()["properties"]["spec"]
    assert spec["required"] == ["model", "dataset", "output"]
    freeze = spec["properties"]["freeze"]
    assert freeze["properties"]["layers"]["nullable"] is True
    assert freeze["properties"]["lora"]["nullable"] is True
    assert freeze["default"] == {
        "strategy": "none",
        "embeddings": False,
        "frozenModules": [],
        "trainableModules": [],
        "cacheActivations": False,
    }


def test_numbers_keep_their_bounds() -> None:
    hp = _schema()["properties"]["spec"]["properties"]["hyperparameters"]["properties"]
    assert hp["learningRate"]["minimum"] == 0
    assert hp["learningRate"]["exclusiveMinimum"] is True
    assert hp["batchSize"]["type"] == "integer"
    early = _schema()["properties"]["spec"]["properties"]["earlyStopping"]["properties"]
    assert early["patience"]["minimum"] == 1
    assert early["patience"]["default"] == 3


def test_cel_rules_are_bounded_and_name_a_field() -> None:
    rules = [(path, rule) for path, node in _nodes(_schema()) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 20
    for path, rule in rules:
        assert rule["message"], path
        if path == "":  # the object's own rules are about metadata, which the schema does not declare
            assert rule["message"].startswith("metadata."), rule
        elif "oldSelf" not in rule["rule"] and "isQuantity" not in rule["rule"]:
            assert rule.get("fieldPath"), f"{path}: {rule}"
    immutable = [r for _, r in rules if "oldSelf" in r["rule"]]
    assert {r["fieldPath"] for r in immutable} >= {".model", ".dataset", ".freeze", ".hyperparameters", ".output"}
    for path, node in _nodes(_schema()["properties"]["spec"], "spec"):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path}: unbounded string makes CEL cost estimates fail"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list"


def test_names_status_and_printer_columns() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"]
    assert names["categories"] == ["finetune"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Progress", "Best", "Age", "Message"} <= set(columns)
    assert columns["Message"]["priority"] == 1
    for column in columns.values():
        assert "[-1:]" not in column["jsonPath"], "columns filter conditions by type"
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_render_is_valid_yaml_with_header() -> None:
    text = render_crd()
    assert text.startswith("# Generated")
    assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


def test_render_has_no_yaml_anchors() -> None:
    events = yaml.parse(render_crd())
    assert not any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None) for e in events)


def test_every_spec_field_but_suspend_and_ttl_waits_for_a_suspension() -> None:
    spec = _schema()["properties"]["spec"]
    immutable = {r["fieldPath"] for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]}
    assert immutable == {f".{name}" for name in spec["properties"]} - {".suspend", ".ttlSecondsAfterFinished"}
