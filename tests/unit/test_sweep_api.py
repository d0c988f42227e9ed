"""The FineTuneSweep models: the same checks as the CRD's CEL, plus those only the operator can make."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_operator.api.sweep import SWEEPABLE_PATHS, FineTuneSweep, FineTuneSweepSpec, trial_spec
from finetune_operator.generators.crd import build_sweep_crd
from tests.manifests import sweep_baseline


def _spec(**edits: Any) -> dict[str, Any]:
    spec: dict[str, Any] = copy.deepcopy(sweep_baseline()["spec"])
    spec.update(edits)
    return spec


def test_the_issues_sweep_parses() -> None:
    sweep = FineTuneSweep.model_validate(sweep_baseline())
    assert [p.name for p in sweep.spec.parameters] == ["lr", "batch", "decay", "freeze"]
    assert sweep.spec.pruning.name == "median"


def test_sweepable_paths_are_the_scalar_fields_of_a_finetunejob() -> None:
    assert "hyperparameters.learningRate" in SWEEPABLE_PATHS
    assert "freeze.lora.r" in SWEEPABLE_PATHS
    assert "output.location" not in SWEEPABLE_PATHS and "suspend" not in SWEEPABLE_PATHS
    assert "evaluation.metrics" not in SWEEPABLE_PATHS  # a list, not a scalar


@pytest.mark.parametrize(
    ("parameter", "field"),
    [
        ({"name": "x", "path": "hyperparameters.learningRat", "float": {"min": 0.1, "max": 0.2}}, "path"),
        ({"name": "x", "path": "hyperparameters.learningRate", "float": {"min": 0.2, "max": 0.1}}, "max"),
        ({"name": "x", "path": "hyperparameters.learningRate", "float": {"min": 0, "max": 0.1, "log": True}}, "min"),
        ({"name": "x", "path": "hyperparameters.batchSize", "int": {"min": 4, "max": 4}}, "max"),
        ({"name": "x", "categorical": {"presets": [{"label": "a", "set": {"freeze.nope": 1}}]}}, "set"),
        ({"name": "x", "path": "hyperparameters.seed", "categorical": {}}, "values"),
        # kubectl drops a null on the way in: refused, with the way that survives named
        ({"name": "x", "categorical": {"presets": [{"label": "a", "set": {"freeze.layers": None}}]}}, "set"),
        ({"name": "x", "categorical": {"presets": [{"label": "a", "unset": ["freeze.nope"]}]}}, "unset"),
        ({"name": "x", "categorical": {"presets": [{"label": "a", "set": {}}]}}, "set"),
        (
            {
                "name": "x",
                "categorical": {
                    "presets": [{"label": "a", "set": {"hyperparameters.seed": 1}, "unset": ["hyperparameters.seed"]}]
                },
            },
            "unset",
        ),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(parameter: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        FineTuneSweepSpec.model_validate(_spec(parameters=[parameter]))
    assert f"{field}:" in str(error.value), error.value


def test_a_value_that_makes_an_invalid_finetunejob_is_refused_naming_the_parameter() -> None:
    manifest = sweep_baseline()
    manifest["spec"]["parameters"] = [
        {"name": "lr", "path": "hyperparameters.learningRate", "float": {"min": 1e-5, "max": 1e-3}},
        {"name": "batch", "path": "hyperparameters.batchSize", "int": {"min": 0, "max": 16, "step": 8}},
    ]
    with pytest.raises(ValidationError) as error:
        FineTuneSweep.model_validate(manifest)
    message = str(error.value)
    assert "spec.parameters[1] (batch): value 0" in message and "hyperparameters.batchSize" in message, message


def test_trial_spec_sets_the_values_and_its_own_output_location() -> None:
    sweep = FineTuneSweep.model_validate(sweep_baseline("s"))
    job = trial_spec(sweep.spec, {"lr": 1e-4, "batch": 16, "decay": 0.1, "freeze": "head-only"}, "s-t003")
    assert job["hyperparameters"]["learningRate"] == 1e-4
    assert job["hyperparameters"]["batchSize"] == 16
    assert job["freeze"]["strategy"] == "head-only"
    assert "layers" not in job["freeze"]  # the preset's unset removed the template's freeze.layers
    assert job["output"]["location"] == "file:///out/valid/s-t003"


def test_a_trial_without_early_stopping_tracks_the_objective_as_its_best_metric() -> None:
    """The trainer's best (and its checkpoint) follows the first metric without early stopping: the objective's."""
    manifest = sweep_baseline("s")
    del manifest["spec"]["trialTemplate"]["spec"]["earlyStopping"]
    sweep = FineTuneSweep.model_validate(manifest)
    values = {"lr": 1e-4, "batch": 16, "decay": 0.1, "freeze": "head-only"}
    assert trial_spec(sweep.spec, values, "s-t000")["evaluation"]["metrics"] == ["accuracy", "loss"]
    assert sweep.spec.trial_template.spec.evaluation.metrics == ["loss", "accuracy"]  # the template stays as written
    stopping = FineTuneSweep.model_validate(sweep_baseline("s"))  # early-stops on accuracy: order untouched
    assert trial_spec(stopping.spec, values, "s-t000")["evaluation"]["metrics"] == ["loss", "accuracy"]


def test_the_embedded_template_has_no_transition_rules() -> None:
    crd = build_sweep_crd()
    template = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "trialTemplate"
    ]
    text = repr(template)
    assert "oldSelf" not in text
    assert "isQuantity" in text  # the FineTuneJob's other rules stay


def test_a_null_in_a_preset_is_refused_and_says_what_to_use() -> None:
    spec = _spec(
        parameters=[{"name": "f", "categorical": {"presets": [{"label": "a", "set": {"freeze.layers": None}}]}}]
    )
    with pytest.raises(ValidationError) as error:
        FineTuneSweepSpec.model_validate(spec)
    assert "list the path in unset" in str(error.value)


def test_a_preset_that_leaves_a_template_field_it_cannot_keep_says_how_to_remove_it() -> None:
    """What a kubectl user of the old null form gets: the null never arrived, so the template keeps layers."""
    manifest = sweep_baseline()
    manifest["spec"]["parameters"][3]["categorical"]["presets"][1] = {
        "label": "head-only",
        "set": {"freeze.strategy": "head-only"},
    }
    with pytest.raises(ValidationError) as error:
        FineTuneSweep.model_validate(manifest)
    assert "listing it in unset" in str(error.value)
