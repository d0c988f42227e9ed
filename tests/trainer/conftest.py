"""Shared fixtures for the trainer tests: tiny saved models and datasets, built once per session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("FINETUNE_METRICS_PORT", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared, busy machine spinning OpenMP threads
# slow them down by an order of magnitude. Subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.trainer import tiny

if TYPE_CHECKING:
    from tests.trainer.two_ranks import Runs


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never talk to a cluster unless they inject a fake API."""
    monkeypatch.delenv("FINETUNE_JOB_NAME", raising=False)
    monkeypatch.delenv("FINETUNE_JOB_NAMESPACE", raising=False)
    monkeypatch.setenv("FINETUNE_METRICS_PORT", "0")


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    return {
        "bert": tiny.save_model(root / "bert", "bert", "sequence-classification", layers=2),
        "gpt2": tiny.save_model(root / "gpt2", "gpt2", "causal-lm", layers=2),
        "llama": tiny.save_model(root / "llama", "llama", "causal-lm", layers=2),
        "vit": tiny.save_model(root / "vit", "vit", "image-classification", layers=2),
        "sentiment": tiny.write_sentiment(root / "sentiment", 96, 48),
        "noisy": tiny.write_sentiment(root / "noisy", 16, 64, seed=1, noisy=True),
        "text": tiny.write_text(root / "text"),
        "chat": tiny.write_text(root / "chat", chat=True),
        "images": tiny.write_images(root / "images"),
    }


@pytest.fixture(scope="session")
def two_ranks(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The 2-rank runs ``test_ddp.py`` and ``test_fsdp.py`` check: two torchrun starts for all of them."""
    from tests.trainer.two_ranks import run_all

    return run_all(assets, tmp_path_factory.mktemp("two-ranks"))
