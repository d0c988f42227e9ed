"""One rank of a real DDP run under torchrun (``torchrun ... ddp_worker.py SPEC.json``).

It runs the trainer as a pod would and, for the test to compare, saves this rank's final weights
to ``<output>/rank-<RANK>.pt`` and its result to ``<output>/rank-<RANK>.json``. With
``FORCE_EARLY_STOP_RANK=N``, rank N alone sees early stopping fire at its first evaluation: the
way one rank's verdict could differ from the others'. With ``PRIVATE_OUTPUT_RANK=N``, rank N
writes to an output location of its own (storage the nodes do not share). Trainer errors exit
with their exit code and one line, as the CLI does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from finetune_trainer import callbacks, run
from finetune_trainer.config import RuntimeEnv
from finetune_trainer.early_stopping import EarlyStoppingState
from finetune_trainer.errors import TrainerError
from finetune_trainer.spec import TrainingSpec


def main() -> None:
    wire = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    out = Path(wire["output"]["location"])
    if os.environ.get("PRIVATE_OUTPUT_RANK") == str(rank):
        wire["output"]["location"] = str(out / f"rank-{rank}-private")
    if os.environ.get("FORCE_EARLY_STOP_RANK") == str(rank):
        real = callbacks.observe

        def fire(rule: Any, previous: EarlyStoppingState, evaluated: Any) -> EarlyStoppingState:
            state = real(rule, previous, evaluated)
            return state.model_copy(update={"triggered": True})

        callbacks.observe = fire  # type: ignore[assignment]
    save_final = run._save_final

    def save_and_dump(ctx: Any, trainer: Any, processor: Any) -> str:
        torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, out / f"rank-{rank}.pt")
        return save_final(ctx, trainer, processor)

    run._save_final = save_and_dump  # type: ignore[assignment]
    torch.set_num_threads(1)
    try:
        result = run.run(TrainingSpec.model_validate(wire), RuntimeEnv(metrics_port=0, log_every_steps=1))
    except TrainerError as error:
        print(f"finetune-trainer: error: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    (out / f"rank-{rank}.json").write_text(json.dumps({"reason": result.reason, "finalStep": result.final_step}))


if __name__ == "__main__":
    main()
