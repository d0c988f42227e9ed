"""The admission policies that make a FineTuneJob or FineTuneSweep grant nothing its author lacks.

The operator creates the trainer's pods under its own identity, so without a check a user allowed
FineTuneJobs but not pods could run any image, as any ServiceAccount, with any Secret of the
namespace. A ``ValidatingAdmissionPolicy`` asks the API server's authorizer about the requester
(CEL ``authorizer``) for each spec field in ``GUARDED``: the one table of what a spec may name
that a pod would otherwise need rights for. Adding a Secret reference is one line there.

A sweep is checked for every value its search can produce: the trial template, every
categorical value and every preset that sets a guarded path (a numeric range on a guarded path
counts as "any value"). The trials it creates are the operator's writes and are exempt, like its
stop annotations: the author was checked when the sweep was admitted.

The trainer images and the operator's identity are baked into the policy when it is generated
(the chart substitutes its own ``trainerImage`` and release namespace) rather than read from a
parameter object: both change only with the operator's deployment, a missing or misnamed
parameter would either block every job or open the check, and the generated text is exactly what
is enforced. An admin who runs the operator with another ``--trainer-image`` without the chart
edits ``trainerImages`` in ``deploy/author-policy.yaml``.

``python -m finetune_operator.generators.crd`` writes the policies to ``deploy/`` and the chart.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from finetune_operator.api.job import DEFAULT_TRAINER_IMAGE, GROUP, PLURAL, VERSION
from finetune_operator.api.sweep import SWEEP_PLURAL
from finetune_operator.generators import admission


class Check(enum.Enum):
    """What the requester must be allowed for a guarded field's value."""

    IMAGE = "image"
    """Another image than the operator's trainer images needs ``create pods``."""
    POD_IDENTITY = "pod identity"
    """Any value (a ServiceAccount the pod runs as) needs ``create pods``."""
    SECRET = "secret"
    """A reference ``{name}`` (and ``key``) to a Secret of the namespace needs ``get`` on that Secret."""


@dataclass(frozen=True)
class Guard:
    """A FineTuneJob spec path (dotted camelCase; one ``[]`` marks a list) and its check."""

    path: str
    check: Check


GUARDED: Final = (
    Guard("resources.image", Check.IMAGE),
    Guard("resources.serviceAccountName", Check.POD_IDENTITY),
    Guard("model.tokenSecretRef", Check.SECRET),
    Guard("dataset.tokenSecretRef", Check.SECRET),
    Guard("tracking.credentialsSecretRef", Check.SECRET),
    Guard("storage.s3.credentialsSecretRef", Check.SECRET),
    Guard("model.s3.credentialsSecretRef", Check.SECRET),
    Guard("dataset.s3.credentialsSecretRef", Check.SECRET),
    Guard("output.s3.credentialsSecretRef", Check.SECRET),
)
"""Every spec field that hands the trainer's pod something a pod's author needs rights for."""

JOB_POLICY_NAME: Final = f"finetune-author.{GROUP}"
SWEEP_POLICY_NAME: Final = f"finetune-author-sweeps.{GROUP}"
OPERATOR_USER: Final = "system:serviceaccount:finetune-system:finetune-operator"
"""The operator's identity as the chart installs it (release namespace finetune-system)."""
POLICY_FILE: Final = Path("deploy") / "author-policy.yaml"
CHART_POLICY_FILE: Final = Path("charts") / "finetune-operator" / "files" / "author-policy.yaml"
CHART_TRAINER_IMAGE: Final = "__TRAINER_IMAGE__"
CHART_OPERATOR_USER: Final = "__OPERATOR_USER__"
"""Placeholders the chart's template replaces with its values."""

_MAY_CREATE_PODS = "authorizer.group('').resource('pods').namespace(request.namespace).check('create').allowed()"
_WHO = "request.userInfo.username"


def _cel(text: str) -> str:
    """A CEL string literal."""
    return json.dumps(text)


def _may_get_secret(name: str) -> str:
    return f"authorizer.group('').resource('secrets').namespace(request.namespace).name({name}).check('get').allowed()"


def _optional(root: str, dotted: str) -> str:
    """CEL: the optional value at ``dotted`` below ``root``."""
    return root + "".join(f".?{key}" for key in dotted.split(".") if key)


def _value_ok(check: Check, value: str) -> str:
    """CEL: the requester may put ``value`` (a plain string expression) at a field with ``check``."""
    if check is Check.IMAGE:
        return f"({value} in variables.trainerImages || variables.mayCreatePods)"
    if check is Check.POD_IDENTITY:
        return "variables.mayCreatePods"
    return _may_get_secret(value)


def _leaf(guard: Guard) -> str:
    """The scalar path a value sets (a Secret reference's name)."""
    return f"{guard.path}.name" if guard.check is Check.SECRET else guard.path


def _needs(check: Check) -> str:
    if check is Check.SECRET:
        return "get on that Secret"
    return "the right to create pods"


def _field_ok(guard: Guard, root: str) -> str:
    """CEL: the field at ``guard.path`` below ``root`` (a job spec) is unset or allowed; for a list
    (``sources[].credentialsSecretRef``, ``images[]``), each of its elements."""
    outer, listed, inner = guard.path.partition("[]")
    if not listed:
        value = _optional(root, _leaf(guard))
        return f"(!{value}.hasValue() || {_value_ok(guard.check, value + '.value()')})"
    leaf = _leaf(Guard(inner, guard.check)).strip(".")
    value = _optional("x", leaf) if leaf else "optional.of(x)"
    each = f"(!{value}.hasValue() || {_value_ok(guard.check, value + '.value()')})"
    return f"{_optional(root, outer)}.orValue([]).all(x, {each})"


def _changed(root: str, old_root: str, path: str) -> str:
    """CEL: a create, or the field (or list) at ``path`` differs from the stored one."""
    outer = path.partition("[]")[0]
    return f"request.operation == 'CREATE' || {_optional(root, outer)} != {_optional(old_root, outer)}"


def _message(field: str, check: Check, value: str | None) -> str:
    """CEL messageExpression naming ``field`` (and its value where it is one string)."""
    shown = f"{_cel(field + ': ')} + {value}" if value else _cel(field)
    if check is Check.IMAGE:
        reason = " is not the operator's trainer image, and "
    elif check is Check.POD_IDENTITY:
        reason = " runs the pod as that ServiceAccount, and "
    else:
        reason = " names a Secret, and "
    tail = f"{_cel(reason)} + {_WHO} + {_cel(' lacks ' + _needs(check))} + ' in ' + request.namespace"
    return f"{shown} + {tail}"


def _template_validation(guard: Guard, root: str, old_root: str, field_prefix: str) -> dict[str, Any]:
    field = f"{field_prefix}{guard.path}"
    shown = None if "[]" in guard.path else _optional(root, _leaf(guard)) + ".orValue('')"
    if guard.check is Check.SECRET and shown:
        field = f"{field_prefix}{guard.path}.name"
    return {
        "expression": f"!({_changed(root, old_root, guard.path)}) || {_field_ok(guard, root)}",
        "messageExpression": _message(field, guard.check, shown),
        "message": f"{field}: the requester lacks {_needs(guard.check)}",
        "reason": "Forbidden",
    }


def _search_validation(guard: Guard) -> dict[str, Any] | None:
    """A sweep's parameters: each value a categorical or a preset can put at the guarded path."""
    if "[]" in guard.path:
        return None  # a list element is not a sweepable path
    path = _leaf(guard)
    leaf = _cel(path)
    any_value = "false" if guard.check is Check.SECRET else "variables.mayCreatePods"
    each_value = _value_ok(guard.check, "string(v)")
    # values and set hold free-form scalars, which the schema's CEL types leave out: dyn() reaches them
    values = f"(has(p.categorical) ? dyn(p.categorical).?values.orValue([]).all(v, {each_value}) : {any_value})"
    in_preset = f"{leaf} in dyn(s).?set.orValue({{}})"
    preset_value = _value_ok(guard.check, f"string(dyn(s).set[{leaf}])")
    presets = f"p.?categorical.?presets.orValue([]).all(s, !({in_preset}) || {preset_value})"
    bad = f"!((!has(p.path) || p.path != {leaf} || {values}) && {presets})"
    changed = "request.operation == 'CREATE' || object.spec.parameters != oldObject.spec.parameters"
    # a messageExpression cannot ask the authorizer: it names every parameter that sets the path
    sets = f"(has(p.path) && p.path == {leaf}) || p.?categorical.?presets.orValue([]).exists(s, {in_preset})"
    names = f"object.spec.parameters.filter(p, {sets}).map(p, p.name).join(', ')"
    lacks = f"{_WHO} + {_cel(' lacks ' + _needs(guard.check))} + ' in ' + request.namespace"
    return {
        "expression": f"!({changed}) || !object.spec.parameters.exists(p, {bad})",
        "messageExpression": f"{_cel('spec.parameters (')} + {names} + "
        f"{_cel(f') can set {path} to a value for which ')} + {lacks}",
        "message": f"spec.parameters can set {path} to a value for which the requester lacks {_needs(guard.check)}",
        "reason": "Forbidden",
    }


def _policy(
    name: str, plural: str, validations: list[dict[str, Any]], images: Sequence[str], operator: str
) -> dict[str, Any]:
    return admission.policy(
        name,
        (["CREATE", "UPDATE"], plural, VERSION),
        [
            # trials and stop annotations: the author was checked when the sweep was admitted
            {"name": "not-the-operator", "expression": f"{_WHO} != {_cel(operator)}"},
            # finalizers, labels, annotations: nothing to check, nothing spent on the hot path
            {"name": "spec-written", "expression": "request.operation == 'CREATE' || object.spec != oldObject.spec"},
        ],
        validations,
        variables=[
            {"name": "trainerImages", "expression": "[" + ", ".join(_cel(image) for image in images) + "]"},
            {"name": "mayCreatePods", "expression": _MAY_CREATE_PODS},
        ],
    )


def manifests(
    trainer_images: Sequence[str] = (DEFAULT_TRAINER_IMAGE,), operator: str = OPERATOR_USER
) -> list[dict[str, Any]]:
    """Both policies (FineTuneJobs, FineTuneSweeps) with their cluster-wide Deny bindings."""
    job_rules = [_template_validation(g, "object.spec", "oldObject.spec", "spec.") for g in GUARDED]
    template, old_template = "object.spec.trialTemplate.spec", "oldObject.spec.trialTemplate.spec"
    sweep_rules = [_template_validation(g, template, old_template, "spec.trialTemplate.spec.") for g in GUARDED]
    sweep_rules += [rule for g in GUARDED if (rule := _search_validation(g)) is not None]
    return [
        _policy(JOB_POLICY_NAME, PLURAL, job_rules, trainer_images, operator),
        admission.policy_binding(JOB_POLICY_NAME),
        _policy(SWEEP_POLICY_NAME, SWEEP_PLURAL, sweep_rules, trainer_images, operator),
        admission.policy_binding(SWEEP_POLICY_NAME),
    ]


def render_policy(trainer_images: Sequence[str] = (DEFAULT_TRAINER_IMAGE,), operator: str = OPERATOR_USER) -> str:
    header = (
        "# Generated by `python -m finetune_operator.generators.crd` from "
        "finetune_operator.generators.author_policy. Do not edit.\n"
    )
    return header + yaml.safe_dump_all(manifests(trainer_images, operator), sort_keys=False, width=120)


def render_chart_policy() -> str:
    """The chart's copy: its template puts ``trainerImage`` and the release's operator identity in."""
    return render_policy((CHART_TRAINER_IMAGE,), CHART_OPERATOR_USER)
