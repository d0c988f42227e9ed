"""The diagnosis on a real run: a tiny model memorising 16 randomly labelled texts for many epochs at a high
learning rate is diagnosed Overfitting from what the trainer reports (its evaluations with the training loss)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_operator.api.job import FineTuneJob, FineTuneJobStatus
from finetune_operator.reconcile.diagnosis import diagnose
from tests.manifests import baseline
from tests.trainer import tiny
from tests.trainer.helpers import train


def test_memorising_noise_is_diagnosed_overfitting(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["noisy"],
        out,
        hyperparameters={"learningRate": 5e-3, "batchSize": 4, "epochs": 16, "seed": 0, "weightDecay": 0.0},
        output={"location": str(out), "keepCheckpoints": 1},
    )
    result, _ = train(wire)
    assert result.exit_code == 0
    checkpoint = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    reported = json.loads((checkpoint / "run_state.json").read_text())
    status = FineTuneJobStatus.model_validate({"evaluations": reported["evaluations"], "best": reported["best"]})
    codes = [d.code for d in diagnose(FineTuneJob.model_validate(baseline()), status)]
    losses = [(e["metrics"]["loss"], e["trainLoss"]) for e in reported["evaluations"]]
    assert "Overfitting" in codes, losses
