"""The shipped FineTuneSweep examples: valid sweeps, and every trial they can create is a valid FineTuneJob
without advice.

Grid examples are checked trial by trial (the whole product, enumerated by the operator's ``grid``); the
others at each range's ends and every categorical choice or preset, one parameter at a time, on top of the
template. The trials are built by the operator's own ``trial_spec``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.api.job import FineTuneJobSpec
from finetune_operator.api.sweep import FineTuneSweep, trial_spec
from finetune_trainer.advice import advise
from tests.manifests import SWEEP_EXAMPLES, example, sweep_trial_values


@pytest.mark.parametrize("path", SWEEP_EXAMPLES, ids=lambda p: p.name)
def test_every_trial_of_a_shipped_sweep_is_a_valid_job_without_advice(path: Path) -> None:
    spec = FineTuneSweep.model_validate(example(path)).spec
    trials = sweep_trial_values(spec)
    assert len(trials) >= 2
    for index, values in enumerate(trials):
        job = FineTuneJobSpec.model_validate(trial_spec(spec, values, f"{path.stem}-t{index:03d}"))
        assert [a.reason for a in advise(job)] == [], f"{path.name} {values}"


def test_the_examples_cover_tpe_with_presets_and_a_grid() -> None:
    specs = [FineTuneSweep.model_validate(example(p)).spec for p in SWEEP_EXAMPLES]
    assert {s.algorithm.name for s in specs} >= {"grid", "tpe"}
    searched = {p.path for s in specs for p in s.parameters}
    assert {"hyperparameters.learningRate", "hyperparameters.weightDecay"} <= searched
    assert any(p.categorical is not None and p.categorical.presets for s in specs for p in s.parameters)
