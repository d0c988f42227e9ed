"""Each bad input fails fast with one clear stderr line, an ``error`` JSON line and its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.cli import main
from tests.trainer import tiny


def write(path: Path, wire: dict[str, Any]) -> Path:
    path.write_text(json.dumps(wire))
    return path


def run_cli(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], dict[str, Any]]:
    code = main(["--config", str(config)])
    captured = capsys.readouterr()
    errors = [json.loads(line) for line in captured.out.splitlines() if '"event": "error"' in line]
    assert len(errors) == 1
    return code, captured.err.strip().splitlines(), errors[0]


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "validation.jsonl"):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CASES: dict[str, tuple[int, str, str]] = {
    # name: (exit code, reason, stderr line (after the prefix))
    "spec": (2, "InvalidConfig", "hyperparameters.learningRate: Input should be greater than 0"),
    "field": (3, "DataError", "dataset.fields.text: column 'txt' not in train.jsonl (columns: text, label)"),
    "pattern": (2, "InvalidConfig", "freeze.frozenModules[0]: pattern 'encoder\\.nope' matches no parameter"),
    "label": (3, "DataError", "dataset: label 5 in row 0 of train.jsonl is outside numLabels 2 (expected 0..1)"),
    "label-name": (
        3,
        "DataError",
        "dataset: label 'meh' in row 0 of train.jsonl is not a class (labelNames: neg, pos)",
    ),
    "no-data": (3, "DataError", "dataset.source: {data} not found"),
    "no-file": (3, "DataError", "dataset.train: no file matches 'missing.jsonl' in {data}"),
    "empty": (3, "DataError", "dataset.train: train.jsonl has no rows"),
    "no-model": (4, "ModelError", "model.source: {model} not found"),
    "bad-model": (4, "ModelError", "model.source: cannot load"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, model, out = assets["sentiment"], assets["bert"], tmp_path / "out"
    wire = tiny.spec(model, data, out)
    if case == "spec":
        wire["hyperparameters"]["learningRate"] = 0
    elif case == "field":
        wire["dataset"]["fields"] = {"text": "txt"}
    elif case == "pattern":
        wire["freeze"] = {"strategy": "modules", "frozenModules": [r"encoder\.nope"]}
    elif case == "label":
        data = jsonl(tmp_path / "d", [{"text": "good", "label": 5}])
    elif case == "label-name":
        data = jsonl(tmp_path / "d", [{"text": "good", "label": "meh"}])
        wire["model"]["labelNames"] = ["neg", "pos"]
    elif case == "no-data":
        data = tmp_path / "nowhere"
    elif case == "no-file":
        wire["dataset"]["train"] = "missing.jsonl"
    elif case == "empty":
        data = tmp_path / "d"
        data.mkdir()
        (data / "train.jsonl").write_text("")
        (data / "validation.jsonl").write_text("")
    elif case == "no-model":
        model = tmp_path / "no-model"
    elif case == "bad-model":
        model = tmp_path / "bad-model"
        model.mkdir()
        (model / "config.json").write_text("{not json")
    wire["dataset"]["source"], wire["model"]["source"] = str(data), str(model)
    code, stderr, error = run_cli(write(tmp_path / "spec.json", wire), capsys)
    expected_code, reason, message = CASES[case]
    message = message.format(data=data, model=model)
    assert code == expected_code and error["reason"] == reason and error["exitCode"] == expected_code
    assert len(stderr) == 1 and stderr[0].startswith(f"finetune-trainer: error: {message}"), stderr
    assert error["message"] == stderr[0].removeprefix("finetune-trainer: error: ")


def test_unreadable_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr, _ = run_cli(tmp_path / "missing.yaml", capsys)
    assert code == 2 and stderr[0].startswith("finetune-trainer: error: config: cannot read")


TRAINING_STACK = {"torch", "transformers", "datasets", "peft", "accelerate"}


def console(config: Path) -> tuple[int, list[str], set[str], list[str]]:
    """The installed entry point, as the pod runs it: exit code, stderr lines, the packages it imported
    (``PYTHONPROFILEIMPORTTIME``), stdout lines."""
    script = Path(sys.executable).parent / "finetune-trainer"
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([str(script), "--config", str(config)], capture_output=True, text=True, env=env, check=False)
    lines = proc.stderr.strip().splitlines()
    packages = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    others = [line for line in lines if not line.startswith("import time:")]
    return proc.returncode, others, packages, proc.stdout.splitlines()


def test_console_script_exit_code(assets: dict[str, Path], tmp_path: Path) -> None:
    """Nothing but the one line on stderr, in about a second: the preflight stage reads and checks the data
    before torch, transformers and datasets are imported (7-9 s)."""
    wire = tiny.spec(assets["bert"], assets["sentiment"], tmp_path / "out", dataset={"fields": {"text": "txt"}})
    code, stderr, imported, _ = console(write(tmp_path / "s.json", wire))
    assert code == 3
    assert stderr == [
        "finetune-trainer: error: dataset.fields.text: column 'txt' not in train.jsonl (columns: text, label)"
    ]
    assert not imported & TRAINING_STACK


def test_run_level_config_errors_come_before_the_training_stack_is_imported(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    wire = tiny.spec(
        assets["bert"], assets["sentiment"], tmp_path / "out", dataset={"validation": None}, earlyStopping={}
    )
    code, _, imported, stdout = console(write(tmp_path / "s.json", wire))
    message = "dataset.validation: earlyStopping needs validation data (validation or validationFraction)"
    assert code == 2 and json.loads(stdout[-1])["message"] == message
    assert not imported & TRAINING_STACK
