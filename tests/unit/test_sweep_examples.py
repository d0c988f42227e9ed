"""The shipped FineTuneSweep examples: every trial they can create is a valid FineTuneJob without advice.

Grid examples are checked trial by trial (the whole product); the others at each range's ends
and every categorical choice or preset, one parameter at a time, on top of the template.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api import FineTuneJob
from finetune_trainer.advice import advise
from tests.manifests import SWEEP_EXAMPLES, Manifest, example


def _values(parameter: Manifest) -> list[tuple[str, Any]]:
    """(label, {path: value}) for each value the test tries."""
    name = parameter["name"]
    if "float" in parameter or "int" in parameter:
        domain = parameter.get("float") or parameter["int"]
        ends = [domain["min"], domain["max"]]
        if "step" in domain:  # a grid walks min, min+step, ... up to max
            count = int((domain["max"] - domain["min"]) // domain["step"]) + 1
            ends = [domain["min"] + i * domain["step"] for i in range(count)]
        return [(f"{name}={v}", {parameter["path"]: v}) for v in ends]
    categorical = parameter["categorical"]
    if "presets" in categorical:
        return [(f"{name}={p['label']}", p["set"]) for p in categorical["presets"]]
    return [(f"{name}={v}", {parameter["path"]: v}) for v in categorical["values"]]


def _trial(template: Manifest, assignments: list[dict[str, Any]]) -> Manifest:
    spec = copy.deepcopy(template)
    for assignment in assignments:
        for path, value in assignment.items():
            *parents, leaf = path.split(".")
            node = spec
            for part in parents:
                node = node.setdefault(part, {})
            if value is None:
                node.pop(leaf, None)
            else:
                node[leaf] = value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": spec}


def _trials(sweep: Manifest) -> list[tuple[str, Manifest]]:
    spec = sweep["spec"]
    template = spec["trialTemplate"]["spec"]
    per_parameter = [_values(p) for p in spec["parameters"]]
    if spec["algorithm"]["name"] == "grid":
        combos = list(itertools.product(*per_parameter))
        assert len(combos) <= spec["maxTrials"], "maxTrials cuts the grid short: it never reaches SearchSpaceExhausted"
        return [(" ".join(label for label, _ in c), _trial(template, [a for _, a in c])) for c in combos]
    return [(label, _trial(template, [a])) for values in per_parameter for label, a in values]


@pytest.mark.parametrize("path", SWEEP_EXAMPLES, ids=lambda p: p.name)
def test_every_trial_of_a_shipped_sweep_is_a_valid_job_without_advice(path: Path) -> None:
    sweep = example(path)
    objective = sweep["spec"]["objective"]["metric"]
    trials = _trials(sweep)
    assert len(trials) >= 2
    for label, trial in trials:
        job = FineTuneJob.model_validate(trial)
        assert objective in job.spec.evaluation.metrics, f"{path.name}: the template does not evaluate {objective}"
        assert [a.reason for a in advise(job.spec)] == [], f"{path.name} {label}"


def test_the_examples_cover_random_or_tpe_with_presets_and_a_grid() -> None:
    specs = [example(p)["spec"] for p in SWEEP_EXAMPLES]
    assert {s["algorithm"]["name"] for s in specs} >= {"grid", "tpe"}
    searched = {p.get("path") for s in specs for p in s["parameters"]}
    assert {"hyperparameters.learningRate", "hyperparameters.weightDecay"} <= searched
    assert any("presets" in p.get("categorical", {}) for s in specs for p in s["parameters"])
