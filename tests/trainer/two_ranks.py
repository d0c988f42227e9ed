"""The 2-rank runs that ``test_ddp.py`` and ``test_fsdp.py`` check, in two torchrun starts (a start, two ranks
importing torch and transformers, costs more than any of these tiny runs): one FSDP run SIGKILLed once its first
sharded checkpoint is written, then one start that runs every other spec one after the other in the same two ranks
(``ddp_worker.py``'s ``EXTRA_SPECS``), the killed run's resumption among them, and last the one meant to fail.
The single-process twins of the FSDP runs train in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.trainer import tiny
from tests.trainer.helpers import train

WORKER = Path(__file__).with_name("ddp_worker.py")
FREEZES: dict[str, dict[str, Any]] = {
    "bottom-layers": {"strategy": "bottom-layers", "layers": 1},
    "lora": {"strategy": "lora", "lora": {"r": 4, "dropout": 0.0}},
}
"""The two freeze kinds that shard differently: frozen base weights inside the sharded blocks, a PEFT wrapper."""
RANK_BATCH = 4
"""Per rank; the single process takes both ranks' batches at once (8): the same examples per optimizer step."""
LLAMA_STEPS_PER_EPOCH = 48 // (2 * RANK_BATCH)
LLAMA_EPOCHS = 2
"""A checkpoint per epoch: the killed run is killed after the first, its resumption trains the second."""
BERT_STEPS_PER_EPOCH = 96 // (16 * 2)


def run_ranks(tmp_path: Path, wire: dict[str, Any], **env: str) -> tuple[int, str]:
    """Two ranks under torchrun: (torchrun's exit code, their output)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(wire))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(WORKER.parents[2])]))
    process = subprocess.Popen(
        [*command, str(spec)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the ranks hung:\n{output.decode()[-3000:]}") from None
    return process.returncode, output.decode()


def llama_wire(
    assets: dict[str, Path], out: Path, freeze: str, strategy: str, batch: int = RANK_BATCH
) -> dict[str, Any]:
    """2 epochs of 6 steps on the tiny Llama, no dropout (the ranks' random streams differ), a checkpoint per epoch.

    The FSDP runs also exercise what must not change their weights: bottom-layers accumulates two micro-batches of
    half the size (the same examples per optimizer step; the reduce-scatter waits for the second), LoRA recomputes
    activations (gradient checkpointing)."""
    hyperparameters: dict[str, Any] = {
        "epochs": LLAMA_EPOCHS,
        "batchSize": batch,
        "learningRate": 1e-2,
        "seed": 0,
        "dropout": 0.0,
    }
    if strategy == "fsdp" and freeze == "bottom-layers" and batch == RANK_BATCH:
        hyperparameters.update(batchSize=batch // 2, gradientAccumulationSteps=2)
    if strategy == "fsdp" and freeze == "lora":
        hyperparameters["gradientCheckpointing"] = True
    return tiny.spec(
        assets["llama"],
        assets["text"],
        out,
        task="causal-lm",
        freeze=FREEZES[freeze],
        hyperparameters=hyperparameters,
        distributed={"strategy": strategy},
    )


def bert_wire(assets: dict[str, Path], out: Path, **sections: Any) -> dict[str, Any]:
    """Tiny BERT on 96 examples, 3 epochs of 3 steps (batch 16 per rank, 2 ranks)."""
    hyperparameters = {"epochs": 3, "batchSize": 16, "learningRate": 1e-2, "seed": 0}
    wire = tiny.spec(assets["bert"], assets["sentiment"], out, hyperparameters=hyperparameters, **sections)
    wire["output"] = {"location": str(out)}
    return wire


def cached_wire(assets: dict[str, Path], out: Path) -> dict[str, Any]:
    """The bottom block frozen and its activations cached; no dropout, no evaluation."""
    wire = bert_wire(
        assets,
        out,
        freeze={"strategy": "bottom-layers", "layers": 1, "cacheActivations": True},
        evaluation={"strategy": "no", "metrics": ["loss"]},
    )
    wire["hyperparameters"]["dropout"] = 0.0
    return wire


def cache_bytes(assets: dict[str, Path], wire: dict[str, Any]) -> int:
    """What caching every training and validation example of ``wire`` takes (float32, hidden size 32)."""
    from transformers import AutoTokenizer

    from finetune_trainer import data
    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.spec import TrainingSpec

    processor = AutoTokenizer.from_pretrained(str(assets["bert"]))
    prepared = data.prepare(TrainingSpec.model_validate(wire), RuntimeEnv.from_environ({}), processor, None)
    assert prepared.validation is not None
    return sum(len(ids) for rows in (prepared.train, prepared.validation) for ids in rows["input_ids"]) * 32 * 4


@dataclass
class Runs:
    outs: dict[str, Path]
    """Each run's output directory, by name."""
    output: dict[str, str]
    """Each 2-rank run's lines of the ranks' output (from its ``run`` line to the next)."""
    code: int
    """The start's exit code: the last run's, ``private`` (which must fail)."""
    spare: int
    """The spare memory the activation-cache runs were told of."""

    def results(self, name: str) -> list[dict[str, Any]]:
        """Each rank's result of run ``name`` (a run that failed fails here, with the ranks' output)."""
        tag = "-stopped" if name == "cached-stopped" else ""  # it shares its output with cached-resumed
        paths = [self.outs[name] / f"rank-{rank}{tag}.json" for rank in (0, 1)]
        assert all(p.is_file() for p in paths), f"{name} did not finish:\n{self.output.get(name, '')[-3000:]}"
        return [json.loads(p.read_text()) for p in paths]

    def events(self, name: str) -> list[dict[str, Any]]:
        """Run ``name``'s JSON events (the two ranks share the pipe: a line may hold one of each)."""
        return _objects(self.output[name])


def _objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects in ``text``, wherever a line holds them."""
    decoder, found = json.JSONDecoder(), []
    for line in text.splitlines():
        at = line.find('{"')
        while at >= 0:
            try:
                value, end = decoder.raw_decode(line, at)
            except json.JSONDecodeError:
                at = line.find('{"', at + 1)
                continue
            found.append(value)
            at = line.find('{"', end)
    return found


def _kill_after_first_checkpoint(work: Path, wire: dict[str, Any]) -> None:
    """Two ranks that stop once epoch 1's checkpoint is written, SIGKILLed there (as the OOM killer would)."""
    spec = work / "spec.json"
    spec.write_text(json.dumps(wire))
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(WORKER.parents[2]),
        "HANG_AFTER_CHECKPOINT": str(LLAMA_STEPS_PER_EPOCH),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)]
    process = subprocess.Popen(
        [*command, str(spec)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    hanging: list[int] = []
    try:
        for line in process.stdout:  # the two ranks share the pipe: a line may hold one of each
            hanging += [event["pid"] for event in _objects(line) if event.get("event") == "hanging"]
            if len(hanging) == 2:
                break
        else:
            raise AssertionError("the run ended without its first checkpoint")
    finally:
        for pid in hanging:  # torchrun starts its workers in sessions of their own
            os.kill(pid, signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)


def run_all(assets: dict[str, Path], root: Path) -> Runs:
    """Every run, in the order their dependencies need (see the module's docstring)."""
    outs: dict[str, Path] = {"resumed": root / "resumed"}
    (root / "killed").mkdir()
    killed = llama_wire(assets, outs["resumed"], "bottom-layers", "fsdp")
    _kill_after_first_checkpoint(root / "killed", killed)
    assert not (outs["resumed"] / "result.json").exists(), "killed before the end"

    # Pod-wide, the activation cache (all examples) fits the spare memory but not half of it.
    spare = cache_bytes(assets, cached_wire(assets, root / "sizing")) * 3 // 2
    spill = {"ACTIVATION_SPARE_MEMORY": str(spare), "COUNT_FROZEN_CALLS": "1"}
    wires: dict[str, dict[str, Any]] = {}
    for strategy in ("fsdp", "ddp"):
        for freeze in FREEZES:
            wires[f"{strategy}-{freeze}"] = llama_wire(assets, root / f"{strategy}-{freeze}", freeze, strategy)
    wires["resumed"] = killed
    gradual = bert_wire(
        assets,
        root / "gradual",
        freeze={"strategy": "head-only", "gradualUnfreezing": {"startEpoch": 2, "layersPerEpoch": 1}},
        evaluation={"strategy": "no", "metrics": ["loss"]},
    )
    wires["gradual"] = gradual
    early = bert_wire(assets, root / "early-stop", earlyStopping={"metric": "accuracy", "patience": 10})
    wires["early-stop"] = {**early, "worker": {"FORCE_EARLY_STOP_RANK": "1"}}
    wires["cached"] = {**cached_wire(assets, root / "cached"), "worker": spill}
    wires["cached-stopped"] = {
        **cached_wire(assets, root / "cached-resumed"),
        "worker": {**spill, "TERMINATE_AT_STEP": "4", "RESULT_TAG": "-stopped"},
    }
    wires["cached-resumed"] = {**cached_wire(assets, root / "cached-resumed"), "worker": spill}
    # Last (it fails): gradual's run again where rank 1 cannot see rank 0's checkpoints.
    wires["private"] = {**gradual, "worker": {"PRIVATE_OUTPUT_RANK": "1"}}

    names = list(wires)
    paths = []
    for index, name in enumerate(names):
        outs[name] = Path(wires[name]["output"]["location"])
        path = root / f"spec-{index}.json"
        path.write_text(json.dumps(wires[name]))
        paths.append(str(path))
    (root / "ranks").mkdir()
    code, output = run_ranks(root / "ranks", wires[names[0]], EXTRA_SPECS=os.pathsep.join(paths[1:]))
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for part in re.split(r'(\{"event": "run", "index": \d+\})', output):  # a marker may share a line
        if part.startswith('{"event": "run"'):
            current = sections.setdefault(names[json.loads(part)["index"]], [])
        current.append(part)
    for freeze in FREEZES:
        outs[f"one-{freeze}"] = root / f"one-{freeze}"
        train(llama_wire(assets, outs[f"one-{freeze}"], freeze, "fsdp", batch=2 * RANK_BATCH))
    return Runs(outs, {name: "".join(parts) for name, parts in sections.items()}, code, spare)
