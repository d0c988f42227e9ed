"""Manifest fuzzing: FineTuneJob specs generated from the generated CRD's own schema.

Each case is judged three ways: pydantic (``FineTuneJobSpec``), the real API server (a dry-run
create with the CRD and its CEL rules) and, when accepted, the operator's pure core (children
rendered and a status decided). The two validators must agree, and the core must never raise.
With ``advised`` (the advice policy bound to the namespace), the API server's warnings must be
exactly the ones ``kubectl finetune advise`` prints for the same spec: the CEL and Python forms of
each rule agree, and a rule never rejects a valid spec nor fails to evaluate on it.
Shared by the test (a few hundred seeded cases) and ``benchmarks/manifest_fuzz.py`` (more).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from kubernetes import client
from pydantic import ValidationError

from finetune_operator.api.job import GROUP, PLURAL, VERSION, FineTuneJob, FineTuneJobSpec
from finetune_operator.generators.crd import _COPIED_KEYWORDS, build_crd
from finetune_operator.reconcile import Observed, ObservedJob, Settings, decide, desired_children
from finetune_trainer.advice import RULES, advise

Schema = dict[str, Any]
_KEYWORDS = (
    *(k for k in _COPIED_KEYWORDS if k not in ("description", "format", "x-kubernetes-validations")),
    "exclusiveMinimum",
    "exclusiveMaximum",
    "required",
)
"""The CRD's validation keywords that mean the same in JSON Schema (draft 4)."""
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def json_schema(node: Schema) -> Schema:
    """The structural OpenAPI v3 schema as plain JSON Schema (draft 4) for hypothesis-jsonschema.

    CEL rules are dropped: they are what the fuzzing checks pydantic against, not a generator input."""
    out: Schema = {}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    elif "type" in node:
        out["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]
    for key in _KEYWORDS:
        if key in node:
            out[key] = node[key]
    # Known, left as is: the API server rejects an explicit null for a nullable enum ("Unsupported value:
    # null", even with null listed in the enum), where pydantic reads it as unset. Stricter at the gate,
    # so nothing invalid gets through; such nulls are not generated.
    if "properties" in node:
        out["properties"] = {name: json_schema(sub) for name, sub in node["properties"].items()}
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = json_schema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = json_schema(node["additionalProperties"])
        out.setdefault("maxProperties", 4)
    if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
        out["maxProperties"] = 0  # a pass-through object (affinity): its content is not ours to validate
    return out


def spec_strategy() -> st.SearchStrategy[Schema]:
    """Specs from the CRD's spec schema: mostly near the valid baseline's shape, with edits of every kind."""
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return from_schema(json_schema(spec))


@dataclass
class Verdicts:
    """What the fuzzing found; ``disagreements`` and ``crashes`` must stay empty."""

    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    warned: int = 0
    disagreements: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)


_WARNING = re.compile(r'^\d{3} \S+ "(?P<text>(?:[^"\\]|\\.)*)"')
"""One RFC 7234 ``Warning`` header value as the API server sends it: ``299 - "text"``."""
_ADVICE_MESSAGES = {rule.message for rule in RULES}


def _advice_warnings(headers: Any) -> set[str]:
    """The advice rules' messages among the response's ``Warning`` headers."""
    values = headers.getlist("Warning") if hasattr(headers, "getlist") else [headers.get("Warning") or ""]
    texts = [re.sub(r"\\(.)", r"\1", m["text"]) for v in values if v and (m := _WARNING.match(v))]
    return {message for message in _ADVICE_MESSAGES if any(text.endswith(message) for text in texts)}


def _api_verdict(api: client.ApiClient, namespace: str, manifest: Schema) -> tuple[bool, str, Schema | None, set[str]]:
    try:
        created, _, headers = client.CustomObjectsApi(api).create_namespaced_custom_object_with_http_info(
            GROUP, VERSION, namespace, PLURAL, manifest, dry_run="All"
        )
    except client.ApiException as error:
        if error.status not in (400, 422):
            raise
        return False, json.loads(error.body).get("message", ""), None, set()
    return True, "", created, _advice_warnings(headers)


def judge(
    api: client.ApiClient,
    namespace: str,
    spec: Schema,
    verdicts: Verdicts,
    note: Callable[[str], None],
    advised: bool = False,
) -> None:
    """One case: pydantic and the API server agree; an accepted job renders and decides without raising; with
    ``advised``, the policy's warnings are advise()'s."""
    verdicts.cases += 1
    manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": "fuzz"}, "spec": spec}
    try:
        FineTuneJobSpec.model_validate(spec)
        pydantic_ok, pydantic_error = True, ""
    except ValidationError as error:
        pydantic_ok, pydantic_error = False, str(error).splitlines()[0]
    api_ok, api_error, created, warned = _api_verdict(api, namespace, manifest)
    if pydantic_ok != api_ok:
        verdicts.disagreements.append(
            f"pydantic {'accepts' if pydantic_ok else 'rejects'} ({pydantic_error}), API server "
            f"{'accepts' if api_ok else 'rejects'} ({api_error}): {json.dumps(spec)[:1500]}"
        )
        note(verdicts.disagreements[-1])
        return
    if not api_ok or created is None:
        verdicts.rejected += 1
        return
    verdicts.accepted += 1
    try:
        created["metadata"].setdefault("uid", "00000000-0000-0000-0000-000000000000")
        job = FineTuneJob.model_validate(created)  # what the operator reads back: the API server's defaults
        desired_children(job, Settings())
        decide(job, Observed(job=None), NOW)
        decide(job, Observed(job=ObservedJob(active=1)), NOW)
        advised_here = {a.message for a in advise(job.spec)}
    except Exception as error:
        verdicts.crashes.append(f"{type(error).__name__}: {error}: {json.dumps(spec)[:1500]}")
        note(verdicts.crashes[-1])
        return
    verdicts.warned += bool(warned)
    if advised and warned != advised_here:
        verdicts.disagreements.append(
            f"the advice policy warns {sorted(warned)}, advise() {sorted(advised_here)}: {json.dumps(spec)[:1500]}"
        )
        note(verdicts.disagreements[-1])
