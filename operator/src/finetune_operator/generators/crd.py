"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema 2020-12 with ``$ref``s and ``anyOf: [X, null]``; Kubernetes wants a
*structural* OpenAPI v3 schema: everything inlined, every level typed, ``nullable`` for optional
fields, int-or-string marked, no ``title``s. This module does that translation and nothing else.

    python -m finetune_operator.generators.crd            # rewrite crds/, the chart's copies and the admission policies
    python -m finetune_operator.generators.crd --check    # exit 1 when they differ from the models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api.job import (
    CATEGORIES,
    GROUP,
    KIND,
    OBJECT_RULES,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJobSpec,
    FineTuneJobStatus,
)
from finetune_operator.api.sweep import (
    SWEEP_KIND,
    SWEEP_PLURAL,
    SWEEP_SHORT_NAMES,
    SWEEP_SINGULAR,
    FineTuneSweepSpec,
    FineTuneSweepStatus,
)
from finetune_operator.generators import admission, advice_policy, author_policy, operator_policy
from finetune_operator.generators.rbac import USER_ROLES, split_by_scope, user_cluster_roles

Schema = dict[str, Any]

CRD_FILE = f"{GROUP}_{PLURAL}.yaml"
SWEEP_CRD_FILE = f"{GROUP}_{SWEEP_PLURAL}.yaml"
CHART_RULES_FILE = Path("charts/finetune-operator/files/operator-rules.yaml")
POLICY_FILES = (
    Path("deploy/trainer-status-policy.yaml"),
    Path("charts/finetune-operator/files/trainer-status-policy.yaml"),
)
"""The admission policy as plain YAML (``kubectl apply -f``) and the chart's copy of it."""
USER_ROLES_FILE = Path("deploy/user-roles.yaml")
"""The users' ClusterRoles (finetune-author, the aggregated edit/view) as plain YAML."""
CHART_USER_ROLES_FILE = Path("charts/finetune-operator/files/user-roles.yaml")
"""The same roles as the chart's template reads them: name -> aggregation targets and rules."""
CHART_CRD_DIR = Path("charts/finetune-operator/files/crds")
"""The chart's copy of the CRD (a real file, not a link: packaged charts and GitOps tools need one)."""
CLUSTER_RULES_NAME = "operator-cluster-rules.yaml"
"""Next to the rules file: the cluster-scoped rules, the chart's only ClusterRole in namespaced mode."""
_COPIED_KEYWORDS = (
    "description",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "x-kubernetes-validations",
)

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Summary phase.",
    },
    {
        "name": "Progress",
        "type": "number",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of planned steps done.",
    },
    {
        "name": "Metric",
        "type": "string",
        "jsonPath": ".status.best.metric",
        "description": "Monitored evaluation metric.",
    },
    {
        "name": "Best",
        "type": "number",
        "jsonPath": ".status.best.value",
        "description": "Best evaluation value so far.",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Complete")].reason',
        "description": "Why the job completed: Succeeded or EarlyStopped.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Message",
        "type": "string",
        "priority": 1,
        "jsonPath": ".status.message",
        "description": "Latest human-readable summary.",
    },
]

SWEEP_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Summary phase."},
    {"name": "Trials", "type": "integer", "jsonPath": ".status.trialCounts.total", "description": "Trials created."},
    {
        "name": "Running",
        "type": "integer",
        "jsonPath": ".status.trialCounts.running",
        "description": "Trials created and not finished.",
    },
    {"name": "Metric", "type": "string", "jsonPath": ".spec.objective.metric", "description": "Objective metric."},
    {"name": "Best", "type": "number", "jsonPath": ".status.bestTrial.value", "description": "Best objective value."},
    {"name": "Best Trial", "type": "string", "jsonPath": ".status.bestTrial.name", "description": "Best trial."},
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Complete")].reason',
        "description": "Why the sweep completed: GoalReached, MaxTrialsReached or SearchSpaceExhausted.",
    },
    *PRINTER_COLUMNS[-2:],  # Age and Message
]


class _Structural:
    """Rewrites one pydantic JSON schema (with its ``$defs``) into structural form."""

    def __init__(self, root: Schema) -> None:
        self._defs: dict[str, Schema] = root.get("$defs", {})

    def convert(self, node: Schema) -> Schema:
        if node.get("x-kubernetes-preserve-unknown-fields"):
            # A free-form value (a scalar of any type): the models check it.
            return {"x-kubernetes-preserve-unknown-fields": True, **{k: node[k] for k in ("description",) if k in node}}
        if "$ref" in node:
            target = self._defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return self.convert(merged)

        variants = node.get("anyOf") or node.get("oneOf")
        if variants:
            return self._convert_union(node, variants)

        out: Schema = {}
        kind = node.get("type")
        if "const" in node:
            out["enum"] = [node["const"]]
        if kind == "object" or "properties" in node:
            out.update(self._convert_object(node))
        elif kind == "array":
            out["type"] = "array"
            out["items"] = self.convert(node.get("items", {}))
        elif kind is not None:
            out["type"] = kind
        else:
            raise ValueError(f"untyped schema node cannot be structural: {node}")
        self._copy_keywords(node, out)
        return out

    def _convert_union(self, node: Schema, variants: list[Schema]) -> Schema:
        non_null = [v for v in variants if v.get("type") != "null"]
        nullable = len(non_null) < len(variants)
        types = sorted(v.get("type", "") for v in non_null)
        if types == ["integer", "string"]:
            out: Schema = {"x-kubernetes-int-or-string": True}
            for variant in non_null:
                self._copy_keywords(variant, out)
        elif len(non_null) == 1:
            out = self.convert(non_null[0])
        else:
            raise ValueError(f"unions other than optional and int-or-string are not structural: {variants}")
        self._copy_keywords(node, out)
        if nullable:
            out["nullable"] = True
        return out

    def _convert_object(self, node: Schema) -> Schema:
        out: Schema = {"type": "object"}
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties:
            out["properties"] = {
                name: self._property(sub, name in node.get("required", [])) for name, sub in properties.items()
            }
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = self.convert(extra)
        else:
            # Free-form objects (e.g. a pass-through core/v1 Affinity) keep what they are given.
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out

    def _property(self, node: Schema, required: bool) -> Schema:
        out = self.convert(node)
        if "default" in node and node["default"] is not None:
            out["default"] = node["default"]
        elif not required and not out.get("nullable") and out.get("type") in ("object", "array"):
            # Fields whose Python default comes from a factory: the API server creates them with
            # their nested defaults filled in (it checks CEL rules against the default itself).
            out["default"] = _defaults_of(out) if out["type"] == "object" else []
        return out

    @staticmethod
    def _copy_keywords(node: Schema, out: Schema) -> None:
        for key in _COPIED_KEYWORDS:
            if key in node:
                if key == "x-kubernetes-validations":
                    out[key] = [*out.get(key, []), *node[key]]
                else:
                    out[key] = node[key]
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node:
                out["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
                out[bound] = True


def _defaults_of(schema: Schema) -> dict[str, Any]:
    """The object an empty ``{}`` becomes after the API server's defaulting."""
    return {name: sub["default"] for name, sub in schema.get("properties", {}).items() if "default" in sub}


def structural_schema(model: type[Any]) -> Schema:
    """The structural OpenAPI v3 schema of a pydantic model (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _Structural(raw).convert(raw)


def build_crd() -> dict[str, Any]:
    """The FineTuneJob CRD as a plain dict."""
    return _crd(
        names=(KIND, PLURAL, SINGULAR, SHORT_NAMES),
        columns=PRINTER_COLUMNS,
        spec=(FineTuneJobSpec, structural_schema(FineTuneJobSpec)),
        status=FineTuneJobStatus,
        description="A FineTuneJob fine-tunes a pretrained model: what to train (model, data, "
        "freeze policy, hyperparameters, evaluation, early stopping) and how to run it.",
        # No fieldPath: the schema does not declare metadata's fields; the message names it.
        root_rules=[{k: v for k, v in rule.schema().items() if k != "fieldPath"} for rule in OBJECT_RULES],
    )


def build_sweep_crd() -> dict[str, Any]:
    """The FineTuneSweep CRD as a plain dict."""
    spec = structural_schema(FineTuneSweepSpec)
    # The FineTuneJob's own transition rules (a running job's immutable fields) do not apply to a template.
    _drop_transition_rules(spec["properties"]["trialTemplate"]["properties"]["spec"])
    return _crd(
        names=(SWEEP_KIND, SWEEP_PLURAL, SWEEP_SINGULAR, SWEEP_SHORT_NAMES),
        columns=SWEEP_PRINTER_COLUMNS,
        spec=(FineTuneSweepSpec, spec),
        status=FineTuneSweepStatus,
        description="A FineTuneSweep searches hyperparameters: its trials are FineTuneJobs made from a template, "
        "their parameters chosen by Optuna and unpromising ones pruned.",
        root_rules=[],
    )


def _drop_transition_rules(schema: Schema) -> None:
    rules = [rule for rule in schema.get("x-kubernetes-validations", []) if "oldSelf" not in rule["rule"]]
    if rules:
        schema["x-kubernetes-validations"] = rules
    else:
        schema.pop("x-kubernetes-validations", None)
    for sub in schema.get("properties", {}).values():
        _drop_transition_rules(sub)
    if isinstance(schema.get("items"), dict):
        _drop_transition_rules(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        _drop_transition_rules(schema["additionalProperties"])


def _crd(
    names: tuple[str, str, str, tuple[str, ...]],
    columns: list[dict[str, Any]],
    spec: tuple[type[Any], Schema],
    status: type[Any],
    description: str,
    root_rules: list[dict[str, str]],
) -> dict[str, Any]:
    kind, plural, singular, short_names = names
    spec_model, spec_schema = spec
    status_schema = structural_schema(status)
    status_schema["properties"]["conditions"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    root: Schema = {"type": "object", "description": description, "required": ["spec"]}
    if root_rules:
        root["x-kubernetes-validations"] = root_rules
    root["properties"] = {
        "apiVersion": {
            "type": "string",
            "description": "finetune.dev/v1alpha1",
        },
        "kind": {
            "type": "string",
            "description": kind,
        },
        "metadata": {"type": "object"},
        "spec": {
            **spec_schema,
            "description": spec_model.__doc__,
        },
        "status": {
            **status_schema,
            "description": status.__doc__,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {
                "app.kubernetes.io/name": "finetune-operator",
                "app.kubernetes.io/part-of": "finetune-operator",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


class _NoAliases(yaml.SafeDumper):
    """Writes a value shared by two places twice instead of as a YAML anchor and alias: some
    tools (and readers) of CRDs do not follow aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_crd() -> str:
    header = (
        "# Generated by `python -m finetune_operator.generators.crd` from finetune_operator.api.job. Do not edit.\n"
    )
    return header + yaml.dump(build_crd(), Dumper=_NoAliases, sort_keys=False, width=120, allow_unicode=True)


def render_sweep_crd() -> str:
    header = (
        "# Generated by `python -m finetune_operator.generators.crd` from finetune_operator.api.sweep. Do not edit.\n"
    )
    return header + yaml.dump(build_sweep_crd(), Dumper=_NoAliases, sort_keys=False, width=120, allow_unicode=True)


def chart_api_objects() -> list[dict[str, Any]]:
    """What the chart installs besides the operator itself: both CRDs and every admission policy
    (trainers' status keys, apply-time advice, authors' rights, the operator's own writes) with its binding. The
    demo and the tests install this, so they see what a user of the chart sees (``kubectl apply`` warnings
    included)."""
    return [
        build_crd(),
        build_sweep_crd(),
        *admission.manifests(),
        *advice_policy.build_policy(),
        *author_policy.manifests(),
        *operator_policy.manifests(),
    ]


def render_rules() -> tuple[str, str]:
    """The operator's ``(namespaced, cluster-scoped)`` RBAC rules as the chart reads them."""
    header = (
        "# Generated by `python -m finetune_operator.generators.crd` from finetune_operator.generators.rbac. "
        "Do not edit.\n"
    )
    namespaced, cluster_wide = split_by_scope()
    return (
        header + yaml.safe_dump(namespaced, sort_keys=False, width=120),
        header + yaml.safe_dump(cluster_wide, sort_keys=False, width=120),
    )


def render_user_roles() -> tuple[str, str]:
    """The users' ClusterRoles ``(as plain YAML, as the chart reads them)``."""
    header = (
        "# Generated by `python -m finetune_operator.generators.crd` from finetune_operator.generators.rbac. "
        "Do not edit.\n"
    )
    return (
        header + yaml.dump_all(user_cluster_roles(), Dumper=_NoAliases, sort_keys=False, width=120),
        header + yaml.dump(USER_ROLES, Dumper=_NoAliases, sort_keys=False, width=120),
    )


def render_policy() -> str:
    header = (
        "# Generated by `python -m finetune_operator.generators.crd` from "
        "finetune_operator.generators.admission. Do not edit.\n"
    )
    return header + yaml.safe_dump_all(admission.manifests(), sort_keys=False, width=120)


def generated_files(crd_dir: Path = Path("crds"), rules: Path = CHART_RULES_FILE) -> dict[Path, str]:
    """The one table of generated files: each path (relative to the repository) and its text.

    ``make crds`` writes them, ``--check`` and the drift test compare them; a new generator adds
    its files here and is covered by both.
    """
    namespaced_rules, cluster_rules = render_rules()
    user_roles, chart_user_roles = render_user_roles()
    return {
        crd_dir / CRD_FILE: render_crd(),
        CHART_CRD_DIR / CRD_FILE: render_crd(),
        crd_dir / SWEEP_CRD_FILE: render_sweep_crd(),
        CHART_CRD_DIR / SWEEP_CRD_FILE: render_sweep_crd(),
        rules: namespaced_rules,
        rules.with_name(CLUSTER_RULES_NAME): cluster_rules,
        **{path: render_policy() for path in POLICY_FILES},
        USER_ROLES_FILE: user_roles,
        CHART_USER_ROLES_FILE: chart_user_roles,
        # apply-time advice
        advice_policy.POLICY_FILE: advice_policy.render_policy(),
        advice_policy.CHART_POLICY_FILE: advice_policy.render_policy(),
        # what a spec may name only with its author's rights
        author_policy.POLICY_FILE: author_policy.render_policy(),
        author_policy.CHART_POLICY_FILE: author_policy.render_chart_policy(),
        # the operator's own writes
        operator_policy.POLICY_FILE: operator_policy.render_policy(),
        operator_policy.CHART_POLICY_FILE: operator_policy.render_policy(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("crds"), help="CRD output directory (default: ./crds)")
    parser.add_argument("--rules", type=Path, default=CHART_RULES_FILE, help="where the chart's RBAC rules go")
    parser.add_argument("--check", action="store_true", help="fail when the files differ instead of writing them")
    args = parser.parse_args(argv)
    outputs = generated_files(args.dir, args.rules)
    if args.check:
        stale = [str(path) for path, text in outputs.items() if not path.exists() or path.read_text() != text]
        for name in stale:
            print(f"{name} is out of date: run `make crds`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
