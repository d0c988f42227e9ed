"""User errors in the data, the spec or the device end with their exit code and one line naming the
field, file or row (in-process: the CLI's mapping of these errors to exit codes is tested in test_errors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer import data
from finetune_trainer import run as run_mod
from finetune_trainer.errors import ConfigError, DataError, TrainerError
from tests.trainer import tiny
from tests.trainer.helpers import of, train


def rows_dir(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "validation.jsonl"):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fails(wire: dict[str, Any], error: type[TrainerError], message: str) -> None:
    with pytest.raises(error) as raised:
        train(wire)
    assert str(raised.value) == message
    assert "\n" not in str(raised.value)


GOOD = {"text": "good film", "label": 1}


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["good film", None], "row 1 of train.jsonl: column 'text' is null, expected a string"),
        (
            [7, 8],
            "row 0 of train.jsonl: column 'text' is a int (7), expected a string (the column holds numbers, not text)",
        ),
        ([["a", "b"]], "row 0 of train.jsonl: column 'text' is a list (['a', 'b']), expected a string"),
    ],
    ids=["null", "numbers", "list"],
)
def test_text_that_is_not_a_string_is_a_data_error(
    texts: list[Any], message: str, assets: dict[str, Path], tmp_path: Path
) -> None:
    data = rows_dir(tmp_path / "d", [{"text": text, "label": 1} for text in texts])
    wire = tiny.spec(assets["bert"], data, tmp_path / "out")
    fails(wire, DataError, f"dataset.fields.text: {message}")


def test_mixed_types_in_a_json_column_name_the_row(assets: dict[str, Path], tmp_path: Path) -> None:
    data = rows_dir(tmp_path / "d", [GOOD, {"text": 7, "label": 0}])
    fails(
        tiny.spec(assets["bert"], data, tmp_path / "out"),
        DataError,
        "dataset: cannot read train.jsonl as jsonl: JSON parse error: "
        "Column(/text) changed from string to number in row 1",
    )


def test_null_text_in_causal_lm_is_an_error_not_the_word_none(assets: dict[str, Path], tmp_path: Path) -> None:
    data = rows_dir(tmp_path / "d", [{"text": "a film"}, {"text": None}])
    wire = tiny.spec(assets["gpt2"], data, tmp_path / "out", task="causal-lm")
    fails(wire, DataError, "dataset.fields.text: row 1 of train.jsonl: column 'text' is null, expected a string")


def test_csv_text_column_of_numbers(assets: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    for name in ("train.csv", "validation.csv"):
        (data / name).write_text("text,label\n12,0\n34,1\n")
    wire = tiny.spec(
        assets["bert"], data, tmp_path / "out", dataset={"train": "train.csv", "validation": "validation.csv"}
    )
    fails(
        wire,
        DataError,
        "dataset.fields.text: row 0 of train.csv: column 'text' is a int (12), expected a string "
        "(the column holds numbers, not text)",
    )


OK_CHAT = [{"role": "user", "content": "good film"}, {"role": "assistant", "content": "great"}]


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        (["hello", "there"], "row 0 of train.jsonl: column 'messages' is not a non-empty list of messages"),
        ([OK_CHAT, []], "row 1 of train.jsonl: column 'messages' is not a non-empty list of messages"),
        (
            [OK_CHAT, [{"role": "user", "content": "good"}, {"role": "b"}]],
            "row 1 of train.jsonl: column 'messages' message 1 has no string 'content'",
        ),
        ([OK_CHAT, [{"content": "good"}]], "row 1 of train.jsonl: column 'messages' message 0 has no string 'role'"),
    ],
    ids=["string", "empty", "no-content", "no-role"],
)
def test_malformed_messages(rows: list[Any], problem: str, assets: dict[str, Path], tmp_path: Path) -> None:
    data = rows_dir(tmp_path / "d", [{"messages": messages} for messages in rows])
    wire = tiny.spec(
        assets["gpt2"], data, tmp_path / "out", task="causal-lm", dataset={"fields": {"messages": "messages"}}
    )
    fails(wire, DataError, f"dataset.fields.messages: {problem} (expected [{{role: ..., content: ...}}, ...])")


def test_max_seq_length_above_the_model_positions(assets: dict[str, Path], tmp_path: Path) -> None:
    wire = tiny.spec(assets["bert"], assets["sentiment"], tmp_path / "out", dataset={"maxSeqLength": 128})
    fails(wire, ConfigError, "dataset.maxSeqLength: 128 exceeds the 64 positions the model supports")


def test_default_max_seq_length_is_capped_to_the_model_positions(assets: dict[str, Path], tmp_path: Path) -> None:
    long = " ".join(["good"] * 200)
    data = rows_dir(tmp_path / "d", [{"text": long, "label": 1}, {"text": long, "label": 0}] * 4)
    wire = tiny.spec(assets["bert"], data, tmp_path / "out", hyperparameters={"maxSteps": 1})
    del wire["dataset"]["maxSeqLength"]
    result, _ = train(wire)
    assert result.exit_code == 0


def test_nothing_trainable(assets: dict[str, Path], tmp_path: Path) -> None:
    wire = tiny.spec(
        assets["bert"], assets["sentiment"], tmp_path / "out", freeze={"strategy": "modules", "frozenModules": [".*"]}
    )
    with pytest.raises(ConfigError, match=r"^freeze: strategy modules leaves no trainable parameter \(0 of \d+;"):
        train(wire)


def test_bf16_without_bf16_fails_before_the_model_loads(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the precision was checked")

    monkeypatch.setattr(run_mod, "load_model", no_load)
    monkeypatch.setattr(run_mod, "load_processor", no_load)
    wire = tiny.spec(assets["bert"], assets["sentiment"], tmp_path / "out", hyperparameters={"precision": "bf16"})
    fails(wire, ConfigError, "hyperparameters.precision: bf16 is not supported by Tesla T4; use fp16 or fp32")


def test_tokenizer_columns_the_model_does_not_take_are_dropped(assets: dict[str, Path], tmp_path: Path) -> None:
    """A BERT tokenizer emits token_type_ids; a model whose forward names its arguments (as remote-code models
    do; transformers' own take ``**kwargs`` and ignore extras) would fail on them."""
    import transformers as tf

    class StrictConfig(tf.DistilBertConfig):
        model_type = "strict-distilbert"

    class StrictModel(tf.DistilBertForSequenceClassification):
        config_class = StrictConfig

        def forward(self, input_ids: Any = None, attention_mask: Any = None, labels: Any = None) -> Any:  # type: ignore[override]
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    tf.AutoConfig.register("strict-distilbert", StrictConfig, exist_ok=True)
    tf.AutoModelForSequenceClassification.register(StrictConfig, StrictModel, exist_ok=True)
    model_dir = tmp_path / "strict"
    torch.manual_seed(0)
    config = StrictConfig(
        vocab_size=len(tiny.VOCAB),
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
    )
    StrictModel(config).save_pretrained(str(model_dir))
    (tmp_path / "vocab.txt").write_text("\n".join(tiny.VOCAB) + "\n")
    tf.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(str(model_dir))
    assert "token_type_ids" in tf.AutoTokenizer.from_pretrained(str(model_dir))("good film")
    wire = tiny.spec(model_dir, assets["sentiment"], tmp_path / "out", hyperparameters={"maxSteps": 2})
    result, events = train(wire)
    assert result.exit_code == 0 and of(events, "evaluation")


def test_image_that_fails_to_decode_mid_epoch(assets: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "images"
    shutil.copytree(assets["images"], data)
    (data / "img" / "train-5.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    wire = tiny.spec(assets["vit"], data, tmp_path / "out", task="image-classification")
    with pytest.raises(DataError, match=r"^dataset.fields.image: cannot decode .*/img/train-5\.png: "):
        train(wire)


def test_model_positions() -> None:
    from types import SimpleNamespace as Config

    assert data.model_positions(Config(model_max_length=512), Config(max_position_embeddings=514)) == 512  # RoBERTa
    assert data.model_positions(Config(model_max_length=128), Config(max_position_embeddings=512)) == 512
    assert data.model_positions(Config(model_max_length=10**30), Config(n_positions=1024)) == 1024  # GPT-2
    assert data.model_positions(Config(), Config(text_config=Config(max_position_embeddings=77))) == 77
    assert data.model_positions(Config(), Config()) is None
