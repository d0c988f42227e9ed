"""Malformed data ends with exit code 3 (DataError) and one line naming the file and the row.

In-process against the data layer (no torch process per case): a table of malformed files, plus
hypothesis corrupting one line of a valid JSON-lines file at random."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_trainer import data as data_mod
from finetune_trainer import exitcodes
from finetune_trainer.config import RuntimeEnv
from finetune_trainer.errors import DataError
from finetune_trainer.spec import TrainingSpec
from tests.trainer import tiny

ROWS = [{"text": "a good film", "label": 1}, {"text": "a dull plot", "label": 0}, {"text": "superb", "label": 1}]


def _spec(data: Path, **dataset: Any) -> TrainingSpec:
    wire = tiny.spec(Path("/models/none"), data, data / "out", dataset={"validation": None, **dataset})
    return TrainingSpec.model_validate(wire)


def _prepare_labels(spec: TrainingSpec) -> None:
    """What ``prepare`` does before tokenizing: read, check the columns, map the labels."""
    split = data_mod.read_split(spec, RuntimeEnv(), spec.dataset.train, "dataset.train")
    data_mod.check_columns(spec, split)
    data_mod.label_ids(spec, split)


def _data_error(spec: TrainingSpec) -> str:
    with pytest.raises(DataError) as error:
        _prepare_labels(spec)
    assert error.value.exit_code == exitcodes.DATA_ERROR.code == 3
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("lines", "named"),
    [
        ([json.dumps(ROWS[0]), '{"text": "broken", "label": ', json.dumps(ROWS[2])], "row"),
        ([json.dumps(r) for r in ROWS] + ["not json at all"], "row"),
        ([json.dumps({"review": r["text"], "label": r["label"]}) for r in ROWS], "'text'"),
        ([json.dumps({"text": r["text"]}) for r in ROWS], "'label'"),
        ([json.dumps(ROWS[0]), json.dumps({"text": "x", "label": 7}), json.dumps(ROWS[2])], "row 1"),
        ([json.dumps(ROWS[0]), json.dumps({"text": "x", "label": -1})], "row 1"),
        ([json.dumps(ROWS[0]), json.dumps({"text": "x", "label": "maybe"})], "row 1"),
        ([], "no rows"),
        (["", "   "], "no rows"),
    ],
    ids=[
        "truncated-json",
        "not-json",
        "missing-text",
        "missing-label",
        "label-too-big",
        "label-negative",
        "label-unknown-name",
        "empty",
        "blank",
    ],
)
def test_malformed_jsonl_is_a_data_error_naming_file_and_row(tmp_path: Path, lines: list[str], named: str) -> None:
    _write(tmp_path / "train.jsonl", lines)
    message = _data_error(_spec(tmp_path))
    assert "train.jsonl" in message and named in message, message


def test_malformed_csv_is_a_data_error(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", ["text,label", "good,1", 'bad,"0', "ok,1,extra"])
    message = _data_error(_spec(tmp_path, train="train.csv"))
    assert "train.csv" in message, message


def test_undecodable_image_is_a_data_error(tmp_path: Path) -> None:
    tiny.write_images(tmp_path, n=4)
    (tmp_path / "img" / "train-1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    spec = TrainingSpec.model_validate(
        tiny.spec(
            Path("/models/none"),
            tmp_path,
            tmp_path / "out",
            task="image-classification",
            dataset={"validation": None, "fields": {"image": "image", "label": "label"}},
        )
    )
    split = data_mod.read_split(spec, RuntimeEnv(), "train.jsonl", "dataset.train")
    rows = data_mod.attach_images(spec, data_mod.with_labels(spec, split), split.base, lambda image: image)
    with pytest.raises(DataError) as error:
        [rows[i] for i in range(len(rows))]
    assert "train-1.png" in str(error.value) and "\n" not in str(error.value)


@settings(max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    row=st.integers(0, len(ROWS) - 1),
    garbage=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12),
    cut=st.integers(0, 30),
)
def test_a_corrupted_line_is_a_data_error_or_still_valid(
    tmp_path_factory: Any, row: int, garbage: str, cut: int
) -> None:
    """Any line cut short and followed by junk: either still a valid table, or a DataError naming the file."""
    directory = tmp_path_factory.mktemp("fuzz")
    lines = [json.dumps(r) for r in ROWS]
    lines[row] = lines[row][:cut] + garbage.replace("\n", " ")
    _write(directory / "train.jsonl", lines)
    try:
        _prepare_labels(_spec(directory))
    except DataError as error:
        assert "train.jsonl" in str(error) and "\n" not in str(error), str(error)
