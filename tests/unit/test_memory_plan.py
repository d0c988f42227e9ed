"""The memory plan (finetune_trainer.memory_plan): pure, from a config.json alone, no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.job import FineTuneJob
from finetune_operator.reconcile import Settings
from finetune_operator.reconcile.children import batch_job
from finetune_trainer.contract import GPU_MEMORY_ENV
from finetune_trainer.errors import ConfigError
from finetune_trainer.memory_plan import GIB, Gpus, check_fits, count, job_gpus, plan, shape_of
from finetune_trainer.spec import TrainingSpec
from tests.manifests import baseline

ROOT = Path(__file__).resolve().parents[2]
LLAMA_3_8B = json.loads((ROOT / "examples/models/llama-3-8b/config.json").read_text())


def _spec(freeze: dict[str, Any] | None = None, **hyperparameters: Any) -> TrainingSpec:
    return TrainingSpec.model_validate(
        {
            "model": {"source": "/models/llama-3-8b", "task": "causal-lm"},
            "dataset": {"source": "/data", "maxSeqLength": 2048},
            "output": {"location": "/out"},
            "freeze": freeze or {"strategy": "none"},
            "hyperparameters": {"batchSize": 2, "gradientCheckpointing": True, **hyperparameters},
        }
    )


LORA = {"strategy": "lora", "lora": {"r": 16, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}


def test_llama_3_8b_has_its_published_parameter_count() -> None:
    shape = shape_of(LLAMA_3_8B)
    assert shape is not None
    counts = count(shape, _spec())
    assert counts.total == counts.trainable == 8_030_261_248  # "8.03B" on the model card
    lora = count(shape, _spec(LORA))
    assert lora.trainable == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024))  # r x (in + out) per projection


def test_auto_picks_ddp_on_one_80g_gpu_and_fsdp_on_eight_24g_gpus() -> None:
    spec = _spec(LORA)
    one = plan(spec, LLAMA_3_8B, Gpus(1, 80 * GIB, "1x80"))
    eight = plan(spec, LLAMA_3_8B, Gpus(8, 24 * GIB, "8x24"))
    assert (one.strategy, one.fits("ddp")) == ("ddp", True)
    assert (eight.strategy, eight.fits("ddp"), eight.fits("fsdp")) == ("fsdp", False, True)
    assert eight.estimates["fsdp"].parameters == pytest.approx(eight.estimates["ddp"].parameters / 8)
    assert eight.summary()["perGpuGiB"] == eight.per_gpu_gib("fsdp") < 24
    tight = plan(_spec(), LLAMA_3_8B, Gpus(1, 150 * GIB, "1x150"))  # fsdp's total is below ddp's on one GPU...
    assert tight.fits("ddp") is False and tight.fits("fsdp") and tight.strategy == "ddp"  # ...but nothing to shard


def test_a_full_fine_tune_of_8b_fits_no_strategy_on_one_gpu_and_says_so_with_numbers() -> None:
    found = plan(_spec(), LLAMA_3_8B, Gpus(1, 80 * GIB, "resources.gpuMemory 80Gi"))
    assert found.strategy == "ddp" and found.fits("ddp") is False
    assert found.estimates["ddp"].optimizer == 8 * 8_030_261_248  # two fp32 AdamW moments
    with pytest.raises(ConfigError) as raised:
        check_fits(found)
    message = str(raised.value)
    assert message.startswith("distributed.strategy: the job fits no strategy on 1 GPU(s) of 80.0 GiB")
    assert f"ddp {found.per_gpu_gib('ddp'):.1f} GiB" in message and "\n" not in message
    check_fits(plan(_spec(), LLAMA_3_8B, Gpus(8, 80 * GIB, "8x80")))  # sharded over 8 it fits: no error


def test_unknown_gpu_memory_or_family_means_ddp_and_never_a_failure() -> None:
    for config, gpus in ((LLAMA_3_8B, Gpus(1, None, "unknown")), ({"model_type": "resnet"}, Gpus(1, GIB, "1 GiB"))):
        found = plan(_spec(), config, gpus)
        assert found.strategy == "ddp" and found.fits("ddp") is None
        check_fits(found)


def test_an_explicit_strategy_is_kept() -> None:
    assert plan(_spec(LORA), LLAMA_3_8B, Gpus(1, 80 * GIB, "x")).strategy == "ddp"
    fsdp = TrainingSpec.model_validate({**_spec(LORA).to_wire(), "distributed": {"strategy": "fsdp"}})
    assert plan(fsdp, LLAMA_3_8B, Gpus(1, 80 * GIB, "x")).strategy == "fsdp"


def test_qlora_stores_the_base_in_about_half_a_byte_per_parameter() -> None:
    lora = plan(_spec(LORA), LLAMA_3_8B, Gpus(1, 24 * GIB, "x")).estimates["ddp"]
    qlora_spec = _spec({**LORA, "lora": {**LORA["lora"], "quantization": "4bit"}})  # type: ignore[dict-item]
    qlora = plan(qlora_spec, LLAMA_3_8B, Gpus(1, 24 * GIB, "x"))
    base = qlora.estimates["ddp"].parameters
    assert 0.3 * lora.parameters < base < 0.45 * lora.parameters  # blocks at 0.52 B, embeddings/head in bf16
    assert qlora.fits("ddp")  # QLoRA of an 8B model fits one 24 GiB GPU


def test_activations_shrink_with_gradient_checkpointing() -> None:
    est = plan(_spec(LORA), LLAMA_3_8B, Gpus(1, None, "x")).estimates["ddp"]
    assert est.checkpointed_activations < est.activations / 3


@pytest.mark.parametrize(
    ("resources", "world", "gib", "source"),
    [
        ({}, 1, None, "unknown GPU memory"),
        ({"gpusPerNode": 0, "gpuMemory": "80Gi"}, 1, None, "CPU"),
        ({"nodes": 2, "gpusPerNode": 4, "gpuMemory": "40Gi"}, 8, 40, "resources.gpuMemory 40Gi"),
        ({"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}, 1, 80, None),
        ({"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"}}, 1, 24, None),
        ({"nodeSelector": {"nvidia.com/gpu.product": "Some-Card-48GB"}}, 1, 48, None),
        ({"nodeSelector": {"nvidia.com/gpu.product": "Mystery"}}, 1, None, "unknown GPU memory"),
        ({"gpuMemory": "20Gi", "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}}, 1, 20, None),
    ],
)
def test_the_gpus_a_job_asks_for(resources: dict[str, Any], world: int, gib: int | None, source: str | None) -> None:
    gpus = job_gpus(resources)
    assert (gpus.world, gpus.memory) == (world, gib * GIB if gib else None)
    if source is not None:
        assert gpus.source == source


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}, str(80 * GIB)),
        ({"gpusPerNode": 0, "gpuMemory": "80Gi"}, None),  # a CPU job has no GPU memory
        ({}, None),  # unknown: the trainer's auto means ddp
    ],
)
def test_the_operator_passes_the_gpu_memory_the_job_asks_for(resources: dict[str, Any], expected: str | None) -> None:
    manifest = baseline("gpus")
    manifest["spec"]["resources"] = resources
    pod = batch_job(FineTuneJob.model_validate(manifest), Settings())["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env.get(GPU_MEMORY_ENV) == expected
