"""Run the trainer in-process and collect its JSON lines."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from finetune_trainer import data
from finetune_trainer.config import RuntimeEnv
from finetune_trainer.reporting import JsonLines
from finetune_trainer.run import RunResult, run
from finetune_trainer.spec import TrainingSpec


def train(wire: dict[str, Any], **env: Any) -> tuple[RunResult, list[dict[str, Any]]]:
    stream = io.StringIO()
    settings = {"metrics_port": 0, "log_every_steps": 1, **env}
    result = run(TrainingSpec.model_validate(wire), RuntimeEnv(**settings), JsonLines(stream))
    return result, [json.loads(line) for line in stream.getvalue().splitlines()]


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def result_json(output: Path) -> dict[str, Any]:
    return json.loads((output / "result.json").read_text())


def independent_nll(out: Path, wire: dict[str, Any], causal: bool) -> float:
    """Mean NLL of the saved final model over the validation set, one example at a time, in float64."""
    import transformers as tf

    auto = tf.AutoModelForCausalLM if causal else tf.AutoModelForSequenceClassification
    model = auto.from_pretrained(str(out / "model")).eval()
    processor = tf.AutoTokenizer.from_pretrained(str(out / "model"))
    prepared = data.prepare(TrainingSpec.model_validate(wire), RuntimeEnv(), processor, model.config)
    assert prepared.validation is not None
    total, count = 0.0, 0
    with torch.no_grad():
        for row in prepared.validation:
            inputs = {k: torch.as_tensor(v)[None] for k, v in row.items() if k != "labels"}
            log_probs = model(**inputs).logits.double().log_softmax(-1)[0]
            if causal:
                targets = torch.as_tensor(row.get("labels", row["input_ids"]))[1:]
                keep = targets != -100
                total -= float(log_probs[:-1][keep].gather(1, targets[keep][:, None]).sum())
                count += int(keep.sum())
            else:
                total -= float(log_probs[int(row["labels"])])
                count += 1
    return total / count
