"""Speed features that must not change what is learned: checkpointing past a frozen prefix, GPU defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from finetune_trainer import run as run_mod
from finetune_trainer.cli import main
from finetune_trainer.contract import CPU_REQUEST_ENV
from finetune_trainer.freeze import find_block_stack
from finetune_trainer.speed import (
    CPU,
    MAX_WORKERS,
    Device,
    Loading,
    available_cpus,
    base_dtype,
    data_loading,
    pad_for_tensor_cores,
    resolve_precision,
    upcast_trainable,
    use_tf32,
)
from tests.trainer import tiny


def _train(tmp_path: Path, assets: dict[str, Path], name: str, checkpointing: bool) -> tuple[Path, str]:
    out = tmp_path / name
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        freeze={"strategy": "bottom-layers", "layers": 1},
        hyperparameters={
            "learningRate": 1e-2,
            "batchSize": 8,
            "maxSteps": 3,
            "seed": 0,
            "weightDecay": 0.0,
            "dropout": 0.0,
            "gradientCheckpointing": checkpointing,
        },
        evaluation={"strategy": "no", "metrics": ["loss"]},
    )
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(wire))
    code = main(["--config", str(config)])
    return out / "model", str(code)


def test_checkpointing_never_back_propagates_through_the_frozen_prefix(
    tmp_path: Path, assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lowest frozen block sees no backward pass, and the trainable weights end as without checkpointing."""
    backward_calls: list[str] = []
    forward_calls: list[str] = []
    apply_freeze = run_mod.apply_freeze

    def hooked(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = apply_freeze(model, *args, **kwargs)
        _, blocks = find_block_stack(model)
        lowest = next(m for m in model.modules() if set(m.parameters()) == set(blocks[0]))
        lowest.register_full_backward_hook(lambda *_: backward_calls.append("backward"))
        lowest.register_forward_hook(lambda *_: forward_calls.append("forward"))
        return result

    monkeypatch.setattr(run_mod, "apply_freeze", hooked)
    checkpointed, code = _train(tmp_path, assets, "checkpointed", checkpointing=True)
    assert code == "0"
    assert backward_calls == []
    assert len(forward_calls) == 3, "the frozen block ran again: it was recomputed"
    monkeypatch.setattr(run_mod, "apply_freeze", apply_freeze)
    plain, code = _train(tmp_path, assets, "plain", checkpointing=False)
    assert code == "0"

    with_checkpoints = AutoModelForSequenceClassification.from_pretrained(str(checkpointed)).state_dict()
    without = AutoModelForSequenceClassification.from_pretrained(str(plain)).state_dict()
    before = AutoModelForSequenceClassification.from_pretrained(str(assets["bert"])).state_dict()
    trained = [n for n in without if "layer.1." in n and not torch.equal(before[n], without[n])]
    assert trained, "the top block should have trained"
    for name, value in without.items():
        torch.testing.assert_close(with_checkpoints[name], value, rtol=1e-5, atol=1e-6, msg=name)


H100 = Device(cuda=True, capability=(9, 0), bf16=True)
T4 = Device(cuda=True, capability=(7, 5), bf16=False)


@pytest.mark.parametrize(
    ("requested", "device", "precision", "warns"),
    [
        ("auto", H100, "bf16", False),
        ("auto", T4, "fp32", False),
        ("auto", CPU, "fp32", False),
        ("fp32", H100, "fp32", False),
        ("fp16", T4, "fp16", False),
        ("fp16", CPU, "fp32", True),
        ("bf16", T4, "fp32", True),
        ("bf16", CPU, "bf16", False),
    ],
)
def test_precision_auto_is_bf16_where_the_gpu_has_it_and_explicit_values_stand(
    requested: str, device: Device, precision: str, warns: bool
) -> None:
    resolved, warning = resolve_precision(requested, device)
    assert resolved == precision
    assert (warning is not None) == warns


def test_tf32_only_for_fp32_matmuls_on_ampere_and_newer() -> None:
    assert use_tf32("fp32", H100)
    assert use_tf32("fp32", Device(cuda=True, capability=(8, 0), bf16=True))
    assert not use_tf32("fp32", T4)
    assert not use_tf32("bf16", H100)
    assert not use_tf32("fp32", CPU)


def test_lora_base_loads_in_the_compute_dtype_and_trainable_weights_stay_fp32() -> None:
    assert base_dtype("lora", "bf16") == torch.bfloat16
    assert base_dtype("lora", "fp16") == torch.float16
    assert base_dtype("lora", "fp32") == torch.float32
    assert base_dtype("bottom-layers", "bf16") == torch.float32  # trainable weights need fp32 masters
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert upcast_trainable(model) == 2
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_data_loading_follows_the_cpu_request_on_gpu_only() -> None:
    assert data_loading(8, CPU) == Loading(0, False, False, None)
    assert data_loading(8, H100) == Loading(7, True, True, 8)
    assert data_loading(1, H100) == Loading(0, True, False, 8)
    assert data_loading(64, H100).workers == MAX_WORKERS
    assert available_cpus({CPU_REQUEST_ENV: "16", "LOCAL_WORLD_SIZE": "4"}) == 4
    assert available_cpus({CPU_REQUEST_ENV: "3"}) == 3
    assert available_cpus({CPU_REQUEST_ENV: "0"}) == len(os.sched_getaffinity(0))


def test_tensor_core_padding_only_on_gpu() -> None:
    collator = SimpleNamespace(pad_to_multiple_of=None)
    assert pad_for_tensor_cores(collator, CPU).pad_to_multiple_of is None
    assert pad_for_tensor_cores(collator, H100).pad_to_multiple_of == 8


def test_tokenized_datasets_are_reused_from_the_output_volume(
    tmp_path: Path, assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second prepare (a restart, another rank) encodes nothing; a different max length encodes again."""
    from transformers import AutoTokenizer

    from finetune_trainer import data
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.spec import TrainingSpec

    encoded: list[int] = []
    tokenize = data.tokenize_text

    def counting(spec: Any, rows: Any, processor: Any) -> Any:
        encoded.append(len(rows))
        return tokenize(spec, rows, processor)

    monkeypatch.setattr(data, "tokenize_text", counting)
    processor = AutoTokenizer.from_pretrained(str(assets["bert"]))
    env = RuntimeEnv.from_environ({})

    def prepare(max_length: int) -> Any:
        wire = tiny.spec(assets["bert"], assets["sentiment"], tmp_path / "out", dataset={"maxSeqLength": max_length})
        return data.prepare(TrainingSpec.model_validate(wire), env, processor, None)

    first = prepare(32)
    assert encoded == [96, 48] and first.cached_splits == ()
    second = prepare(32)
    assert encoded == [96, 48], "tokenized again"
    assert second.cached_splits == ("train", "validation")
    assert second.train.to_dict() == first.train.to_dict()
    assert second.validation.to_dict() == first.validation.to_dict()
    shorter = prepare(8)
    assert encoded == [96, 48, 96, 48] and shorter.cached_splits == ()
    assert max(len(ids) for ids in shorter.train["input_ids"]) == 8 < max(len(ids) for ids in first.train["input_ids"])


def _cache_run(
    tmp_path: Path,
    assets: dict[str, Path],
    name: str,
    freeze: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    kind: str = "bert",
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """3 epochs with the model's own dropout (0.1): equal weights with and without the cache mean equal
    dropout masks in the trainable part too. They are: the frozen prefix runs in eval mode in both runs (see
    freeze.PrefixEvalMode), so it draws no random numbers, and the seeded stream reaches the trainable layers
    in the same order whether or not the prefix runs."""
    out = tmp_path / name
    causal = kind != "bert"
    wire = tiny.spec(
        assets[kind],
        assets["text" if causal else "sentiment"],
        out,
        task="causal-lm" if causal else "sequence-classification",
        freeze=freeze,
        hyperparameters={"learningRate": 1e-2, "batchSize": 16, "epochs": 3, "seed": 0, "weightDecay": 0.0},
        evaluation={"strategy": "epoch", "metrics": ["loss"] if causal else ["loss", "accuracy"]},
    )
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(wire))
    assert main(["--config", str(config)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    return auto.from_pretrained(str(out / "model")).state_dict(), events


def _count_lowest_attention(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, every forward of the tiny BERT's lowest block's attention appends to the returned list."""
    calls: list[int] = []
    apply_freeze = run_mod.apply_freeze

    def hooked(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = apply_freeze(model, *args, **kwargs)
        model.bert.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
        return result

    monkeypatch.setattr(run_mod, "apply_freeze", hooked)
    return calls


@pytest.mark.parametrize(
    "freeze",
    [
        {"strategy": "bottom-layers", "layers": 1},
        {"strategy": "head-only"},
        {"strategy": "bottom-layers", "layers": 2, "gradualUnfreezing": {"startEpoch": 3}},
    ],
    ids=["bottom-layers", "head-only", "gradual-unfreezing"],
)
def test_the_activation_cache_trains_the_same_weights_and_skips_the_frozen_layers(
    freeze: dict[str, Any],
    tmp_path: Path,
    assets: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """3 epochs with evaluation: the lowest frozen block's attention runs in epoch 1 only (train and validation)."""
    plain, _ = _cache_run(tmp_path, assets, "plain", freeze, capsys)
    attention_calls = _count_lowest_attention(monkeypatch)
    cached, events = _cache_run(tmp_path, assets, "cached", {**freeze, "cacheActivations": True}, capsys)
    report = next(e for e in events if e["event"] == "freeze")["activationCache"]
    assert report["enabled"] and report["examples"] == 96 + 48 and report["estimatedBytes"] > 0
    batches = 96 // 16 + 48 // 16  # one pass over train and validation
    dropped = [e for e in events if e["event"] == "warning" and "activation cache dropped" in e["message"]]
    if "gradualUnfreezing" in freeze:  # block 1 thaws in epoch 3: the frozen prefix shrinks, the cache goes
        assert len(dropped) == 1 and "gradual unfreezing" in dropped[0]["message"]
        assert len(attention_calls) == 2 * batches
    else:
        assert dropped == []
        assert len(attention_calls) == batches, "the frozen layers ran again after the first epoch"
    before = AutoModelForSequenceClassification.from_pretrained(str(assets["bert"])).state_dict()
    assert any(not torch.equal(before[n], plain[n]) for n in plain)
    for name, value in plain.items():
        torch.testing.assert_close(cached[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_activation_cache_replays_no_dropout_noise_of_the_frozen_prefix(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """GPT-2's embedding dropout owns no parameters and sits in the frozen prefix: were it on, the cache would
    replay epoch 1's mask in every epoch and train other weights than the run without the cache."""
    freeze = {"strategy": "bottom-layers", "layers": 1}
    plain, _ = _cache_run(tmp_path, assets, "plain", freeze, capsys, kind="gpt2")
    cached, events = _cache_run(tmp_path, assets, "cached", {**freeze, "cacheActivations": True}, capsys, kind="gpt2")
    assert next(e for e in events if e["event"] == "freeze")["activationCache"]["enabled"]
    for name, value in plain.items():
        torch.testing.assert_close(cached[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_cache_activations_needs_a_frozen_bottom() -> None:
    from pydantic import ValidationError

    from finetune_trainer.spec import FreezeSpec

    with pytest.raises(ValidationError, match="cacheActivations needs strategy head-only or bottom-layers"):
        FreezeSpec.model_validate({"strategy": "top-layers", "layers": 1, "cacheActivations": True})


def test_an_activation_cache_that_would_not_fit_in_memory_is_not_built(tmp_path: Path, assets: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from finetune_trainer import data
    from finetune_trainer.activation_cache import install, memory_budget
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.freeze import apply_freeze
    from finetune_trainer.spec import TrainingSpec

    wire = tiny.spec(assets["bert"], assets["sentiment"], tmp_path, freeze={"strategy": "head-only"})
    spec = TrainingSpec.model_validate(wire)
    prepared = data.prepare(spec, RuntimeEnv.from_environ({}), AutoTokenizer.from_pretrained(str(assets["bert"])), None)
    model = AutoModelForSequenceClassification.from_pretrained(str(assets["bert"]))
    apply_freeze(model, spec.freeze, spec.model.task)
    cache, same, report = install(model, prepared, 32, lambda _: None, budget=1000)
    assert cache is None and same is prepared
    assert report["enabled"] is False and "more than the 1000 bytes" in report["reason"]
    cache, indexed, report = install(model, prepared, 32, lambda _: None, budget=memory_budget())
    assert cache is not None and report["enabled"] and report["estimatedBytes"] > 1000
    assert indexed.train["example_index"] == list(range(96))
    assert indexed.validation is not None and indexed.validation["example_index"] == list(range(96, 144))
    _, _, shared = install(model, prepared, 32, lambda _: None, budget=memory_budget(), ranks=2)
    assert shared["estimatedBytes"] * 2 == report["estimatedBytes"], "each of 2 ranks caches half the examples"


@pytest.mark.parametrize(("examples", "ranks"), [(96, 2), (101, 4), (3, 4)])
def test_each_rank_gets_a_fixed_shard_reshuffled_every_epoch(examples: int, ranks: int) -> None:
    from finetune_trainer.activation_cache import FixedShardSampler

    def order(rank: int, epoch: int, seed: int = 7) -> list[int]:
        sampler = FixedShardSampler(examples, rank, ranks, seed)  # a fresh one: a restarted process
        sampler.set_epoch(epoch)
        return list(sampler)

    shards = [set(order(rank, 0)) for rank in range(ranks)]
    assert set().union(*shards) == set(range(examples)), "every example is some rank's"
    lengths = {len(FixedShardSampler(examples, rank, ranks, 7)) for rank in range(ranks)}
    assert lengths == {-(-examples // ranks)} == {len(order(rank, 0)) for rank in range(ranks)}
    if examples % ranks == 0:
        assert all(a.isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1 :]), "no padding, no overlap"
    else:  # padded with the first examples, as torch's DistributedSampler does
        assert sum(len(shard) for shard in shards) - examples <= ranks
    for rank in range(ranks):
        assert all(set(order(rank, epoch)) == shards[rank] for epoch in (1, 2, 5)), "the same shard every epoch"
        assert order(rank, 2) == order(rank, 2), "deterministic from seed and epoch"
        if len(shards[rank]) > 2:
            assert order(rank, 1) != order(rank, 2), "reshuffled every epoch"
            assert order(rank, 1, seed=8) != order(rank, 1), "the seed decides"
    sampler = FixedShardSampler(examples, 0, ranks, 7)
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler) == order(0, 3), "no hidden state: only the seed and the epoch decide"
    with pytest.raises(ValueError, match="rank 2 is not one of 2 ranks"):
        FixedShardSampler(examples, 2, 2, 7)


def test_a_disk_store_trusts_only_what_was_persisted_for_the_same_key(tmp_path: Path) -> None:
    from finetune_trainer.activation_cache import DiskStore

    lengths = [3, 1, 2]
    first, last = torch.randn(3, 4), torch.randn(2, 4)
    store = DiskStore(tmp_path / "rank-0", lengths, 4, "key")
    store.put(0, first)
    store.persist()
    store.put(2, last)  # written but not yet recorded: a kill now must not make a restart trust it
    again = DiskStore(tmp_path / "rank-0", lengths, 4, "key")
    assert again.reused == 1 and 0 in again and 2 not in again and 1 not in again
    torch.testing.assert_close(again.get(0), first)
    with pytest.raises(ValueError, match="attends 2 tokens, not its 1"):
        again.put(1, torch.zeros(2, 4))
    other = DiskStore(tmp_path / "rank-0", lengths, 4, "another model or data")
    assert other.reused == 0 and 0 not in other
    other.put(1, torch.ones(1, 4))
    other.put(0, first)
    other.put(2, last)  # the last example: recorded without waiting for a checkpoint
    assert DiskStore(tmp_path / "rank-0", lengths, 4, "another model or data").reused == 3
    other.clear()
    assert not (tmp_path / "rank-0").exists()


def test_a_rank_cleans_only_its_own_leftovers_in_the_shared_cache_folder(tmp_path: Path) -> None:
    """Ranks of a pod start their disk stores side by side: rank 0 (a new key) must not delete the store rank 1 is
    writing right now, only what its own killed predecessor left."""
    from finetune_trainer.activation_cache import DiskStore

    parent = tmp_path / "cache" / "activations"
    writing = parent / ".tmp-rank-1-0123abcd"  # rank 1, inside atomic_directory
    writing.mkdir(parents=True)
    (writing / "activations.npy").write_bytes(b"rows")
    tenth = parent / ".tmp-rank-10-0123abcd"
    tenth.mkdir()
    mine = parent / ".tmp-rank-0-89abcdef"  # rank 0's, from a killed run
    mine.mkdir()
    moved_aside = parent / ".tmp-rank-0-old-76543210"  # a replaced store of rank 0 whose successor never arrived
    moved_aside.mkdir()
    DiskStore(parent / "rank-0", [2, 1], 4, "key")
    assert writing.is_dir() and (writing / "activations.npy").read_bytes() == b"rows" and tenth.is_dir()
    assert not mine.exists() and not moved_aside.exists()
    assert (parent / "rank-0" / "meta.json").is_file()


def test_an_activation_cache_over_the_memory_budget_spills_to_disk_and_trains_the_same_weights(
    tmp_path: Path,
    assets: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A forced-small memory budget: the cache goes next to the checkpoints, the frozen block runs in epoch 1 only."""
    import numpy as np

    freeze = {"strategy": "bottom-layers", "layers": 1}
    plain, _ = _cache_run(tmp_path, assets, "plain", freeze, capsys)
    monkeypatch.setattr(run_mod, "memory_budget", lambda: 1000)
    attention_calls = _count_lowest_attention(monkeypatch)
    cached, events = _cache_run(tmp_path, assets, "spilled", {**freeze, "cacheActivations": True}, capsys)
    report = next(e for e in events if e["event"] == "freeze")["activationCache"]
    directory = tmp_path / "spilled" / "cache" / "activations" / "rank-0"
    assert report["storage"] == "disk" and report["location"] == str(directory)
    header = 128  # the .npy header before the float32 rows
    assert report["reusedExamples"] == 0
    assert report["estimatedBytes"] == (directory / "activations.npy").stat().st_size - header
    assert np.load(directory / "filled.npy").all()
    assert not [e for e in events if e["event"] == "warning" and "activation" in e["message"]]
    assert len(attention_calls) == 96 // 16 + 48 // 16, "the frozen layers ran again after the first epoch"
    for name, value in plain.items():
        torch.testing.assert_close(cached[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_resumed_run_reuses_the_activations_its_predecessor_spilled_to_disk(
    tmp_path: Path, assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 1 fills the disk cache and checkpoints; the resumed run (epochs 2-3) never runs the frozen block."""
    from tests.trainer.helpers import of, train

    monkeypatch.setattr(run_mod, "memory_budget", lambda: 1000)
    attention_calls = _count_lowest_attention(monkeypatch)

    def wire(epochs: int) -> dict[str, Any]:
        return tiny.spec(
            assets["bert"],
            assets["sentiment"],
            tmp_path / "out",
            freeze={"strategy": "bottom-layers", "layers": 1, "cacheActivations": True},
            hyperparameters={"learningRate": 1e-2, "batchSize": 16, "epochs": epochs, "seed": 0, "dropout": 0.0},
            output={"location": str(tmp_path / "out"), "checkpointIntervalSteps": 96 // 16},
        )

    result, _ = train(wire(1))
    assert result.exit_code == 0 and len(attention_calls) == 96 // 16 + 48 // 16
    attention_calls.clear()
    result, events = train(wire(3))
    assert result.exit_code == 0 and of(events, "resume")[0]["step"] == 96 // 16
    assert of(events, "freeze")[0]["activationCache"]["reusedExamples"] == 96 + 48
    assert attention_calls == [], "the resumed run computed the frozen prefix again"


@pytest.mark.parametrize(("kind", "task"), [("bert", "sequence-classification"), ("llama", "causal-lm")])
def test_attention_runs_on_sdpa_where_the_model_supports_it(
    kind: str, task: str, assets: dict[str, Path], tmp_path: Path
) -> None:
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.models import load_model, resolve_source
    from finetune_trainer.spec import TrainingSpec

    wire = tiny.spec(assets[kind], assets["sentiment"], tmp_path, task=task)
    spec = TrainingSpec.model_validate(wire).model
    model = load_model(spec, resolve_source(spec, RuntimeEnv.from_environ({})))
    assert model.config._attn_implementation == "sdpa"
