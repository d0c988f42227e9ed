"""The memory plan in the trainer: its counts match the real models, it refuses a job that fits no GPU before
the weights load, QLoRA without CUDA is InvalidConfig, and ``--plan`` prints the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import run as run_mod
from finetune_trainer.cli import main
from finetune_trainer.errors import ConfigError
from finetune_trainer.freeze import apply_freeze, count_parameters
from finetune_trainer.memory_plan import count, shape_of
from finetune_trainer.models import ModelSource, load_model
from finetune_trainer.spec import TrainingSpec
from tests.trainer import tiny
from tests.trainer.helpers import train

FREEZES: list[dict[str, Any]] = [
    {"strategy": "none"},
    {"strategy": "head-only"},
    {"strategy": "bottom-layers", "layers": 1},
    {"strategy": "top-layers", "layers": 1},
    {"strategy": "none", "embeddings": True},
    {"strategy": "lora"},
    {"strategy": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "k_proj", "down_proj", "query", "c_fc"]}},
]


@pytest.mark.parametrize(
    ("kind", "task"), [("bert", "sequence-classification"), ("gpt2", "causal-lm"), ("llama", "causal-lm")]
)
def test_the_formula_counts_what_apply_freeze_trains_on_the_real_model(
    kind: str, task: str, assets: dict[str, Path], tmp_path: Path
) -> None:
    """The plan's parameter counts come from config.json alone; here they meet the real (tiny) models, for every
    freeze strategy the formula mirrors: total and trainable exactly (tied heads untied, LoRA adapters added)."""
    config = json.loads((assets[kind] / "config.json").read_text())
    shape = shape_of(config)
    assert shape is not None
    for freeze in FREEZES:
        spec = TrainingSpec.model_validate(tiny.spec(assets[kind], tmp_path, tmp_path / "out", task, freeze=freeze))
        model, _ = apply_freeze(load_model(spec.model, ModelSource(str(assets[kind])), None), spec.freeze, task)
        trainable, total = count_parameters(model)
        counts = count(shape, spec)
        assert (counts.total, counts.trainable) == (total, trainable), freeze


def test_qlora_without_cuda_is_invalid_config_naming_the_field(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Never a silent fp32 run: exit 2 (InvalidConfig) and one line naming freeze.lora.quantization."""
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        tmp_path / "out",
        freeze={"strategy": "lora", "lora": {"quantization": "4bit"}},
    )
    config = tmp_path / "spec.json"
    config.write_text(json.dumps(wire))
    assert main(["--config", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune-trainer: error:")]
    assert len(errors) == 1  # (the fsdp branch's qlora.require says the same, and whether bitsandbytes is there)
    assert errors[0].startswith("finetune-trainer: error: freeze.lora.quantization: 4bit (QLoRA) needs a CUDA GPU")


def test_a_known_gpu_too_small_for_every_strategy_fails_before_the_weights_load(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's FINETUNE_GPU_MEMORY (from resources.gpuMemory) of 64 KiB: no strategy fits the tiny model."""

    def never(*args: object) -> None:
        raise AssertionError("the weights loaded although the plan had refused the job")

    monkeypatch.setattr(run_mod, "load_model", never)
    wire = tiny.spec(assets["llama"], assets["text"], tmp_path / "out", "causal-lm")
    with pytest.raises(ConfigError) as raised:
        train(wire, gpu_memory=64 * 1024)
    assert str(raised.value).startswith("distributed.strategy: the job fits no strategy on 1 GPU(s) of 0.0 GiB")
    assert "\n" not in str(raised.value)


def test_plan_prints_the_memory_table_after_the_layer_map(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wire = tiny.spec(assets["llama"], tmp_path, tmp_path / "out", "causal-lm", freeze={"strategy": "lora"})
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "x"},
        "spec": {**wire, "resources": {"nodes": 2, "gpusPerNode": 2, "gpuMemory": "16Gi"}},
    }
    config = tmp_path / "job.json"
    config.write_text(json.dumps(manifest))
    assert main(["--config", str(config), "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("memory plan: "))
    assert lines[start].startswith("memory plan: 4 GPU(s), 16.0 GiB each (resources.gpuMemory 16Gi)")
    assert lines[start + 1].split() == [
        "STRATEGY",
        "PARAMS",
        "GRADS",
        "OPTIM",
        "ACTIV",
        "ACTIV-GC",
        "OTHER",
        "TOTAL",
        "FITS",
    ]
    assert [line.split()[0] for line in lines[start + 2 : start + 4]] == ["ddp", "fsdp"]
    assert all(line.endswith("yes") for line in lines[start + 2 : start + 4])
    assert lines[start + 4] == "strategy: auto: ddp (GiB per GPU; TOTAL with gradientCheckpointing off)"
