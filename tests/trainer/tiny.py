"""Tiny models, tokenizers and datasets built on the spot (hidden size 32): no network, seconds to train."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "scene", "was", "is", "quite", "very", "story", "and", "it"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + POSITIVE + NEGATIVE + FILLER
IMAGE_KINDS = ("vit", "swin", "resnet", "convnext")


def save_tokenizer(directory: Path) -> Any:
    """A whitespace word-level fast tokenizer over VOCAB, with a tiny chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
    fast.save_pretrained(str(directory))
    return fast


def config(kind: str, layers: int = 2, **overrides: Any) -> Any:
    import transformers as tf

    common = {"vocab_size": len(VOCAB)}
    if kind == "bert":
        cfg = tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=32, n_layer=layers, n_head=2, n_positions=64, bos_token_id=3, eos_token_id=3, **common
        )
    elif kind == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            **common,
        )
    elif kind == "vit":
        cfg = tf.ViTConfig(
            image_size=16,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
        )
    elif kind == "swin":  # two stages of two blocks; stage 1 ends in patch merging
        cfg = tf.SwinConfig(
            image_size=16,
            patch_size=2,
            num_channels=3,
            embed_dim=8,
            depths=[2, 2],
            num_heads=[1, 2],
            window_size=4,
            mlp_ratio=2.0,
        )
    elif kind == "resnet":  # bottleneck blocks with BatchNorm; stage 1 starts with a strided shortcut
        cfg = tf.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], layer_type="bottleneck"
        )
    elif kind == "convnext":  # stage 1 starts with a downsampling layer
        cfg = tf.ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[8, 16], depths=[2, 1], num_stages=2)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build(kind: str, task: str, layers: int = 2, num_labels: int = 2, seed: int = 0, **overrides: Any) -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = config(kind, layers, **overrides)
    if task == "causal-lm":
        return tf.AutoModelForCausalLM.from_config(cfg)
    cfg.num_labels = num_labels
    if kind in IMAGE_KINDS:
        return tf.AutoModelForImageClassification.from_config(cfg)
    cfg.pad_token_id = 0
    return tf.AutoModelForSequenceClassification.from_config(cfg)


def save_model(directory: Path, kind: str = "bert", task: str = "sequence-classification", layers: int = 2) -> Path:
    """A saved tiny pretrained model (weights + tokenizer or image processor)."""
    model = build(kind, task, layers)
    model.save_pretrained(str(directory))
    if kind in ("resnet", "convnext"):  # shortest edge 16/0.875 = 18, then a 16x16 center crop
        from transformers import ConvNextImageProcessor

        ConvNextImageProcessor(size={"shortest_edge": 16}, crop_pct=0.875).save_pretrained(str(directory))
    elif kind in IMAGE_KINDS:
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(str(directory))
    else:
        save_tokenizer(directory)
    return directory


def sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 8))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def write_sentiment(directory: Path, n_train: int = 64, n_val: int = 32, seed: int = 0, noisy: bool = False) -> Path:
    """train.jsonl / validation.jsonl with ``text`` and ``label``; ``noisy`` makes labels random (overfitting)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("validation.jsonl", n_val)):
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            text = sentence(rng, label)
            rows.append({"text": text, "label": rng.randint(0, 1) if noisy else label})
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def write_text(directory: Path, n: int = 48, seed: int = 0, chat: bool = False) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "validation.jsonl"):
        rows = []
        for _ in range(n):
            text = sentence(rng, rng.randint(0, 1))
            if chat:
                prompt, answer = {"role": "user", "content": text}, {"role": "assistant", "content": sentence(rng, 1)}
                rows.append({"messages": [prompt, answer]})
            else:
                rows.append({"text": text})
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def write_images(directory: Path, n: int = 16, seed: int = 0, noise: int = 0) -> Path:
    """Red vs blue 20x20 PNGs (label 0 / 1) with a jsonl of relative paths.

    ``noise`` adds per-pixel noise up to that amplitude: on a flat image every patch is the same token, so
    attention keys get exactly zero gradient.
    """
    from PIL import Image

    rng = random.Random(seed)
    (directory / "img").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        rows = []
        for i in range(n):
            label = i % 2
            colour = (200 + rng.randint(0, 55), rng.randint(0, 40), rng.randint(0, 40))
            if label:
                colour = colour[::-1]
            path = f"img/{split}-{i}.png"
            image = Image.new("RGB", (20, 20), colour)
            if noise:
                image.putdata([tuple(min(255, c + rng.randint(0, noise)) for c in colour) for _ in range(400)])
            image.save(directory / path)
            rows.append({"image": path, "label": label})
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def spec(
    model_dir: Path, data_dir: Path, out: Path, task: str = "sequence-classification", **sections: Any
) -> dict[str, Any]:
    """A wire (camelCase) TrainingSpec; ``sections`` deep-merge over the defaults."""
    base: dict[str, Any] = {
        "model": {"source": str(model_dir), "task": task},
        "dataset": {
            "source": str(data_dir),
            "train": "train.jsonl",
            "validation": "validation.jsonl",
            "maxSeqLength": 32,
        },
        "hyperparameters": {"learningRate": 1e-3, "batchSize": 8, "epochs": 2, "seed": 0, "weightDecay": 0.0},
        "evaluation": {"strategy": "epoch", "metrics": ["loss"]},
        "output": {"location": str(out)},
    }
    if task != "causal-lm":
        base["model"]["numLabels"] = 2
        base["evaluation"]["metrics"] = ["loss", "accuracy"]
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base
