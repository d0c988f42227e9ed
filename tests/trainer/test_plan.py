"""``finetune-trainer --plan``: the layer map with parameter counts and what the strategy trains, no training."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from finetune_cli.main import cmd_advise
from finetune_trainer.cli import main
from tests.trainer import tiny


def _plan(wire: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    config = tmp_path / "spec.json"
    config.write_text(json.dumps(wire))
    assert main(["--config", str(config), "--plan"]) == 0
    return capsys.readouterr().out.splitlines()


def test_plan_shows_blocks_and_what_bottom_layers_freezes(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    wire = tiny.spec(
        assets["bert"], tmp_path / "no-data-needed", out, freeze={"strategy": "bottom-layers", "layers": 1}
    )
    lines = _plan(wire, tmp_path, capsys)
    assert lines[0].endswith("freeze.strategy bottom-layers, layers 1")
    rows = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert rows["embeddings"].endswith("frozen")  # bottom-layers freezes the embeddings with the lowest block
    block0 = next(v for k, v in rows.items() if k.startswith("block 0"))
    block1 = next(v for k, v in rows.items() if k.startswith("block 1"))
    assert block0.endswith("frozen") and block1.endswith("trains")
    assert rows["head"].endswith("trains")
    assert len([k for k in rows if k.startswith("block ")]) == 2
    total = rows["total"].split()
    assert int(total[1].replace(",", "")) > int(total[2].replace(",", "")) > 0
    assert not out.exists(), "a plan trains nothing and writes nothing"


def test_plan_with_lora_trains_only_adapters_and_head(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wire = tiny.spec(assets["bert"], tmp_path / "data", tmp_path / "out", freeze={"strategy": "lora"})
    lines = _plan(wire, tmp_path, capsys)
    rows = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert rows["embeddings"].endswith("frozen")
    assert all(v.endswith("partly trains") for k, v in rows.items() if k.startswith("block "))
    assert float(rows["total"].split()[-1].rstrip("%")) < 50


def test_advise_prints_the_same_layer_map_when_the_model_is_local(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kubectl finetune advise` on a manifest whose model is on this machine: its warnings, then --plan's table."""
    wire = tiny.spec(
        assets["bert"], tmp_path / "data", tmp_path / "out", freeze={"strategy": "bottom-layers", "layers": 1}
    )
    plan = _plan(wire, tmp_path, capsys)
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": wire}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(manifest))
    out = io.StringIO()
    assert cmd_advise(str(path), out, io.StringIO()) == 0
    lines = out.getvalue().splitlines()
    heading = lines.index("Layer map (what `finetune-trainer --config FILE --plan` prints):")
    plan_at = next(i for i, line in enumerate(lines) if line.startswith("memory plan: "))
    assert 0 < plan_at < heading  # the memory plan (from config.json alone) comes before the layer map
    assert all(line.startswith(("Warning: ", f"{path}: no advice")) for line in lines[:plan_at])
    assert lines[heading + 1 :] == plan[: plan.index(lines[plan_at])]  # --plan prints its memory plan last
    assert any(line.startswith("block 1") and line.endswith("trains") for line in plan)
    assert not (tmp_path / "out").exists(), "advise trains nothing and writes nothing"
