"""Two real ranks under torchrun (gloo, CPU): what DDP must keep identical across ranks stays identical.

The runs are shared with ``test_fsdp.py``: one torchrun start runs them all (``tests/trainer/two_ranks.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.trainer.two_ranks import BERT_STEPS_PER_EPOCH, Runs


def test_gradual_unfreezing_keeps_the_ranks_weights_identical(assets: dict[str, Path], two_ranks: Runs) -> None:
    results = two_ranks.results("gradual")
    assert results[0] == results[1]
    out = two_ranks.outs["gradual"]
    ranks = [torch.load(out / f"rank-{rank}.pt") for rank in (0, 1)]
    base = load_file(str(assets["bert"] / "model.safetensors"))
    thawed = "bert.encoder.layer.1.output.dense.weight"  # thawed at epoch 3, after DDP wrapped the model
    assert not torch.equal(ranks[0][thawed], base[thawed]), "the late-thawed block trained"
    differ = [name for name in ranks[0] if not torch.equal(ranks[0][name], ranks[1][name])]
    assert differ == [], f"the ranks' weights diverged: {differ[:5]}"


def test_a_rank_that_cannot_see_the_checkpoints_is_a_config_error_on_every_rank(two_ranks: Runs) -> None:
    """Resumed where rank 1 cannot see rank 0's checkpoints (storage the nodes do not share): a clear config error
    on every rank, not ranks training different step counts into a hang."""
    assert two_ranks.code != 0
    output = two_ranks.output["private"]
    assert "output.location: the ranks see different checkpoints" in output
    assert "a multi-node job needs an output location that every node shares" in output


def test_one_ranks_early_stop_stops_every_rank(two_ranks: Runs) -> None:
    results = two_ranks.results("early-stop")
    assert [r["finalStep"] for r in results] == [BERT_STEPS_PER_EPOCH] * 2
    assert [r["reason"] for r in results] == ["EarlyStopped"] * 2
    assert json.loads((two_ranks.outs["early-stop"] / "result.json").read_text())["reason"] == "EarlyStopped"


def test_each_rank_caches_a_fixed_shard_and_a_run_resumed_mid_epoch_replays_it_in_the_same_order(
    two_ranks: Runs,
) -> None:
    """Epoch 1 runs the frozen block on each rank's 3 batches; epochs 2-3 replay them all from the rank's
    cache (spilled to disk: the pod's memory budget is smaller than the cache). Stopped at step 4 (epoch 2's
    first step) and resumed: the batches of the uninterrupted run, and every rank (not only the one that writes
    checkpoints) replays its shard from the disk cache the first run left."""
    # Pod-wide, the cache (all examples) fits the spare memory but not half of it: one budget for the pod spills
    # to disk. Each rank measuring its half of the cache against half of the spare memory kept it in memory, and
    # with N ranks a pod took N/2 times the budget.
    whole = two_ranks.results("cached")
    steps_per_epoch = BERT_STEPS_PER_EPOCH
    assert [r["finalStep"] for r in whole] == [3 * steps_per_epoch] * 2
    assert [r["frozenCalls"]["train"] for r in whole] == [steps_per_epoch] * 2, (
        "the frozen prefix ran again after the first epoch"
    )
    reports = [e["activationCache"] for e in two_ranks.events("cached") if e.get("event") == "freeze"]
    shards = [report["rankShard"] for report in reports]
    assert len(shards) == 2 and all(s["ranks"] == 2 and s["trainExamples"] == 96 // 2 for s in shards), shards
    assert [r["storage"] for r in reports] == ["disk"] * 2, "the ranks together would take more than the budget"
    spare = two_ranks.spare
    assert [r["memoryBudget"] for r in reports] == [spare // 2 // 2] * 2, "half the spare memory, shared by 2 ranks"
    weights = [torch.load(two_ranks.outs["cached"] / f"rank-{rank}.pt") for rank in (0, 1)]
    differ = [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])]
    assert differ == [], f"the ranks' weights diverged: {differ[:5]}"

    stopped, resumed = two_ranks.results("cached-stopped"), two_ranks.results("cached-resumed")
    for rank in (0, 1):
        assert len(whole[rank]["batches"]) == 3 * steps_per_epoch
        assert stopped[rank]["batches"] + resumed[rank]["batches"] == whole[rank]["batches"], f"rank {rank}"
        assert stopped[rank]["frozenCalls"]["train"] == steps_per_epoch
        assert resumed[rank]["frozenCalls"]["train"] == 0, f"rank {rank} computed its frozen prefix again"
    epochs = [[i for batch in whole[0]["batches"][e : e + steps_per_epoch] for i in batch] for e in (0, 3, 6)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1], "the same shard, reshuffled"
