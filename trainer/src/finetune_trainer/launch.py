"""``python -m finetune_trainer.launch TORCHRUN_ARGS...``: torchrun, exiting with the trainer's own exit code.

torchrun exits 1 whatever its workers exited with, so a config or data error (exit 2/3, not
retried) would look like a crash and be retried ``backoffLimit`` times on every node. Each
worker records its exit code in ``$FINETUNE_EXIT_CODE_DIR/rank-N`` (``record_exit_code``, called
by the trainer's CLI); this launcher runs torchrun with that directory set and exits with the
code that tells the operator why. Torch-free: torchrun runs as a child process.

A pod that got SIGTERM (a preemption, a drain) exits 75, Terminated, on every node index: the
Job's podFailurePolicy ignores 75, so a disruption never uses up ``backoffLimit``. torchrun gives
its workers the pod's grace period (less a margin for this launcher to exit) to save before it
SIGKILLs them, not its default 30 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from finetune_trainer import exitcodes
from finetune_trainer.atomic import atomic_file
from finetune_trainer.contract import TERMINATION_GRACE_ENV

EXIT_CODE_DIR_ENV = "FINETUNE_EXIT_CODE_DIR"
GRACE_MARGIN_SECONDS = 10
"""Of the grace period, kept for torchrun and this launcher to exit after the workers."""
TORCHRUN_DEFAULT_SHUTDOWN_SECONDS = 30


def record_exit_code(code: int, environ: Mapping[str, str] | None = None) -> None:
    """Leave this worker's exit code for the launcher (a no-op outside ``launch``)."""
    env = os.environ if environ is None else environ
    directory = env.get(EXIT_CODE_DIR_ENV)
    if not directory:
        return
    rank = env.get("RANK", "0")
    with contextlib.suppress(OSError):  # the launcher then falls back to torchrun's own code
        atomic_file(Path(directory) / f"rank-{rank}", f"{code}\n".encode())


def recorded_exit_codes(directory: Path) -> dict[int, int]:
    """rank -> recorded exit code (unreadable entries skipped)."""
    codes: dict[int, int] = {}
    for path in directory.glob("rank-*"):
        try:
            codes[int(path.name.removeprefix("rank-"))] = int(path.read_text().strip())
        except ValueError:
            continue
    return codes


def container_exit_code(torchrun_code: int, workers: Mapping[int, int], terminated: bool = False) -> int:
    """The exit code the pod should end with, given torchrun's and the workers' recorded codes.

    A permanent error (config, data, model, ...) of any worker wins, lowest rank first: a retry
    cannot fix it. Otherwise, once torchrun failed: Terminated (75, resumable, not counted) when
    the pod got SIGTERM (``terminated``) or rank 0 (the one that checkpoints) saved and stopped
    because another pod did; else a crash (retried). A clean torchrun is 0.
    """
    if torchrun_code == 0:
        return 0
    for rank in sorted(workers):
        if workers[rank] in exitcodes.PERMANENT:
            return workers[rank]
    if terminated or workers.get(0) == exitcodes.TERMINATED.code:
        return exitcodes.TERMINATED.code
    return exitcodes.CRASHED.code if torchrun_code < 0 or torchrun_code in exitcodes.PERMANENT else torchrun_code


def shutdown_timeout(environ: Mapping[str, str]) -> int:
    """Seconds torchrun lets its workers save after SIGTERM before it SIGKILLs them: the pod's grace period
    less ``GRACE_MARGIN_SECONDS`` (torchrun's own default without a grace period in the environment)."""
    try:
        grace = int(environ.get(TERMINATION_GRACE_ENV, ""))
    except ValueError:
        return TORCHRUN_DEFAULT_SHUTDOWN_SECONDS
    return max(grace - GRACE_MARGIN_SECONDS, 1)


def torchrun_args(args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """torchrun's arguments: ``args`` with a ``--shutdown-timeout`` from the grace period unless one is given."""
    options = args[: args.index("-m")] if "-m" in args else args
    if any(a.startswith(("--shutdown-timeout", "--shutdown_timeout")) for a in options):
        return list(args)
    return [f"--shutdown-timeout={shutdown_timeout(environ)}", *args]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    terminated = False
    with tempfile.TemporaryDirectory(prefix="finetune-exit-") as directory:
        env = {**os.environ, EXIT_CODE_DIR_ENV: directory}
        command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(args, os.environ)]
        process = subprocess.Popen(command, env=env)

        def forward(signum: int, frame: FrameType | None) -> None:
            nonlocal terminated
            terminated = terminated or signum == signal.SIGTERM
            process.send_signal(signum)  # torchrun passes it on to the workers, which save and exit 75

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        code = process.wait()
        result = container_exit_code(code, recorded_exit_codes(Path(directory)), terminated)
    if result != code:
        print(f"finetune-trainer launch: torchrun exited {code}; the trainer's exit code is {result}", file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(main())
