"""Real (tiny) training runs on CPU: layout, determinism, L1, dropout, early stopping, restore-best,
gradual unfreezing, causal LM, images with augmentation, LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer.callbacks import COMPLETE_MARKER
from finetune_trainer.early_stopping import EarlyStoppingState, Evaluated, observe
from finetune_trainer.models import ModelSource, load_model
from finetune_trainer.spec import EarlyStopping, ModelSpec
from tests.trainer import tiny
from tests.trainer.helpers import independent_nll, of, result_json, train


def test_run_layout_checkpoints_and_result(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={"learningRate": 5e-3, "batchSize": 8, "epochs": 6, "seed": 0},
        earlyStopping={"metric": "accuracy", "patience": 10},
        output={"location": f"file://{out}", "keepCheckpoints": 1},
    )
    result, events = train(wire)
    body = result_json(out)
    assert body["reason"] == "Succeeded" and result.exit_code == 0
    assert body["finalStep"] == 72 and len(of(events, "evaluation")) == 6
    best = body["best"]
    assert best["metric"] == "accuracy" and best["checkpoint"] == f"file://{out}/checkpoints/checkpoint-{best['step']}"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({"checkpoint-72", f"checkpoint-{best['step']}"})  # newest + best
    assert all((out / "checkpoints" / k / COMPLETE_MARKER).is_file() for k in kept)
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert of(events, "freeze")[0]["trainable"] == of(events, "freeze")[0]["total"]
    assert body["metrics"]["accuracy"] > 0.8  # the sentiment word is learnable by a 2-layer model


def _losses(events: list[dict[str, object]]) -> list[float]:
    return [float(e["loss"]) for e in of(events, "log")]  # type: ignore[arg-type]


def test_same_seed_same_losses(assets: dict[str, Path], tmp_path: Path) -> None:
    def losses(seed: int, name: str) -> list[float]:
        wire = tiny.spec(
            assets["bert"],
            assets["sentiment"],
            tmp_path / name,
            hyperparameters={"maxSteps": 6, "seed": seed, "batchSize": 8, "dropout": 0.2},
            evaluation={"strategy": "no", "metrics": ["loss"]},
        )
        return _losses(train(wire)[1])

    first, again, other = losses(7, "a"), losses(7, "b"), losses(8, "c")
    assert len(first) == 6 and first == again
    assert first != other


def test_l1_penalty_is_added_to_the_loss(assets: dict[str, Path], tmp_path: Path) -> None:
    l1 = 1e-3

    def first_loss(penalty: float, name: str) -> float:
        wire = tiny.spec(
            assets["bert"],
            assets["sentiment"],
            tmp_path / name,
            hyperparameters={"maxSteps": 1, "l1Penalty": penalty, "seed": 3},
            evaluation={"strategy": "no", "metrics": ["loss"]},
            freeze={"strategy": "head-only"},
        )
        events = train(wire)[1]
        logged[name] = of(events, "log")[0]
        return _losses(events)[0]

    logged: dict[str, dict[str, Any]] = {}
    model = load_model(
        ModelSpec(source=str(assets["bert"]), task="sequence-classification", numLabels=2),
        ModelSource(str(assets["bert"])),
    )
    norm = float(model.classifier.weight.detach().abs().sum())  # head-only: the only trainable weight (bias excluded)
    difference = first_loss(l1, "l1") - first_loss(0.0, "plain")
    assert difference == pytest.approx(l1 * norm, rel=1e-3)
    # logged both ways: the loss minimised, and the task's own loss
    assert logged["l1"]["l1Penalty"] == pytest.approx(l1 * norm, rel=1e-3)
    assert logged["l1"]["taskLoss"] == pytest.approx(logged["plain"]["loss"], rel=1e-5)
    assert logged["plain"]["l1Penalty"] is None and logged["plain"]["taskLoss"] is None


def test_dropout_override_sets_every_probability(assets: dict[str, Path]) -> None:
    for kind, task in (("bert", "sequence-classification"), ("llama", "causal-lm")):
        spec = ModelSpec(source=str(assets[kind]), task=task, numLabels=2 if task != "causal-lm" else None)
        model = load_model(spec, ModelSource(str(assets[kind])), dropout=0.37)
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        floats = [v for m in model.modules() for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]
        assert dropouts or floats
        assert all(m.p == 0.37 for m in dropouts) and all(v == 0.37 for v in floats)
        config = model.config.to_dict()
        assert all(v == 0.37 for k, v in config.items() if "dropout" in k and isinstance(v, float))
    spec = ModelSpec(source=str(assets["bert"]), task="sequence-classification", numLabels=2)
    ids = torch.randint(5, len(tiny.VOCAB), (2, 10))
    for p, same in ((0.0, True), (0.5, False)):
        model = load_model(spec, ModelSource(str(assets["bert"])), dropout=p).train()
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits) is same


def test_early_stopping_fires_at_the_right_evaluation_and_restores_best(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rule = {"metric": "loss", "patience": 2, "minDelta": 0.001, "restoreBest": True}
    wire = tiny.spec(
        assets["bert"],
        assets["noisy"],
        out,  # 16 random-label examples: memorised, validation loss rises
        hyperparameters={"learningRate": 1e-2, "batchSize": 4, "epochs": 40, "seed": 0, "warmupSteps": 0},
        earlyStopping=rule,
        output={"location": str(out), "keepCheckpoints": 1},
    )
    _result, events = train(wire)
    evaluations = of(events, "evaluation")
    state = EarlyStoppingState()
    fired_at = None
    for e in evaluations:
        state = observe(
            EarlyStopping.model_validate(rule), state, Evaluated(step=e["step"], value=e["metrics"]["loss"])
        )
        if state.triggered and fired_at is None:
            fired_at = e["step"]
    body = result_json(out)
    assert fired_at is not None and body["reason"] == "EarlyStopped"
    assert evaluations[-1]["step"] == fired_at == body["finalStep"] < 160  # stopped at once, long before the end
    assert body["best"]["step"] == state.best_step and body["best"]["value"] == state.best_value
    # restore-best: the saved model scores the best evaluation's loss on the validation data
    assert body["restoredBest"] is True and body["metrics"]["loss"] == pytest.approx(state.best_value)
    assert _validation_loss(out / "model", assets["noisy"]) == pytest.approx(state.best_value, rel=1e-4)
    assert (out / "checkpoints" / f"checkpoint-{state.best_step}").is_dir()
    # a restart after early stopping fired (say the pod died while saving) finishes without training again
    (out / "result.json").unlink()
    again, events = train(wire)
    assert again.reason == "EarlyStopped" and again.final_step == fired_at and not of(events, "log")
    assert result_json(out)["best"] == body["best"]


def _validation_loss(model_dir: Path, data_dir: Path) -> float:
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    rows = [json.loads(line) for line in (data_dir / "validation.jsonl").read_text().splitlines()]
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return float(model(**enc, labels=torch.tensor([r["label"] for r in rows])).loss)


def test_gradual_unfreezing_thaws_top_down(assets: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={"epochs": 3, "batchSize": 16, "learningRate": 1e-2, "weightDecay": 0.01},
        freeze={"strategy": "head-only", "gradualUnfreezing": {"startEpoch": 2, "layersPerEpoch": 1}},
        evaluation={"strategy": "no", "metrics": ["loss"]},
    )
    _, events = train(wire)
    thawed = of(events, "unfreeze")
    assert [e["epoch"] for e in thawed] == [2, 3] and [e["units"] for e in thawed] == [1, 2]
    before, after = (
        load_file(str(assets["bert"] / "model.safetensors")),
        load_file(str(out / "model" / "model.safetensors")),
    )
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "classifier.weight" in changed and "bert.pooler.dense.weight" in changed  # head, then the neck (epoch 2)
    assert "bert.encoder.layer.1.output.dense.weight" in changed  # top block (epoch 3)
    assert not {k for k in changed if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))}


@pytest.mark.parametrize(
    "kind,data,extra",
    [
        ("gpt2", "text", {"packing": True}),
        ("llama", "chat", {"fields": {"messages": "messages"}}),
    ],
)
def test_causal_lm_with_perplexity(
    assets: dict[str, Path], tmp_path: Path, kind: str, data: str, extra: dict[str, object]
) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets[kind],
        assets[data],
        out,
        task="causal-lm",
        dataset={"source": str(assets[data]), "validation": "validation.jsonl", "maxSeqLength": 16, **extra},
        hyperparameters={"epochs": 1, "batchSize": 8, "learningRate": 3e-3, "scheduler": "cosine", "warmupRatio": 0.2},
        evaluation={"strategy": "epoch", "metrics": ["loss", "perplexity"]},
        earlyStopping={"metric": "perplexity", "patience": 1},
    )
    result, _ = train(wire)
    metrics = result_json(out)["metrics"]
    assert result.reason == "Succeeded"
    expected = independent_nll(out, wire, causal=True)  # the saved best model, one document at a time
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert metrics["perplexity"] < len(tiny.VOCAB)  # better than uniform after one epoch


def test_image_classification_with_augmentation(assets: dict[str, Path], tmp_path: Path) -> None:
    from finetune_trainer.data import augmentation_transforms
    from finetune_trainer.spec import Augmentation

    augmentation = {
        "randomResizedCrop": {"size": 16, "scaleMin": 0.5, "scaleMax": 1.0},
        "rotationDegrees": 10,
        "horizontalFlip": 0.5,
        "colorJitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
    }
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["vit"],
        assets["images"],
        out,
        task="image-classification",
        hyperparameters={"epochs": 2, "batchSize": 4, "learningRate": 3e-3, "labelSmoothing": 0.1},
        augmentation=augmentation,
        evaluation={"strategy": "epoch", "metrics": ["loss", "accuracy", "f1"]},
    )
    result, _ = train(wire)
    assert result.reason == "Succeeded" and set(result.metrics) == {"loss", "accuracy", "f1"}
    steps = augmentation_transforms(Augmentation.model_validate(augmentation))
    assert steps is not None
    names = [type(t).__name__ for t in steps.transforms]
    assert names == ["RandomResizedCrop", "RandomRotation", "RandomHorizontalFlip", "ColorJitter"]


def _bands(path: Path) -> None:
    """A wide image: red | bright green | dim green | blue (40 | 32 | 32 | 40 px); a center crop keeps the greens."""
    from PIL import Image

    image = Image.new("RGB", (144, 48), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 40, 48))
    image.paste((0, 128, 0), (72, 0, 104, 48))
    image.paste((0, 0, 255), (104, 0, 144, 48))
    image.save(path)


def test_images_are_resized_and_center_cropped_by_the_image_processor(tmp_path: Path) -> None:
    """shortest_edge + crop_pct + center crop (the ResNet/ConvNeXt processor), not a squash to a square;
    augmentation (a certain flip) on the training split only."""
    from transformers import ConvNextImageProcessor

    from finetune_trainer import data as data_mod
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.spec import TrainingSpec

    (tmp_path / "data").mkdir()
    _bands(tmp_path / "data" / "wide.png")
    rows = "".join(json.dumps({"image": "wide.png", "label": label}) + "\n" for label in (0, 1))
    for split in ("train", "validation"):
        (tmp_path / "data" / f"{split}.jsonl").write_text(rows)
    wire = tiny.spec(
        tmp_path / "model",
        tmp_path / "data",
        tmp_path / "out",
        task="image-classification",
        augmentation={"horizontalFlip": 1.0},
    )
    processor = ConvNextImageProcessor(size={"shortest_edge": 16}, crop_pct=0.875)
    spec = TrainingSpec.model_validate(wire)
    prepared = data_mod.prepare(spec, RuntimeEnv(metrics_port=0), processor, tiny.config("vit"))
    assert prepared.validation is not None
    pixels = prepared.validation[0]["pixel_values"]
    assert tuple(pixels.shape) == (3, 16, 16)
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    rgb = pixels * std + mean  # undo the processor's ImageNet normalisation
    bright, dim = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), torch.tensor([0.0, 0.5, 0.0]).view(3, 1, 1)
    assert torch.allclose(rgb[:, :, :4], bright, atol=0.03), "the left of the crop is not the bright green band"
    assert torch.allclose(rgb[:, :, -4:], dim, atol=0.03), "the right of the crop is not the dim green band"
    assert torch.allclose(prepared.validation[0]["pixel_values"], pixels)  # validation: no augmentation
    assert torch.allclose(prepared.train[0]["pixel_values"], pixels.flip(-1), atol=0.05)


def _predictions(model: Any, rows: Any) -> list[int]:
    with torch.no_grad():
        return [
            int(model(**{k: torch.as_tensor(v)[None] for k, v in row.items() if k != "labels"}).logits.argmax(-1))
            for row in rows
        ]


def test_a_bf16_lora_run_publishes_an_adapter_and_a_merged_model_that_agree(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26: the adapter (peft's format, loadable onto the base) and the merged model, both in the compute dtype
    (bf16: precision bf16 on the CPU), predict the same labels; status.artifacts names both by their manifests."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune_trainer import data
    from finetune_trainer import run as run_mod
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.export import base_revision
    from finetune_trainer.manifest import verify
    from finetune_trainer.spec import TrainingSpec
    from tests.trainer.test_reporting import FakeApi

    api = FakeApi()
    monkeypatch.setattr(run_mod, "load_kube_api", lambda: api)
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["sentiment"],
        out,
        hyperparameters={
            "maxSteps": 48,
            "batchSize": 8,
            "learningRate": 5e-2,
            "precision": "bf16",
            "layerwiseLrDecay": 0.8,
        },
        freeze={"strategy": "lora", "lora": {"r": 4, "alpha": 8}},
        evaluation={"strategy": "no", "metrics": ["loss"]},
    )
    result, events = train(wire, job_name="job", job_namespace="ns", report_interval_seconds=0.2)
    freeze = of(events, "freeze")[0]
    assert result.reason == "Succeeded" and freeze["trainable"] < freeze["total"] / 5
    # the memory plan: no GPU memory known on CPU, so auto is ddp; the estimate is there all the same
    assert freeze["memoryPlan"]["strategy"] == "ddp" and freeze["memoryPlan"]["gpuMemoryGiB"] is None
    assert set(freeze["memoryPlan"]["perGpuGiBByStrategy"]) == {"ddp", "fsdp"}

    # Both published, in bf16, each with its manifest; status.artifacts names them by the manifests' hashes.
    stored: dict[str, Any] = {}
    for patch in api.patches:
        stored.update(patch["status"])
    artifacts = {a["kind"]: a for a in stored["artifacts"]}
    assert artifacts.keys() == {"adapter", "merged"} and result_json(out)["artifacts"] == stored["artifacts"]
    for kind, directory in (("adapter", out / "adapter"), ("merged", out / "model")):
        manifest = verify(directory)
        listed = artifacts[kind]
        assert listed["uri"] == str(directory) and listed["dtype"] == "bf16"
        assert (listed["sha256"], listed["sizeBytes"]) == (manifest.sha256, manifest.total_size)
        revision = base_revision(str(assets["bert"]), None)
        assert listed["baseModel"] == {"source": str(assets["bert"]), "revision": revision}
        assert listed["datasetFingerprint"].startswith("sha256:")
        weights = next(directory.glob("*.safetensors"))
        with safe_open(str(weights), "pt") as tensors:
            dtypes = {tensors.get_slice(name).get_dtype() for name in tensors.keys()}  # noqa: SIM118
        assert dtypes == {"BF16"}, (kind, dtypes)
    assert not any("lora" in path.path for path in verify(out / "model").files)

    # peft loads the adapter onto the base; the merged model is a plain model; they predict the same labels.
    base = AutoModelForSequenceClassification.from_pretrained(str(assets["bert"]), num_labels=2, dtype=torch.bfloat16)
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(str(out / "model")).eval()
    assert plain.dtype == torch.bfloat16 and not any("lora" in n for n, _ in plain.named_parameters())
    processor = AutoTokenizer.from_pretrained(str(out / "adapter"))
    prepared = data.prepare(TrainingSpec.model_validate(wire), RuntimeEnv(), processor, plain.config)
    assert prepared.validation is not None
    labels = [int(row["labels"]) for row in prepared.validation]
    on_base, merged = _predictions(adapted, prepared.validation), _predictions(plain, prepared.validation)
    agree = sum(a == b for a, b in zip(on_base, merged, strict=True)) / len(labels)
    accuracy = sum(a == b for a, b in zip(merged, labels, strict=True)) / len(labels)
    print(f"adapter-on-base vs merged agreement {agree:.3f} on {len(labels)} examples; merged accuracy {accuracy:.3f}")
    assert agree >= 0.99
    assert accuracy > 0.65, "the adapter learned nothing: agreement would be trivial"


def test_pvc_locations_resolve_under_the_mount_root_and_are_reported_as_pvc_uris(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "pvc"
    shutil.copytree(assets["bert"], root / "models" / "bert")
    shutil.copytree(assets["sentiment"], root / "data" / "sst")
    wire = tiny.spec(
        "pvc://models/bert",
        "pvc://data/sst",
        "pvc://runs/job-1",
        hyperparameters={"maxSteps": 2, "batchSize": 8},
        evaluation={"strategy": "steps", "interval": 2, "metrics": ["loss"]},
    )
    _, events = train(wire, pvc_root=root)
    body = result_json(root / "runs" / "job-1")
    assert body["best"]["checkpoint"] == "pvc://runs/job-1/checkpoints/checkpoint-2"
    assert body["model"] == "pvc://runs/job-1/model"
    assert of(events, "checkpoint")[0]["checkpoint"] == "pvc://runs/job-1/checkpoints/checkpoint-2"


def test_lora_restores_the_best_adapters(assets: dict[str, Path], tmp_path: Path) -> None:
    """restoreBest on a LoRA model loads the best evaluation's adapters (and the head) back."""
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"],
        assets["noisy"],  # random labels: the validation loss gets worse after its best
        out,
        hyperparameters={"maxSteps": 12, "batchSize": 4, "learningRate": 3e-2},
        freeze={"strategy": "lora", "lora": {"r": 4, "alpha": 8}},
        evaluation={"strategy": "steps", "interval": 2, "metrics": ["loss"]},
        earlyStopping={"metric": "loss", "patience": 100, "restoreBest": True},
        output={"location": str(out), "keepCheckpoints": 1},
    )
    result, events = train(wire)
    best = result.best
    assert best is not None and best["step"] != result.final_step, "the last evaluation was the best: nothing to show"
    assert of(events, "restore_best")[0]["step"] == best["step"]
    assert result.metrics["loss"] == pytest.approx(best["value"])
    wire["model"]["source"], wire["freeze"] = str(out / "model"), {"strategy": "none"}
    del wire["earlyStopping"]
    wire["hyperparameters"] = {**wire["hyperparameters"], "learningRate": 1e-12, "maxSteps": 1}
    wire["output"] = {"location": str(tmp_path / "again")}
    wire["evaluation"] = {"strategy": "steps", "interval": 1, "metrics": ["loss"]}
    again, _ = train(wire)  # the saved merged model, evaluated afresh, has the best's loss
    assert again.metrics["loss"] == pytest.approx(best["value"], rel=1e-3)


def test_load_weights_restores_tied_models_and_refuses_a_mismatch(tmp_path: Path) -> None:
    from finetune_trainer.run import load_weights

    saved = tiny.build("gpt2", "causal-lm", seed=1)  # tied embeddings: lm_head.weight is saved once
    saved.save_pretrained(str(tmp_path / "gpt2"))
    model = tiny.build("gpt2", "causal-lm", seed=2)
    load_weights(model, tmp_path / "gpt2")
    for (name, want), got in zip(saved.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(want, got), name
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(RuntimeError, match="does not match the model"):
        load_weights(tiny.build("llama", "causal-lm"), tmp_path / "gpt2")
