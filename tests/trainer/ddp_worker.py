"""One rank of a real DDP run under torchrun (``torchrun ... ddp_worker.py SPEC.json``).

It runs the trainer as a pod would and, for the test to compare, saves this rank's final weights to
``<output>/rank-<RANK>.pt`` and its result to ``<output>/rank-<RANK>.json``. With ``FORCE_EARLY_STOP_RANK=N``, rank
N alone sees early stopping fire at its first evaluation: the way one rank's verdict could differ from the others'.
With ``PRIVATE_OUTPUT_RANK=N``, rank N writes to an output location of its own (storage the nodes do not share). A
sharded (FSDP) run dumps the whole model gathered on rank 0 only; run without torchrun, the worker is the one
process of a single-process run. With ``COUNT_FROZEN_CALLS=1``, the result also says how often the tiny BERT's
lowest (frozen) block ran in training and in evaluation; it always lists the example indices of each training batch
(when the activation cache indexes them). ``ACTIVATION_SPARE_MEMORY=N`` makes the activation cache see N bytes of
memory to spare in the pod (a small N: it spills to disk). With ``TERMINATE_AT_STEP=N``, every rank sees SIGTERM's
stop at step N (checkpoint and leave). With ``HANG_AFTER_CHECKPOINT=N``, every rank stops (sleeps, printing a
``hanging`` line with its pid) once the checkpoint of step N is written: a run to kill after a checkpoint.
``EXTRA_SPECS=A:B``: the ranks then run those specs too, one after the other (one torchrun start for several
runs; a start costs more than a tiny run). Each spec may carry a ``"worker"`` key: these settings for its run
only (``{"FORCE_EARLY_STOP_RANK": "1"}``), over the environment's. Before each run the ranks print
``{"event": "run", "index": I}``: the output's lines from there on are that run's. Trainer errors exit with their
exit code and one line, as the CLI does. ``RESULT_TAG=T``: the result goes to ``rank-<RANK>T.json`` (two runs in
one output location).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from finetune_trainer import activation_cache, callbacks, run, sharding, trainer
from finetune_trainer.activation_cache import EXAMPLE_INDEX
from finetune_trainer.config import RuntimeEnv
from finetune_trainer.early_stopping import EarlyStoppingState
from finetune_trainer.errors import TrainerError
from finetune_trainer.spec import TrainingSpec

SETTINGS = ("FORCE_EARLY_STOP_RANK", "PRIVATE_OUTPUT_RANK", "COUNT_FROZEN_CALLS", "ACTIVATION_SPARE_MEMORY")
SETTINGS += ("TERMINATE_AT_STEP", "HANG_AFTER_CHECKPOINT", "RESULT_TAG")
options: dict[str, str] = {}
"""The current run's settings: the environment's, then its spec's ``worker`` key."""


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    out = Path()
    real_observe = callbacks.observe

    def fire(rule: Any, previous: EarlyStoppingState, evaluated: Any) -> EarlyStoppingState:
        state = real_observe(rule, previous, evaluated)
        if options.get("FORCE_EARLY_STOP_RANK") == str(rank):
            state = state.model_copy(update={"triggered": True})
        return state

    callbacks.observe = fire  # type: ignore[assignment]
    save_final = run._save_final

    def save_and_dump(ctx: Any, trainer: Any, *args: Any) -> Any:
        if trainer.sharded:  # the whole model, gathered on rank 0
            state = sharding.full_state_dict(trainer.model)
            if state is not None:
                torch.save(state, out / f"rank-{rank}.pt")
        else:
            torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, out / f"rank-{rank}.pt")
        return save_final(ctx, trainer, *args)

    run._save_final = save_and_dump  # type: ignore[assignment]
    frozen_calls = {"train": 0, "eval": 0}
    apply_freeze = run.apply_freeze

    def hooked(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        def count(*_: Any) -> None:
            frozen_calls["train" if model.training else "eval"] += 1

        result = apply_freeze(model, *args, **kwargs)
        if options.get("COUNT_FROZEN_CALLS") == "1":
            model.bert.encoder.layer[0].attention.register_forward_hook(count)  # type: ignore[union-attr,operator]
        return result

    run.apply_freeze = hooked  # type: ignore[assignment]
    spare_memory = activation_cache.spare_memory

    def spare() -> int | None:
        given = options.get("ACTIVATION_SPARE_MEMORY")
        return int(given) if given is not None else spare_memory()

    activation_cache.spare_memory = spare
    on_step_end = callbacks.StopCallback.on_step_end

    def terminate(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        at = options.get("TERMINATE_AT_STEP")
        self.ctx.terminating = self.ctx.terminating or (at is not None and state.global_step == int(at))
        on_step_end(self, args, state, control, **kwargs)

    callbacks.StopCallback.on_step_end = terminate  # type: ignore[method-assign]
    save = callbacks.Checkpointer.save

    def save_and_hang(self: Any, state: Any, control: Any) -> None:
        save(self, state, control)
        at = options.get("HANG_AFTER_CHECKPOINT")
        if at is not None and state.global_step == int(at):
            print(json.dumps({"event": "hanging", "step": state.global_step, "pid": os.getpid()}), flush=True)
            time.sleep(600)  # until the test kills the ranks

    callbacks.Checkpointer.save = save_and_hang  # type: ignore[method-assign]
    batches: list[list[int]] = []
    training_step = trainer.FineTuneTrainer.training_step

    def record(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if EXAMPLE_INDEX in inputs:
            batches.append(inputs[EXAMPLE_INDEX].tolist())
        return training_step(self, model, inputs, *args, **kwargs)

    trainer.FineTuneTrainer.training_step = record  # type: ignore[method-assign]
    torch.set_num_threads(1)
    extra = [path for path in os.environ.get("EXTRA_SPECS", "").split(os.pathsep) if path]
    for index, path in enumerate([sys.argv[1], *extra]):  # the runs, one after the other, in the same ranks
        wire = json.loads(Path(path).read_text())
        options.clear()
        options.update({name: os.environ[name] for name in SETTINGS if name in os.environ})
        options.update(wire.pop("worker", {}))
        out = Path(wire["output"]["location"])
        if options.get("PRIVATE_OUTPUT_RANK") == str(rank):
            wire["output"]["location"] = str(out / f"rank-{rank}-private")
        batches.clear()
        frozen_calls.update(train=0, eval=0)
        print(json.dumps({"event": "run", "index": index}), flush=True)
        try:
            result = run.run(TrainingSpec.model_validate(wire), RuntimeEnv(metrics_port=0, log_every_steps=1))
        except TrainerError as error:
            print(f"finetune-trainer: error: {error}", file=sys.stderr, flush=True)
            sys.exit(error.exit_code)
        summary = {"reason": result.reason, "finalStep": result.final_step, "frozenCalls": frozen_calls}
        (out / f"rank-{rank}{options.get('RESULT_TAG', '')}.json").write_text(
            json.dumps({**summary, "batches": batches})
        )


if __name__ == "__main__":
    main()
