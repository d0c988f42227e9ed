"""The tokenized cache shared by the ranks of a run: a rank whose fresh entry another rank replaces goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from finetune_trainer import token_cache


def test_an_entry_replaced_by_another_rank_while_it_is_read_back_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks tokenize the same data and both save the entry: the second one's rename moves the first one's
    entry aside for a moment, when the first may be reading it back (seen under torchrun: a FileNotFoundError
    killed rank 1 of a 2-rank run)."""
    encoded = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    monkeypatch.setattr(token_cache, "cache_key", lambda *_: "entry")

    def replaced(path: str) -> Any:
        raise FileNotFoundError(f"Directory {path} is neither a `Dataset` directory nor a `DatasetDict` directory.")

    monkeypatch.setattr(token_cache, "load_from_disk", replaced)
    rows, cached = token_cache.cached_encode(tmp_path, Any, encoded, None, lambda: encoded)  # type: ignore[arg-type]
    assert (rows["input_ids"], cached) == ([[1, 2, 3]], False)
