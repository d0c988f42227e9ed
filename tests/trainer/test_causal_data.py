"""Causal-LM data: chat rendered once (one BOS), loss on assistant turns only, EOS after each plain text,
and packed rows whose documents do not attend to each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer import data
from finetune_trainer.config import RuntimeEnv
from finetune_trainer.spec import TrainingSpec
from tests.trainer import tiny


def tokenizer_with_bos(directory: Path) -> Any:
    """The tiny tokenizer, adding [CLS] as BOS (like Llama's) and a template that writes the BOS itself."""
    from tokenizers.processors import TemplateProcessing

    fast = tiny.save_tokenizer(directory)
    fast.backend_tokenizer.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    fast.bos_token = "[CLS]"
    fast.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
    assert fast("good")["input_ids"][0] == 2
    return fast


def prepared(wire: dict[str, Any], processor: Any, kind: str) -> data.PreparedData:
    return data.prepare(TrainingSpec.model_validate(wire), RuntimeEnv(), processor, tiny.config(kind))


def test_chat_has_one_bos_and_learns_only_the_assistant_turns(tmp_path: Path) -> None:
    processor = tokenizer_with_bos(tmp_path / "tok")
    rows = tiny.write_text(tmp_path / "chat", n=4, chat=True)
    wire = tiny.spec(tmp_path, rows, tmp_path / "out", task="causal-lm", dataset={"fields": {"messages": "messages"}})
    first = prepared(wire, processor, "llama").train[0]
    ids = first["input_ids"]
    assert ids.count(processor.bos_token_id) == 1 and ids[0] == processor.bos_token_id
    labels = first["labels"]
    words = processor.convert_ids_to_tokens(ids)
    sep = words.index("[SEP]")  # end of the user turn
    assert all(label == -100 for label in labels[: sep + 1]), list(zip(words, labels, strict=True))
    # the assistant turn, its end-of-turn token included, is learned
    assert labels[sep + 1 :] == ids[sep + 1 :] and ids[-1] == processor.convert_tokens_to_ids("[SEP]")


def test_assistant_only_loss_can_be_turned_off(tmp_path: Path) -> None:
    processor = tokenizer_with_bos(tmp_path / "tok")
    rows = tiny.write_text(tmp_path / "chat", n=4, chat=True)
    wire = tiny.spec(
        tmp_path,
        rows,
        tmp_path / "out",
        task="causal-lm",
        dataset={"fields": {"messages": "messages"}, "assistantOnlyLoss": False},
    )
    first = prepared(wire, processor, "llama").train[0]
    assert first["labels"] == first["input_ids"]


def test_plain_text_ends_with_eos(tmp_path: Path) -> None:
    processor = tiny.save_tokenizer(tmp_path / "tok")
    rows = tiny.write_text(tmp_path / "text", n=4)
    wire = tiny.spec(tmp_path, rows, tmp_path / "out", task="causal-lm")
    for row in prepared(wire, processor, "gpt2").train:
        assert row["input_ids"][-1] == processor.eos_token_id
        assert row["input_ids"].count(processor.eos_token_id) == 1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_packed_documents_do_not_attend_to_each_other(kind: str, tmp_path: Path) -> None:
    processor = tiny.save_tokenizer(tmp_path / "tok")
    rows = tiny.write_text(tmp_path / "text", n=4)
    wire = tiny.spec(tmp_path, rows, tmp_path / "out", task="causal-lm", dataset={"packing": True})
    prep = prepared(wire, processor, kind)
    first, second = prep.train[0], prep.train[1]
    batch = prep.collator([first, second])
    n1, n2 = len(first["input_ids"]), len(second["input_ids"])
    assert batch["input_ids"].shape == (1, n1 + n2)
    assert batch["position_ids"][0].tolist() == list(range(n1)) + list(range(n2))
    assert batch["labels"][0, n1] == -100  # no learning to predict document 2's first token from document 1
    model = tiny.build(kind, "causal-lm").eval()
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, n1:]
        alone = model(input_ids=torch.as_tensor([second["input_ids"]])).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
