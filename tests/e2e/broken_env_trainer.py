"""The real trainer as a pod's image, with one thing about the pod broken (the image map points here).

``python broken_env_trainer.py MODE ARGS...`` execs the ``finetune-trainer`` script (same PID, so
the pod's exit status is the trainer's) after breaking the pod as MODE says:

- ``no-cuda``: the pod was given GPUs but they are not simulated (a node whose NVIDIA runtime is
  broken): the trainer must exit NoAccelerator;
- ``port-taken``: another process in the pod holds the trainer's /metrics port: MetricsUnavailable.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def main(mode: str, args: list[str]) -> None:
    trainer = str(Path(sys.executable).parent / "finetune-trainer")
    if mode == "no-cuda":
        os.environ.pop("FINETUNE_SIMULATED_GPUS", None)
    elif mode == "port-taken":
        held = socket.socket()
        held.bind((os.environ.get("FINETUNE_METRICS_ADDRESS", ""), int(os.environ["FINETUNE_METRICS_PORT"])))
        held.listen()
        os.set_inheritable(held.fileno(), True)  # held by the trainer process itself after exec
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    os.execv(trainer, [trainer, *args])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
