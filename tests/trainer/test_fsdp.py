"""``distributed.strategy: fsdp`` on two real gloo ranks under torchrun: the same training as DDP and as one process,
sharded checkpoints that a killed run resumes from, one consolidated model at the end.

Two torchrun starts serve every check (a start costs more than these runs' training): one killed once its first
sharded checkpoint is written, then one that runs, one after the other, FSDP and DDP on a tiny Llama with
bottom-layers frozen and with LoRA (the two freeze kinds that shard differently: frozen base weights in the sharded
blocks, a PEFT wrapper around them) and the killed run's resumption.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer import tiny
from tests.trainer.helpers import train
from tests.trainer.test_ddp import WORKER, run_ranks

FREEZES: dict[str, dict[str, Any]] = {
    "bottom-layers": {"strategy": "bottom-layers", "layers": 1},
    "lora": {"strategy": "lora", "lora": {"r": 4, "dropout": 0.0}},
}
RANK_BATCH = 4
"""Per rank; the single process takes both ranks' batches at once (8): the same examples per optimizer step."""
STEPS_PER_EPOCH = 48 // (2 * RANK_BATCH)
EPOCHS = 2
"""A checkpoint per epoch: the killed run is killed after the first, the resumed one trains the second."""


def _wire(assets: dict[str, Path], out: Path, freeze: str, strategy: str, batch: int = RANK_BATCH) -> dict[str, Any]:
    """2 epochs of 6 steps on the tiny Llama, no dropout (the ranks' random streams differ), a checkpoint per epoch.

    The FSDP runs also exercise what must not change their weights: bottom-layers accumulates two micro-batches of
    half the size (the same examples per optimizer step; the reduce-scatter waits for the second), LoRA recomputes
    activations (gradient checkpointing)."""
    hyperparameters: dict[str, Any] = {
        "epochs": EPOCHS,
        "batchSize": batch,
        "learningRate": 1e-2,
        "seed": 0,
        "dropout": 0.0,
    }
    if strategy == "fsdp" and freeze == "bottom-layers" and batch == RANK_BATCH:
        hyperparameters.update(batchSize=batch // 2, gradientAccumulationSteps=2)
    if strategy == "fsdp" and freeze == "lora":
        hyperparameters["gradientCheckpointing"] = True
    return tiny.spec(
        assets["llama"],
        assets["text"],
        out,
        task="causal-lm",
        freeze=FREEZES[freeze],
        hyperparameters=hyperparameters,
        distributed={"strategy": strategy},
    )


def _kill_after_first_checkpoint(work: Path, wire: dict[str, Any]) -> None:
    """Two ranks that stop once epoch 1's checkpoint is written, SIGKILLed there (as the OOM killer would)."""
    spec = work / "spec.json"
    spec.write_text(json.dumps(wire))
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(WORKER.parents[2]),
        "HANG_AFTER_CHECKPOINT": str(STEPS_PER_EPOCH),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)]
    process = subprocess.Popen(
        [*command, str(spec)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    hanging: list[int] = []
    try:
        for line in process.stdout:
            if line.startswith('{"event": "hanging"'):
                hanging.append(json.loads(line)["pid"])
                if len(hanging) == 2:
                    break
        else:
            raise AssertionError("the run ended without its first checkpoint")
    finally:
        for pid in hanging:  # torchrun starts its workers in sessions of their own
            os.kill(pid, signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)


@pytest.fixture(scope="module")
def runs(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Output directories: ``<strategy>-<freeze>`` for fsdp and ddp on 2 ranks, ``one-<freeze>`` (a single process)
    and ``resumed`` (fsdp, bottom-layers: killed after epoch 1, then resumed); ``output``: the ranks' output."""
    root = tmp_path_factory.mktemp("fsdp")
    outs: dict[str, Any] = {"resumed": root / "resumed"}
    killed = _wire(assets, outs["resumed"], "bottom-layers", "fsdp")
    (root / "killed").mkdir()
    _kill_after_first_checkpoint(root / "killed", killed)
    assert not (outs["resumed"] / "result.json").exists(), "killed before the end"
    wires = []
    for strategy in ("fsdp", "ddp"):
        for freeze in FREEZES:
            outs[f"{strategy}-{freeze}"] = root / f"{strategy}-{freeze}"
            wires.append(_wire(assets, outs[f"{strategy}-{freeze}"], freeze, strategy))
    wires.append(killed)
    paths = []
    for index, wire in enumerate(wires):
        path = root / f"spec-{index}.json"
        path.write_text(json.dumps(wire))
        paths.append(str(path))
    code, outs["output"] = run_ranks(root, wires[0], EXTRA_SPECS=os.pathsep.join(paths[1:]))
    assert code == 0, outs["output"][-3000:]
    for freeze in FREEZES:
        outs[f"one-{freeze}"] = root / f"one-{freeze}"
        train(_wire(assets, outs[f"one-{freeze}"], freeze, "fsdp", batch=2 * RANK_BATCH))
    return outs


def _model(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.parametrize("freeze", list(FREEZES))
def test_fsdp_trains_the_weights_ddp_and_one_process_train(
    assets: dict[str, Path], runs: dict[str, Path], freeze: str
) -> None:
    """The same examples per optimizer step, fp32 on the CPU: FSDP's reduce-scatter and DDP's all-reduce average the
    same gradients, and the single process sums the same 8 examples' tokens; only the order of float32 sums differs
    (accumulated micro-batches, one batch of 8). Measured: at most 4e-7 apart after 18 Adam steps at lr 1e-2. 1e-5 is
    25 times that and a thousandth of a single step's update (lr 1e-2): a sharding that lost or double-counted a
    rank's gradient, or reduced before the last micro-batch, would miss it by far."""
    fsdp, ddp, one = (_model(runs[f"{kind}-{freeze}"]) for kind in ("fsdp", "ddp", "one"))
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
    result = json.loads((runs[f"fsdp-{freeze}"] / "result.json").read_text())
    assert result["reason"] == "Succeeded" and result["finalStep"] == EPOCHS * STEPS_PER_EPOCH
    checkpoint = runs[f"fsdp-{freeze}"] / "checkpoints" / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(checkpoint.glob("model*.safetensors")), "a sharded checkpoint holds no gathered model"


def test_a_killed_fsdp_run_resumes_from_its_sharded_checkpoint(runs: dict[str, Any]) -> None:
    """SIGKILL to both ranks once the first epoch's checkpoint is written (the ranks wait there to be killed); the
    rerun resumes from it (each rank its shards, the optimizer state, its RNG) and ends with the weights of the
    uninterrupted run."""
    resumed = [json.loads(line) for line in runs["output"].splitlines() if line.startswith('{"event": "resume"')]
    assert [event["step"] for event in resumed] == [STEPS_PER_EPOCH] * 2, "each rank resumed from epoch 1's checkpoint"
    whole, again = _model(runs["fsdp-bottom-layers"]), _model(runs["resumed"])
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_a_sharded_checkpoint_resumes_only_on_the_strategy_and_ranks_that_wrote_it(runs: dict[str, Path]) -> None:
    from finetune_trainer.errors import ConfigError
    from finetune_trainer.sharding import check_resumable

    sharded = runs["fsdp-bottom-layers"] / "checkpoints" / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"
    whole = runs["ddp-bottom-layers"] / "checkpoints" / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"
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

    wire = _wire(assets, tmp_path, "lora", "fsdp")
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
