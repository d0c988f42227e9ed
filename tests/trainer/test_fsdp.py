"""``distributed.strategy: fsdp`` on two real gloo ranks under torchrun: the same training as DDP and as one process,
sharded checkpoints that a killed run resumes from, one consolidated model at the end.

The runs (a tiny Llama, bottom-layers frozen and LoRA, FSDP and DDP, a killed run and its resumption) are shared
with ``test_ddp.py``: two torchrun starts run them all (``tests/trainer/two_ranks.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.two_ranks import FREEZES, LLAMA_EPOCHS, LLAMA_STEPS_PER_EPOCH, Runs, llama_wire

STEPS = LLAMA_EPOCHS * LLAMA_STEPS_PER_EPOCH


def _model(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.parametrize("freeze", list(FREEZES))
def test_fsdp_trains_the_weights_ddp_and_one_process_train(
    assets: dict[str, Path], two_ranks: Runs, freeze: str
) -> None:
    """The same examples per optimizer step, fp32 on the CPU: FSDP's reduce-scatter and DDP's all-reduce average the
    same gradients, and the single process sums the same 8 examples' tokens; only the order of float32 sums differs
    (accumulated micro-batches, one batch of 8). Measured: at most 4e-7 apart after 12 Adam steps at lr 1e-2. 1e-5 is
    25 times that and a thousandth of a single step's update (lr 1e-2): a sharding that lost or double-counted a
    rank's gradient, or reduced before the last micro-batch, would miss it by far."""
    fsdp, ddp, one = (_model(two_ranks.outs[f"{kind}-{freeze}"]) for kind in ("fsdp", "ddp", "one"))
    assert sorted(fsdp) == sorted(ddp) == sorted(one)
    for name in fsdp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=0, atol=1e-5, msg=f"{name}: fsdp vs ddp")
        torch.testing.assert_close(fsdp[name], one[name], rtol=0, atol=1e-5, msg=f"{name}: fsdp vs one process")
    base = load_file(str(assets["llama"] / "model.safetensors"))
    assert torch.equal(fsdp["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]), "frozen"
    assert not torch.equal(fsdp["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"]) or (
        freeze == "lora"
    )
    assert not torch.equal(
        fsdp["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"]
    )
    result = json.loads((two_ranks.outs[f"fsdp-{freeze}"] / "result.json").read_text())
    assert result["reason"] == "Succeeded" and result["finalStep"] == STEPS
    checkpoint = two_ranks.outs[f"fsdp-{freeze}"] / "checkpoints" / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(checkpoint.glob("model*.safetensors")), "a sharded checkpoint holds no gathered model"


def test_a_killed_fsdp_run_resumes_from_its_sharded_checkpoint(two_ranks: Runs) -> None:
    """SIGKILL to both ranks once the first epoch's checkpoint is written (the ranks wait there to be killed); the
    rerun resumes from it (each rank its shards, the optimizer state, its RNG) and ends with the weights of the
    uninterrupted run."""
    resumed = [event["step"] for event in two_ranks.events("resumed") if event["event"] == "resume"]
    assert resumed == [LLAMA_STEPS_PER_EPOCH] * 2, "each rank resumed from epoch 1's checkpoint"
    whole, again = _model(two_ranks.outs["fsdp-bottom-layers"]), _model(two_ranks.outs["resumed"])
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_a_sharded_checkpoint_resumes_only_on_the_strategy_and_ranks_that_wrote_it(two_ranks: Runs) -> None:
    from finetune_trainer.errors import ConfigError
    from finetune_trainer.sharding import check_resumable

    sharded = two_ranks.outs["fsdp-bottom-layers"] / "checkpoints" / f"checkpoint-{STEPS}"
    whole = two_ranks.outs["ddp-bottom-layers"] / "checkpoints" / f"checkpoint-{STEPS}"
    check_resumable(sharded, "fsdp", 2)
    check_resumable(whole, "ddp", 2)
    with pytest.raises(ConfigError, match="written by 2 ranks and this run has 4: a sharded checkpoint resumes on"):
        check_resumable(sharded, "fsdp", 4)
    with pytest.raises(
        ConfigError, match=r"distributed\.strategy: checkpoint-12 was written by fsdp, this run uses ddp"
    ):
        check_resumable(sharded, "ddp", 2)
    with pytest.raises(ConfigError, match="written by ddp, this run uses fsdp"):
        check_resumable(whole, "fsdp", 2)


@pytest.mark.parametrize(
    ("freeze", "refusal"),
    [
        ({"strategy": "head-only", "gradualUnfreezing": {}}, "fsdp cannot thaw layers (freeze.gradualUnfreezing)"),
        ({"strategy": "head-only", "cacheActivations": True}, "fsdp cannot cache activations"),
        ({"strategy": "lora", "lora": {"quantization": "4bit"}}, "fsdp cannot shard a 4-bit base"),
    ],
)
def test_what_fsdp_cannot_do_is_refused_with_the_reason(
    assets: dict[str, Path], tmp_path: Path, freeze: dict[str, Any], refusal: str
) -> None:
    from pydantic import ValidationError

    from finetune_trainer.spec import TrainingSpec

    wire = llama_wire(assets, tmp_path, "lora", "fsdp")
    TrainingSpec.model_validate(wire)
    with pytest.raises(ValidationError, match=re.escape(refusal)):
        TrainingSpec.model_validate({**wire, "freeze": freeze})
    TrainingSpec.model_validate({**wire, "freeze": freeze, "distributed": {"strategy": "ddp"}})


def test_qlora_without_a_gpu_is_a_config_error_naming_the_field() -> None:
    from finetune_trainer import qlora
    from finetune_trainer.errors import ConfigError
    from finetune_trainer.spec import FreezeSpec

    qlora.require(FreezeSpec.model_validate({"strategy": "lora"}), cuda=False)
    with pytest.raises(ConfigError, match=r"freeze\.lora\.quantization: 4bit \(QLoRA\) needs a CUDA GPU") as error:
        qlora.require(FreezeSpec.model_validate({"strategy": "lora", "lora": {"quantization": "4bit"}}), cuda=False)
    assert error.value.exit_code == 2
