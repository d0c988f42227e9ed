"""The preflight stage: what it reads is what training uses (the data is read once), and a hub dataset,
which needs a download, is left to the data stage."""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune_trainer import data
from finetune_trainer.config import RuntimeEnv
from finetune_trainer.preflight import Checked, preflight
from finetune_trainer.spec import TrainingSpec
from tests.trainer import tiny


def test_training_uses_the_splits_preflight_read(assets: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    source = tmp_path / "data"
    shutil.copytree(assets["sentiment"], source)
    spec = TrainingSpec.model_validate(tiny.spec(assets["bert"], source, tmp_path / "out"))
    checked = preflight(spec, RuntimeEnv())
    assert checked.train is not None and checked.train.labels is not None and checked.validation is not None
    shutil.rmtree(source)  # not read again
    prepared = data.prepare(spec, RuntimeEnv(), AutoTokenizer.from_pretrained(str(assets["bert"])), None, checked)
    assert len(prepared.train) == 96 and prepared.validation is not None and len(prepared.validation) == 48
    assert prepared.train["labels"][:8] == checked.train.labels[:8]


def test_a_hub_dataset_is_checked_after_its_download(tmp_path: Path) -> None:
    wire = tiny.spec(Path("/models/none"), tmp_path, tmp_path / "out")
    wire["dataset"]["source"] = "hf://datasets/org/name"
    assert preflight(TrainingSpec.model_validate(wire), RuntimeEnv()) == Checked(None, None)
