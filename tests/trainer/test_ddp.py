"""Two real ranks under torchrun (gloo, CPU): what DDP must keep identical across ranks stays identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.trainer import tiny

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(tmp_path: Path, wire: dict[str, Any], **env: str) -> list[dict[str, Any]]:
    """Run two ranks; return each rank's result (a hang, e.g. ranks stopping at different steps, fails)."""
    code, output = run_ranks(tmp_path, wire, **env)
    assert code == 0, output[-3000:]
    out = Path(wire["output"]["location"])
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def run_ranks(tmp_path: Path, wire: dict[str, Any], **env: str) -> tuple[int, str]:
    """Two ranks under torchrun: (torchrun's exit code, the tail of their output)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(wire))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(WORKER.parents[2])]))
    process = subprocess.Popen(
        [*command, str(spec)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the ranks hung:\n{output.decode()[-3000:]}") from None
    return process.returncode, output.decode()


def _wire(assets: dict[str, Path], out: Path, **sections: Any) -> dict[str, Any]:
    """Tiny BERT on 96 examples, 3 epochs of 3 steps (batch 16 per rank, 2 ranks)."""
    hyperparameters = {"epochs": 3, "batchSize": 16, "learningRate": 1e-2, "seed": 0}
    wire = tiny.spec(assets["bert"], assets["sentiment"], out, hyperparameters=hyperparameters, **sections)
    wire["output"] = {"location": str(out)}
    return wire


def test_gradual_unfreezing_keeps_the_ranks_weights_identical(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    wire = _wire(
        assets,
        out,
        freeze={"strategy": "head-only", "gradualUnfreezing": {"startEpoch": 2, "layersPerEpoch": 1}},
        evaluation={"strategy": "no", "metrics": ["loss"]},
    )
    results = torchrun(tmp_path, wire)
    assert results[0] == results[1]
    ranks = [torch.load(out / f"rank-{rank}.pt") for rank in (0, 1)]
    base = load_file(str(assets["bert"] / "model.safetensors"))
    thawed = "bert.encoder.layer.1.output.dense.weight"  # thawed at epoch 3, after DDP wrapped the model
    assert not torch.equal(ranks[0][thawed], base[thawed]), "the late-thawed block trained"
    differ = [name for name in ranks[0] if not torch.equal(ranks[0][name], ranks[1][name])]
    assert differ == [], f"the ranks' weights diverged: {differ[:5]}"

    # Resumed where rank 1 cannot see rank 0's checkpoints (storage the nodes do not share): a clear
    # config error on every rank, not ranks training different step counts into a hang.
    code, output = run_ranks(tmp_path, wire, PRIVATE_OUTPUT_RANK="1")
    assert code != 0
    assert "output.location: the ranks see different checkpoints" in output
    assert "a multi-node job needs an output location that every node shares" in output


def test_one_ranks_early_stop_stops_every_rank(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    wire = _wire(assets, out, earlyStopping={"metric": "accuracy", "patience": 10})
    results = torchrun(tmp_path, wire, FORCE_EARLY_STOP_RANK="1")
    steps_per_epoch = 96 // (16 * 2)
    assert [r["finalStep"] for r in results] == [steps_per_epoch] * 2
    assert [r["reason"] for r in results] == ["EarlyStopped"] * 2
    assert json.loads((out / "result.json").read_text())["reason"] == "EarlyStopped"


def _cached_wire(assets: dict[str, Path], out: Path) -> dict[str, Any]:
    """The bottom block frozen and its activations cached; no dropout, no evaluation."""
    wire = _wire(
        assets,
        out,
        freeze={"strategy": "bottom-layers", "layers": 1, "cacheActivations": True},
        evaluation={"strategy": "no", "metrics": ["loss"]},
    )
    wire["hyperparameters"]["dropout"] = 0.0
    return wire


def _cache_bytes(assets: dict[str, Path], wire: dict[str, Any]) -> int:
    """What caching every training and validation example of ``wire`` takes (float32, hidden size 32)."""
    from transformers import AutoTokenizer

    from finetune_trainer import data
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.spec import TrainingSpec

    processor = AutoTokenizer.from_pretrained(str(assets["bert"]))
    prepared = data.prepare(TrainingSpec.model_validate(wire), RuntimeEnv.from_environ({}), processor, None)
    assert prepared.validation is not None
    return sum(len(ids) for rows in (prepared.train, prepared.validation) for ids in rows["input_ids"]) * 32 * 4


def test_each_rank_caches_a_fixed_shard_and_a_run_resumed_mid_epoch_replays_it_in_the_same_order(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """Epoch 1 runs the frozen block on each rank's 3 batches; epochs 2-3 replay them all from the rank's
    cache (spilled to disk: the pod's memory budget is smaller than the cache). Stopped at step 4 (epoch 2's
    first step) and resumed: the batches of the uninterrupted run, and every rank (not only the one that writes
    checkpoints) replays its shard from the disk cache the first run left."""
    # Pod-wide, the cache (all examples) fits the spare memory but not half of it: one budget for the pod spills
    # to disk. Each rank measuring its half of the cache against half of the spare memory kept it in memory, and
    # with N ranks a pod took N/2 times the budget.
    whole_cache = _cache_bytes(assets, _cached_wire(assets, tmp_path / "sizing"))
    spare = whole_cache * 3 // 2
    spill = {"ACTIVATION_SPARE_MEMORY": str(spare), "COUNT_FROZEN_CALLS": "1"}

    def ranks(out: Path, **env: str) -> list[dict[str, Any]]:
        return torchrun(tmp_path, _cached_wire(assets, out), **spill, **env)

    code, output = run_ranks(tmp_path, _cached_wire(assets, tmp_path / "whole"), **spill)
    assert code == 0, output[-3000:]
    whole = [json.loads((tmp_path / "whole" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    steps_per_epoch = 96 // (16 * 2)
    assert [r["finalStep"] for r in whole] == [3 * steps_per_epoch] * 2
    assert [r["frozenCalls"]["train"] for r in whole] == [steps_per_epoch] * 2, (
        "the frozen prefix ran again after the first epoch"
    )
    events = [json.loads(line) for line in output.splitlines() if line.startswith('{"')]
    reports = [e["activationCache"] for e in events if e.get("event") == "freeze"]
    shards = [report["rankShard"] for report in reports]
    assert len(shards) == 2 and all(s["ranks"] == 2 and s["trainExamples"] == 96 // 2 for s in shards), shards
    assert [r["storage"] for r in reports] == ["disk"] * 2, "the ranks together would take more than the budget"
    assert [r["memoryBudget"] for r in reports] == [spare // 2 // 2] * 2, "half the spare memory, shared by 2 ranks"
    weights = [torch.load(tmp_path / "whole" / f"rank-{rank}.pt") for rank in (0, 1)]
    differ = [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])]
    assert differ == [], f"the ranks' weights diverged: {differ[:5]}"

    stopped = ranks(tmp_path / "resumed", TERMINATE_AT_STEP="4")
    resumed = ranks(tmp_path / "resumed")
    for rank in (0, 1):
        assert len(whole[rank]["batches"]) == 3 * steps_per_epoch
        assert stopped[rank]["batches"] + resumed[rank]["batches"] == whole[rank]["batches"], f"rank {rank}"
        assert stopped[rank]["frozenCalls"]["train"] == steps_per_epoch
        assert resumed[rank]["frozenCalls"]["train"] == 0, f"rank {rank} computed its frozen prefix again"
    epochs = [[i for batch in whole[0]["batches"][e : e + steps_per_epoch] for i in batch] for e in (0, 3, 6)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1], "the same shard, reshuffled"
