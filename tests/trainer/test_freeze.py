"""Each freeze policy on tiny BERT / GPT-2 / Llama / ViT: after two optimizer steps exactly the intended
parameters changed and every other one is bit-identical (frozen parameters get no optimizer state)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from finetune_trainer.errors import ConfigError
from finetune_trainer.freeze import apply_freeze, layer_map
from finetune_trainer.optim import param_groups
from finetune_trainer.spec import FreezeSpec
from tests.trainer import tiny

# Hand-written name prefixes per architecture (independent of the discovery code under test).
ARCH: dict[str, dict[str, Any]] = {
    "bert": {
        "task": "sequence-classification",
        "emb": ("bert.embeddings.",),
        "block": "bert.encoder.layer.{}.",
        "neck": ("bert.pooler.",),
        "head": ("classifier.",),
    },
    "gpt2": {  # lm_head is tied to wte: the head *is* the input embedding matrix
        "task": "causal-lm",
        "emb": ("transformer.wte.", "transformer.wpe."),
        "block": "transformer.h.{}.",
        "neck": ("transformer.ln_f.",),
        "head": ("transformer.wte.",),
    },
    "llama": {
        "task": "causal-lm",
        "emb": ("model.embed_tokens.",),
        "block": "model.layers.{}.",
        "neck": ("model.norm.",),
        "head": ("lm_head.",),
    },
    "vit": {
        "task": "image-classification",
        "emb": ("vit.embeddings.",),
        "block": "vit.layers.{}.",  # transformers v5 naming (v4: vit.encoder.layer)
        "neck": ("vit.layernorm.",),
        "head": ("classifier.",),
    },
}
LAYERS = 2


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return name.startswith(prefixes)


def expected(arch: str, strategy: str) -> Callable[[str], bool]:
    a = ARCH[arch]
    block = lambda i: (a["block"].format(i),)  # noqa: E731
    emb, neck, head = a["emb"], a["neck"], a["head"]
    if strategy == "none":
        return lambda n: True
    if strategy == "head-only":
        return lambda n: _in(n, head)
    if strategy == "bottom-layers":
        return lambda n: not _in(n, emb) and not _in(n, block(0))
    if strategy == "top-layers":
        return lambda n: _in(n, block(1)) or _in(n, neck) or _in(n, head)
    if strategy == "embeddings":
        return lambda n: not _in(n, emb)
    if strategy == "modules":
        return lambda n: not _in(n, block(0)) or bool(re.search(r"(?i)norm|ln_\d", n))
    if strategy == "lora":
        return lambda n: "lora_" in n or "modules_to_save" in n
    raise AssertionError(strategy)


SPECS = {
    "none": FreezeSpec(strategy="none"),
    "head-only": FreezeSpec(strategy="head-only"),
    "bottom-layers": FreezeSpec(strategy="bottom-layers", layers=1),
    "top-layers": FreezeSpec(strategy="top-layers", layers=1),
    "embeddings": FreezeSpec(strategy="none", embeddings=True),
    "modules": FreezeSpec(
        strategy="modules",
        frozenModules=[r"(layer|h|layers)\.0\."],
        trainableModules=[r"(?i)(layer|h|layers)\.0\..*(norm|ln_\d)"],
    ),
    "lora": FreezeSpec(strategy="lora"),
}


def batch(arch: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if arch == "vit":
        return {"pixel_values": torch.randn(4, 3, 16, 16, generator=gen), "labels": torch.tensor([0, 1, 0, 1])}
    ids = torch.randint(5, len(tiny.VOCAB), (4, 12), generator=gen)
    if ARCH[arch]["task"] == "causal-lm":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])}


def train_two_steps(model: torch.nn.Module, arch: str) -> None:
    decay = {n for n, _ in model.named_parameters() if "bias" not in n and "norm" not in n.lower()}
    groups = param_groups(
        model.named_parameters(), decay, learning_rate=1e-2, weight_decay=0.01, layers=None, lr_decay=None
    )
    optimizer = torch.optim.AdamW(groups)
    state_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert state_params == {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    for _ in range(2):
        loss = model(**batch(arch)).loss
        loss.backward()
        for p in model.parameters():
            assert p.requires_grad or p.grad is None, "a frozen parameter received a gradient"
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("strategy", list(SPECS))
@pytest.mark.parametrize("arch", list(ARCH))
def test_freeze_changes_exactly_the_intended_parameters(arch: str, strategy: str) -> None:
    task = ARCH[arch]["task"]
    model = tiny.build(arch, task, layers=LAYERS, hidden_dropout_prob=0.0)
    model, plan = apply_freeze(model, SPECS[strategy], task)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_two_steps(model, arch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    want = expected(arch, strategy)
    intended = {n for n in before if want(n)}
    assert changed == intended, (sorted(changed ^ intended))[:8]
    assert plan.trainable == sum(p.numel() for n, p in model.named_parameters() if n in intended)
    assert plan.total == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("arch", list(ARCH))
def test_layer_discovery(arch: str) -> None:
    model = tiny.build(arch, ARCH[arch]["task"], layers=3)
    layers = layer_map(model)
    assert layers.blocks_prefix == ARCH[arch]["block"].format("")[:-2]
    assert layers.num_blocks == 3
    assert all(n.startswith(ARCH[arch]["emb"]) for n in layers.embeddings)
    assert layers.depth(layers.blocks[2][0]) == 0
    assert layers.depth(layers.blocks[0][0]) == 2
    assert layers.depth(layers.embeddings[0]) == 3


def test_layer_wise_lr_decay_groups() -> None:
    model = tiny.build("bert", "sequence-classification", layers=3)
    layers = layer_map(model)
    groups = param_groups(
        model.named_parameters(), set(), learning_rate=1.0, weight_decay=0.0, layers=layers, lr_decay=0.5
    )
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == 1.0
    assert lr_of[id(named["bert.encoder.layer.2.output.dense.weight"])] == 1.0
    assert lr_of[id(named["bert.encoder.layer.1.output.dense.weight"])] == 0.5
    assert lr_of[id(named["bert.encoder.layer.0.output.dense.weight"])] == 0.25
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])] == 0.125


def test_pattern_matching_nothing_is_a_config_error() -> None:
    model = tiny.build("bert", "sequence-classification")
    with pytest.raises(ConfigError, match=r"freeze.frozenModules\[0\]: pattern 'nope' matches no parameter"):
        apply_freeze(model, FreezeSpec(strategy="modules", frozenModules=["nope"]), "sequence-classification")


def test_too_many_layers_is_a_config_error() -> None:
    model = tiny.build("bert", "sequence-classification")
    with pytest.raises(ConfigError, match=r"freeze\.layers: 5 exceeds the 2 blocks"):
        apply_freeze(model, FreezeSpec(strategy="bottom-layers", layers=5), "sequence-classification")


def test_gradual_unfreezing_units_are_top_down() -> None:
    model = tiny.build("bert", "sequence-classification", layers=2)
    spec = FreezeSpec(strategy="head-only", gradualUnfreezing={"startEpoch": 2, "layersPerEpoch": 1})
    _, plan = apply_freeze(model, spec, "sequence-classification")
    firsts = [unit[0] for unit in plan.thaw_units]
    assert firsts == [
        "bert.pooler.dense.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.embeddings.word_embeddings.weight",
    ]
