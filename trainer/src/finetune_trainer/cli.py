"""``finetune-trainer --config PATH [--output LOCATION]``: the entry point the operator's pods run."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from finetune_trainer import exitcodes
from finetune_trainer.config import RuntimeEnv, load_spec
from finetune_trainer.errors import TrainerError
from finetune_trainer.launch import record_exit_code
from finetune_trainer.preflight import preflight
from finetune_trainer.reporting import JsonLines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune-trainer", description="Fine-tune a pretrained model from a TrainingSpec."
    )
    p.add_argument("--config", required=True, help="YAML/JSON TrainingSpec, or a whole FineTuneJob manifest")
    p.add_argument("--output", help="override output.location (pvc://claim/path, file:///path or /path)")
    p.add_argument(
        "--plan", action="store_true", help="print the model's layer map and what the freeze policy trains; no training"
    )
    return p


def fail(log: JsonLines, error: TrainerError) -> int:
    """One clear line on stderr and an ``error`` JSON line; the exit code tells the operator why."""
    message = str(error)
    print(f"finetune-trainer: error: {message}", file=sys.stderr, flush=True)
    log.emit("error", reason=error.reason, message=message, exitCode=error.exit_code)
    return error.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    record_exit_code(code)  # under torchrun: for finetune_trainer.launch, which exits with it
    return code


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

            return print_plan(spec, env, sys.stdout)
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
    sys.exit(main())
