"""``finetune-trainer --config PATH [--output LOCATION]``: the entry point the operator's pods run."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from finetune_trainer import exitcodes
from finetune_trainer.config import RuntimeEnv, load_spec, resources_of
from finetune_trainer.errors import TrainerError
from finetune_trainer.launch import record_exit_code
from finetune_trainer.memory_plan import print_memory_plan
from finetune_trainer.preflight import preflight
from finetune_trainer.reporting import JsonLines, heartbeats, start_reporter, stop_background
from finetune_trainer.spec import TrainingSpec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune-trainer", description="Fine-tune a pretrained model from a TrainingSpec."
    )
    p.add_argument("--config", required=True, help="YAML/JSON TrainingSpec, or a whole FineTuneJob manifest")
    p.add_argument("--output", help="override output.location (pvc://claim/path, s3://bucket/prefix, file:///path)")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the model's layer map, what the freeze policy trains and the memory plan (GiB per GPU for ddp "
        "and fsdp, the strategy auto picks); no training",
    )
    return p


def fail(log: JsonLines, error: TrainerError) -> int:
    """One clear line on stderr and an ``error`` JSON line; the exit code tells the operator why."""
    message = str(error)
    print(f"finetune-trainer: error: {message}", file=sys.stderr, flush=True)
    log.emit("error", reason=error.reason, message=message, exitCode=error.exit_code)
    return error.exit_code


class _Terminated(BaseException):
    """SIGTERM outside the training loop (loading, the final save): nothing to checkpoint there."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (embedded use): the caller handles signals
        previous = None
    try:
        code = _main(argv)
    except _Terminated:
        # A preemption or drain while the model loads (minutes for a large one) is no failure: 75 is
        # resumable and not counted against backoffLimit. The training loop has its own handler (run.py),
        # which stops at the next step and saves a checkpoint first.
        JsonLines().emit("terminated", step=None, checkpoint=None, exitCode=exitcodes.TERMINATED.code)
        code = exitcodes.TERMINATED.code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        stop_background()  # whatever ended the run: no thread of ours outlives it (see stop_background)
    record_exit_code(code)  # under torchrun: for finetune_trainer.launch, which exits with it
    return code


def entry() -> NoReturn:
    """The process's entry point (the ``finetune-trainer`` script, ``python -m finetune_trainer.cli``).

    Exits with ``os._exit`` once output is flushed: the exit code is the pod's only word on why the
    run ended (the podFailurePolicy fails the Job on it), and interpreter finalization can still
    replace it. ``main`` stops our own threads, but libraries start daemon threads too (a data
    loader's pin-memory thread, a /metrics request handler), and CPython 3.11 ends any daemon thread
    that wakes during finalization with ``pthread_exit``, which aborts the process (exit 134). Nothing
    is left to do by then: results are written, reporters have sent their last patch, and data
    loader workers exit when their parent does.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: the exit code still goes out
            stream.flush()
    os._exit(code)


def _staged(spec: TrainingSpec, env: RuntimeEnv, log: JsonLines) -> TrainingSpec:
    """Download the s3:// sources once (cached) and restore the output's checkpoints, before torch loads.

    Heartbeats go out meanwhile (rank 0): a long download is work, and the operator would otherwise call
    the job Stalled after ``stallTimeoutSeconds``.
    """
    from finetune_trainer.s3 import prepare  # noqa: PLC0415 (obstore loads only for s3:// jobs)

    reporter = start_reporter(env, log) if os.environ.get("RANK", "0") == "0" else None
    try:
        with heartbeats(reporter):
            return prepare(spec, env, log.emit)
    finally:
        if reporter is not None:
            reporter.close()


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    log = JsonLines()
    try:
        env = RuntimeEnv.from_environ()
        spec = load_spec(args.config, args.output)
        # torch loads only once the spec, the run's config and the data are known to be valid: such errors
        # fail in about a second, not after 7-9 s of imports
        if args.plan:
            from finetune_trainer.plan import print_plan  # noqa: PLC0415

            code = print_plan(spec, env, sys.stdout)
            print_memory_plan(spec, env, resources_of(args.config), sys.stdout)
            return code
        if "s3://" in spec.model.source + spec.dataset.source + spec.output.location:
            spec = _staged(spec, env, log)
        checked = preflight(spec, env)  # data and run-level config errors, before the training stack loads
        from finetune_trainer.run import run  # noqa: PLC0415

        return run(spec, env, log, checked).exit_code
    except TrainerError as error:
        return fail(log, error)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a crash: retried by the operator
        log.emit(
            "error",
            reason=exitcodes.CRASHED.reason,
            message=f"{type(exc).__name__}: {exc}",
            exitCode=exitcodes.CRASHED.code,
        )
        traceback.print_exc()
        return exitcodes.CRASHED.code


if __name__ == "__main__":
    entry()
