"""Freeze policies on tiny BERT, GPT-2, Llama, ViT, Swin, ResNet and ConvNeXt.

The matrix runs every strategy on every family (less the redundant pairs in REDUNDANT) through the trainer's CLI
entry point in-process: the run exits 0, exactly the intended parameters changed (by name pattern, written by hand,
independent of the discovery code), every other parameter is bit-identical, and frozen BatchNorm kept its running
statistics. LoRA on the CNNs has no default target modules: exit 2 naming ``freeze.lora.targetModules``, and
success once they are given."""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer.cli import main
from finetune_trainer.errors import ConfigError
from finetune_trainer.freeze import apply_freeze, layer_map
from finetune_trainer.models import AUTO_CLASSES
from finetune_trainer.optim import param_groups
from finetune_trainer.spec import FreezeSpec
from tests.trainer import tiny


def _prefixes(*names: str) -> tuple[str, ...]:
    return tuple(f"{name}." for name in names)


# Per architecture: task, dataset asset, embeddings, blocks bottom first (a block may span several prefixes:
# a stage's downsampling joins its adjacent block), neck, head, and the LoRA targets' weight names.
ARCH: dict[str, dict[str, Any]] = {
    "bert": {
        "task": "sequence-classification",
        "data": "sentiment",
        "emb": _prefixes("bert.embeddings"),
        "blocks": [_prefixes(f"bert.encoder.layer.{i}") for i in range(3)],
        "neck": _prefixes("bert.pooler"),
        "head": _prefixes("classifier"),
        "lora": r"\.(query|value)\.weight$",
    },
    "gpt2": {  # tied lm_head: untied whenever the policy freezes wte but trains the head
        "task": "causal-lm",
        "data": "text",
        "emb": _prefixes("transformer.wte", "transformer.wpe"),
        "blocks": [_prefixes(f"transformer.h.{i}") for i in range(3)],
        "neck": _prefixes("transformer.ln_f"),
        "head": _prefixes("lm_head"),
        "lora": r"\.c_attn\.weight$",
    },
    "llama": {
        "task": "causal-lm",
        "data": "text",
        "emb": _prefixes("model.embed_tokens"),
        "blocks": [_prefixes(f"model.layers.{i}") for i in range(3)],
        "neck": _prefixes("model.norm"),
        "head": _prefixes("lm_head"),
        "lora": r"\.(q_proj|v_proj)\.weight$",
    },
    "vit": {
        "task": "image-classification",
        "data": "textured",
        "emb": _prefixes("vit.embeddings"),
        "blocks": [_prefixes(f"vit.layers.{i}") for i in range(3)],  # transformers v5 naming
        "neck": _prefixes("vit.layernorm"),
        "head": _prefixes("classifier"),
        "lora": r"\.(q_proj|v_proj)\.weight$",
    },
    "swin": {
        "task": "image-classification",
        "data": "textured",
        "emb": _prefixes("swin.embeddings"),
        "blocks": [
            _prefixes("swin.encoder.layers.0.blocks.0"),
            _prefixes("swin.encoder.layers.0.blocks.1", "swin.encoder.layers.0.downsample"),
            _prefixes("swin.encoder.layers.1.blocks.0"),
            _prefixes("swin.encoder.layers.1.blocks.1"),
        ],
        "neck": _prefixes("swin.layernorm"),
        "head": _prefixes("classifier"),
        "lora": r"\.(q_proj|v_proj)\.weight$",
    },
    "resnet": {
        "task": "image-classification",
        "data": "textured",
        "emb": _prefixes("resnet.embedder"),
        "blocks": [
            _prefixes("resnet.encoder.stages.0.layers.0"),
            _prefixes("resnet.encoder.stages.0.layers.1"),
            _prefixes("resnet.encoder.stages.1.layers.0"),
        ],
        "neck": (),
        "head": _prefixes("classifier"),
        "lora_targets": ["convolution"],
        "lora": r"\.convolution\.weight$",
    },
    "convnext": {
        "task": "image-classification",
        "data": "textured",
        "emb": _prefixes("convnext.embeddings"),
        "blocks": [
            _prefixes("convnext.encoder.stages.0.layers.0"),
            _prefixes("convnext.encoder.stages.0.layers.1"),
            _prefixes("convnext.encoder.stages.1.downsampling_layer", "convnext.encoder.stages.1.layers.0"),
        ],
        "neck": _prefixes("convnext.layernorm"),
        "head": _prefixes("classifier"),
        "lora_targets": ["pwconv1", "pwconv2"],
        "lora": r"\.(pwconv1|pwconv2)\.weight$",
    },
}
NORM = r"(?i:norm|ln_\d)"

Predicate = Callable[[str], bool]


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return name.startswith(prefixes)


def freeze_spec(arch: str, strategy: str) -> dict[str, Any]:
    first = re.escape(ARCH[arch]["blocks"][0][0])
    return {
        "none": {"strategy": "none"},
        "head-only": {"strategy": "head-only"},
        "bottom-layers": {"strategy": "bottom-layers", "layers": 2},
        "top-layers": {"strategy": "top-layers", "layers": 1},
        "embeddings": {"strategy": "none", "embeddings": True},
        "modules": {"strategy": "modules", "frozenModules": [f"^{first}"], "trainableModules": [f"^{first}.*{NORM}"]},
        "lora": {"strategy": "lora", "lora": {"r": 2, "alpha": 4}},
    }[strategy]


def trains(arch: str, strategy: str) -> Predicate:
    """Which parameter names the policy trains, from the hand-written table."""
    a = ARCH[arch]
    emb, blocks, neck, head = a["emb"], a["blocks"], a["neck"], a["head"]
    match strategy:
        case "none":
            return lambda n: True
        case "head-only":
            return lambda n: _in(n, head)
        case "bottom-layers":
            return lambda n: not _in(n, emb + blocks[0] + blocks[1])
        case "top-layers":
            return lambda n: _in(n, blocks[-1] + neck + head)
        case "embeddings":
            return lambda n: not _in(n, emb)
        case "modules":
            return lambda n: not _in(n, blocks[0]) or bool(re.search(NORM, n.removeprefix(blocks[0][0])))
        case "lora":
            task_head = head if a["task"] != "causal-lm" else ()
            return lambda n: bool(re.search(a["lora"], n)) or _in(n, task_head)
    raise AssertionError(strategy)


STRATEGIES = ["none", "head-only", "bottom-layers", "top-layers", "embeddings", "modules", "lora"]


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap() -> Iterator[None]:
    """The Trainer runs gc.collect() at the end of each run; skip the test process's long-lived heap (~2x faster)."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    saved = {arch: tiny.save_model(root / arch, arch, ARCH[arch]["task"], layers=3) for arch in ARCH}
    return {**saved, "textured": tiny.write_images(root / "textured", n=8, noise=60)}


def _weights(directory: Path, task: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters by every name, tied ones under both; BatchNorm running statistics)."""
    model = AUTO_CLASSES[task].from_pretrained(str(directory))
    params = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}  # tied: one storage
    stats = {
        f"{name}.{buffer}": getattr(module, buffer).clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for buffer in ("running_mean", "running_var", "num_batches_tracked")
    }
    return params, stats


def run_cli(tmp_path: Path, wire: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[Any]]:
    config = tmp_path / "spec.json"
    config.write_text(json.dumps(wire))
    code = main(["--config", str(config)])
    captured = capsys.readouterr()
    return code, captured.err, [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]


def matrix_spec(arch: str, freeze: dict[str, Any], models: dict[str, Path], assets: dict[str, Path], out: Path) -> Any:
    task = ARCH[arch]["task"]
    return tiny.spec(
        models[arch],
        {**assets, **models}[ARCH[arch]["data"]],
        out,
        task=task,
        freeze=freeze,
        hyperparameters={"learningRate": 1e-2, "batchSize": 4, "maxSteps": 2, "seed": 0, "weightDecay": 0.0},
        evaluation={"strategy": "no", "metrics": ["loss"]},
    )


def check_run(arch: str, strategy: str, model_dir: Path, out: Path, freeze_event: dict[str, Any]) -> None:
    task = ARCH[arch]["task"]
    before, stats_before = _weights(model_dir, task)
    after, stats_after = _weights(out / "model", task)
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    want = trains(arch, strategy)
    intended = {n for n in before if want(n)}  # a tied matrix appears under both names
    assert changed == intended, sorted(changed ^ intended)[:8]
    if strategy != "lora":  # the freeze event counts what trains, a tied matrix once (LoRA: adapters, not merged)
        trained = {after[n].data_ptr(): after[n].numel() for n in intended}
        assert freeze_event["trainable"] == sum(trained.values())
    for name in stats_before:
        module = name.rsplit(".", 1)[0]
        frozen = not want(f"{module}.weight")
        same = torch.equal(stats_before[name], stats_after[name])
        assert same == frozen, f"{name}: frozen={frozen} but statistics {'kept' if same else 'changed'}"


# Every strategy on every family, except two that add no family-specific path: "none" trains everything (kept
# where that shows something: a tied matrix counted once, BatchNorm statistics moving), and "embeddings: true"
# freezes the same LayerMap.embeddings that bottom-layers freezes on every family (kept where the embeddings are
# special: tied to the head, image patches, a BatchNorm stem).
REDUNDANT = {"none": ("bert", "llama", "vit", "swin", "convnext"), "embeddings": ("bert", "llama", "swin", "convnext")}
CASES = [(arch, strategy) for arch in ARCH for strategy in STRATEGIES if arch not in REDUNDANT.get(strategy, ())]


@pytest.mark.parametrize(("arch", "strategy"), CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_every_strategy_on_every_family(
    arch: str,
    strategy: str,
    models: dict[str, Path],
    assets: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    freeze = freeze_spec(arch, strategy)
    targets = ARCH[arch].get("lora_targets")
    if strategy == "lora" and targets is not None:
        code, err, events = run_cli(tmp_path, matrix_spec(arch, freeze, models, assets, tmp_path / "out0"), capsys)
        assert code == 2, err
        assert err.startswith("finetune-trainer: error: freeze.lora.targetModules: the model has none of the")
        assert [e["reason"] for e in events if e["event"] == "error"] == ["InvalidConfig"]
        freeze["lora"]["targetModules"] = targets
    out = tmp_path / "out"
    code, err, events = run_cli(tmp_path, matrix_spec(arch, freeze, models, assets, out), capsys)
    assert code == 0, err
    assert [e["reason"] for e in events if e["event"] == "result"] == ["Succeeded"]
    check_run(arch, strategy, models[arch], out, next(e for e in events if e["event"] == "freeze"))


# Units: layer discovery, eval mode, errors. Models built in memory, no training.


def _names(model: torch.nn.Module, prefixes: tuple[str, ...]) -> set[str]:
    return {n for n, _ in model.named_parameters() if _in(n, prefixes)}


@pytest.mark.parametrize("arch", list(ARCH))
def test_layer_discovery(arch: str) -> None:
    a = ARCH[arch]
    model = tiny.build(arch, a["task"], layers=3)
    layers = layer_map(model)
    assert [set(block) for block in layers.blocks] == [_names(model, block) for block in a["blocks"]]
    assert set(layers.embeddings) == _names(model, a["emb"])
    assert set(layers.neck) == _names(model, a["neck"])
    assert set(layers.head) - set(layers.embeddings) == _names(model, a["head"])  # GPT-2's head is wte, tied
    top, bottom, n = layers.blocks[-1][0], layers.blocks[0][0], len(a["blocks"])
    assert (layers.depth(top), layers.depth(bottom), layers.depth(layers.embeddings[0])) == (0, n - 1, n)


def test_a_stack_of_mixed_block_types_is_found() -> None:
    """Jamba interleaves Mamba and attention decoder layers (two classes) in one ModuleList."""
    import transformers as tf

    config = tf.JambaConfig(
        vocab_size=len(tiny.VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=4,
        mamba_expand=1,
        use_mamba_kernels=False,
    )
    model = tf.AutoModelForCausalLM.from_config(config)
    assert len({type(layer) for layer in model.model.layers}) == 2
    layers = layer_map(model)
    assert layers.blocks_prefix == "model.layers" and layers.num_blocks == 4
    assert all(all(n.startswith(f"model.layers.{i}.") for n in block) for i, block in enumerate(layers.blocks))


def test_the_block_stack_is_only_looked_for_when_a_strategy_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune_trainer.freeze as freeze_mod

    def no_stack(model: torch.nn.Module) -> Any:
        raise ConfigError("freeze: found no stack")

    monkeypatch.setattr(freeze_mod, "find_block_stack", no_stack)
    for spec in (
        FreezeSpec(strategy="none"),
        FreezeSpec(strategy="modules", frozenModules=["embedder"]),
        FreezeSpec(strategy="lora", lora={"targetModules": ["convolution"]}),
    ):
        apply_freeze(tiny.build("resnet", "image-classification"), spec, "image-classification")
    with pytest.raises(ConfigError, match="no stack"):
        apply_freeze(
            tiny.build("resnet", "image-classification"), FreezeSpec(strategy="head-only"), "image-classification"
        )


def test_frozen_modules_stay_in_eval_mode_after_train_and_thawed_ones_train() -> None:
    model = tiny.build("resnet", "image-classification")
    spec = FreezeSpec(strategy="head-only", gradualUnfreezing={"startEpoch": 1, "layersPerEpoch": 1})
    model, plan = apply_freeze(model, spec, "image-classification")
    model.train()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert norms and not any(m.training for m in norms.values())
    assert model.training and model.classifier.training
    named = dict(model.named_parameters())
    for name in plan.thaw_units[0]:  # gradual unfreezing thaws the top block: it trains from the next train()
        named[name].requires_grad_(True)
    model.eval()
    model.train()
    thawed = {n for n, m in norms.items() if m.training}
    assert thawed == {n for n in norms if n.startswith("resnet.encoder.stages.1.layers.0.")}
    copy = deepcopy(model).eval()  # the override follows the copy, not the original
    assert copy.train() is copy
    assert {n for n, m in copy.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training} == thawed


def test_frozen_dropout_is_off_and_trainable_dropout_on() -> None:
    model = tiny.build("bert", "sequence-classification", layers=2)
    model, _ = apply_freeze(model, FreezeSpec(strategy="bottom-layers", layers=1), "sequence-classification")
    model.train()
    dropouts = {n: m.training for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert not any(on for n, on in dropouts.items() if n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")))
    assert all(on for n, on in dropouts.items() if n.startswith(("bert.encoder.layer.1.", "dropout")))


def _dropout_modes_in_a_training_forward(model: torch.nn.Module) -> dict[str, bool]:
    """Each dropout module's training flag as it ran in one forward of ``model.train()``."""
    seen: dict[str, bool] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            seen.setdefault(name, module.training)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(record(name))
    model.train()
    ids = torch.randint(4, 30, (2, 8))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return seen


def _gpt2() -> torch.nn.Module:
    return tiny.build("gpt2", "causal-lm", layers=2)


def _phi() -> torch.nn.Module:
    """A tiny Phi: its embedding dropout is registered after its layers (only the order it runs in tells)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.PhiConfig(
        vocab_size=len(tiny.VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, embd_pdrop=0.1, resid_pdrop=0.1,
    )  # fmt: skip
    return tf.PhiForCausalLM(config)


@pytest.mark.parametrize(
    ("build", "frozen", "trained"),
    [
        (_gpt2, ("transformer.drop", "transformer.h.0."), ("transformer.h.1.",)),
        (_phi, ("model.embed_dropout", "model.layers.0."), ("model.layers.1.",)),
    ],
    ids=["gpt2", "phi"],
)  # fmt: skip
def test_parameter_free_dropout_in_the_frozen_prefix_is_off(
    build: Callable[[], torch.nn.Module], frozen: tuple[str, ...], trained: tuple[str, ...]
) -> None:
    """A dropout that owns no parameters between the frozen embeddings and the first frozen block runs in eval mode,
    as the frozen modules around it do; the trainable block's dropout still trains."""
    model, _ = apply_freeze(build(), FreezeSpec(strategy="bottom-layers", layers=1), "causal-lm")
    modes = _dropout_modes_in_a_training_forward(model)
    assert any(name in modes for name in frozen if not name.endswith("."))
    assert not [n for n, on in modes.items() if on and n.startswith(frozen)]
    assert [n for n in modes if n.startswith(trained)] and all(modes[n] for n in modes if n.startswith(trained))


def test_the_prefix_shrinks_when_gradual_unfreezing_thaws_its_blocks() -> None:
    """Thawing every frozen block and the embeddings leaves no prefix: the embedding dropout trains again."""
    model = tiny.build("gpt2", "causal-lm", layers=2)
    spec = FreezeSpec(strategy="bottom-layers", layers=2, gradualUnfreezing={"startEpoch": 1, "layersPerEpoch": 1})
    model, plan = apply_freeze(model, spec, "causal-lm")
    assert _dropout_modes_in_a_training_forward(model)["transformer.drop"] is False
    named = dict(model.named_parameters())
    for unit in plan.thaw_units:
        for name in unit:
            named[name].requires_grad_(True)
    assert _dropout_modes_in_a_training_forward(model)["transformer.drop"] is True


def test_head_only_on_tied_embeddings_trains_an_untied_head() -> None:
    """GPT-2 ties lm_head to wte: head-only must not train the input embeddings through it."""
    model = tiny.build("gpt2", "causal-lm", layers=2)
    model, plan = apply_freeze(model, FreezeSpec(strategy="head-only"), "causal-lm")
    assert plan.untied == "lm_head.weight"
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    assert plan.trainable == model.lm_head.weight.numel()
    assert model.config.tie_word_embeddings is False


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


def test_layer_wise_lr_decay_under_lora_sees_the_layers() -> None:
    """Inside peft's wrapper the base model is base_model.model.bert: blocks keep their depth, the head is the head."""
    model = tiny.build("bert", "sequence-classification", layers=3)
    wrapped, _ = apply_freeze(model, FreezeSpec(strategy="lora"), "sequence-classification")
    layers = layer_map(wrapped)
    assert layers.num_blocks == 3
    lora_a = [n for n, p in wrapped.named_parameters() if p.requires_grad and "lora_A" in n]
    assert {layers.depth(n) for n in lora_a} == {0, 1, 2}
    assert all("classifier" in n for n in layers.head)


def test_pattern_matching_nothing_is_a_config_error() -> None:
    model = tiny.build("bert", "sequence-classification")
    with pytest.raises(ConfigError, match=r"freeze.frozenModules\[0\]: pattern 'nope' matches no parameter"):
        apply_freeze(model, FreezeSpec(strategy="modules", frozenModules=["nope"]), "sequence-classification")


def test_too_many_layers_is_a_config_error() -> None:
    model = tiny.build("bert", "sequence-classification")
    with pytest.raises(ConfigError, match=r"freeze\.layers: 5 exceeds the 2 layers"):
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


def test_an_untied_head_survives_resume(
    models: dict[str, Path], assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPT-2 head-only: 2 steps, then a resumed run to 4 ends where an uninterrupted 4-step run does."""

    def spec(out: Path, steps: int) -> dict[str, Any]:
        return tiny.spec(
            models["gpt2"],
            assets["text"],
            out,
            task="causal-lm",
            freeze={"strategy": "head-only"},
            hyperparameters={"learningRate": 1e-2, "batchSize": 4, "maxSteps": steps, "scheduler": "constant"},
            evaluation={"strategy": "steps", "interval": 2, "metrics": ["loss"]},
        )

    resumes = []
    for out, steps in ((tmp_path / "resumed", 2), (tmp_path / "resumed", 4), (tmp_path / "straight", 4)):
        code, err, events = run_cli(tmp_path, spec(out, steps), capsys)
        assert code == 0, err
        resumes.append([e["step"] for e in events if e["event"] == "resume"])
    assert resumes == [[], [2], []]
    resumed, _ = _weights(tmp_path / "resumed" / "model", "causal-lm")
    straight, _ = _weights(tmp_path / "straight" / "model", "causal-lm")
    pretrained, _ = _weights(models["gpt2"], "causal-lm")
    assert torch.equal(resumed["transformer.wte.weight"], pretrained["transformer.wte.weight"])
    assert not torch.equal(resumed["lm_head.weight"], pretrained["lm_head.weight"])
    assert torch.allclose(resumed["lm_head.weight"], straight["lm_head.weight"], atol=1e-6)
