"""Trainer callbacks: early stopping (persisted), checkpoints (complete marker, rotation), stop requests,
SIGTERM, gradual unfreezing and progress reporting."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer import sharding
from finetune_trainer.atomic import atomic_directory
from finetune_trainer.config import location_uri
from finetune_trainer.contract import (
    EARLY_STOPPED,
    MAX_EVALUATIONS,
    BestResult,
    EvaluationRecord,
    Progress,
    TrainerStatus,
)
from finetune_trainer.distributed import barrier, from_main, max_across_ranks
from finetune_trainer.early_stopping import EarlyStoppingState, Evaluated, explain, improves, observe
from finetune_trainer.freeze import count_parameters
from finetune_trainer.loss_watch import LossWatch
from finetune_trainer.ownership import OWNER_FILE
from finetune_trainer.reporting import JsonLines, PrometheusMetrics, StatusReporter, utc_now
from finetune_trainer.spec import EarlyStopping, TrainingSpec

COMPLETE_MARKER = "finetune-complete"
"""Written last into a checkpoint directory: directories without it are partial and never resumed from."""
EARLY_STOPPING_FILE = "early_stopping.json"
RUN_STATE_FILE = "run_state.json"


class Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class RunState(Wire):
    """What a checkpoint must carry beyond the Trainer's own state for an exact resume."""

    early_stopping: EarlyStoppingState | None = None
    best: BestResult | None = None
    evaluations: list[EvaluationRecord] = []
    thawed_units: int = 0
    losses: LossWatch = Field(default_factory=LossWatch)
    """The divergence rule's references and the training loss since the last evaluation."""


@dataclass
class RunContext:
    """Shared by the callbacks: the spec, where things go, and what happened so far."""

    spec: TrainingSpec
    output_dir: Path
    checkpoints_dir: Path
    pvc_root: Path
    log: JsonLines
    is_main: bool = True
    state: RunState = field(default_factory=RunState)
    reporter: StatusReporter | None = None
    metrics: PrometheusMetrics | None = None
    terminating: bool = False
    """SIGTERM received (set by the signal handler)."""
    stopped_by: str | None = None
    """Why training stopped early: Terminated, Stopped, EarlyStopped (stop request) or None."""
    stop_message: str = ""
    majority_baseline: float | None = None
    """Classification: accuracy of always predicting the most frequent validation label (for the diagnosis)."""
    chance_loss: float | None = None
    """The loss of a uniform prediction (see ``loss_watch.chance_loss``): a divergence reference."""
    mirror: Any = None
    """An s3:// output's ``finetune_trainer.s3.CheckpointMirror``: uploads each checkpoint (rank 0; under FSDP every
    rank, its own files)."""
    best_rule: EarlyStopping = field(init=False)

    def __post_init__(self) -> None:
        rule = self.spec.early_stopping
        self.best_rule = rule if rule is not None else EarlyStopping(metric=self.spec.evaluation.metrics[0])

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step}"

    def checkpoint_uri(self, step: int) -> str:
        return location_uri(self.checkpoint_dir(step), self.spec.output.location, self.pvc_root)

    def best_checkpoint(self, step: int) -> str | None:
        """The checkpoint of ``step`` as status may name it: with an s3:// output only once its manifest is in
        the bucket (a reader, or a resume on a fresh pod, must never be pointed at a partial upload)."""
        if self.mirror is not None and self.checkpoint_dir(step).name not in self.mirror.uploaded:
            return None
        return self.checkpoint_uri(step)


def report_published_best(ctx: RunContext) -> None:
    """Name the best's checkpoint (in the run state, the log and status) once the mirror has published it."""
    best = ctx.state.best
    if best is None or best.checkpoint is not None or (checkpoint := ctx.best_checkpoint(best.step)) is None:
        return
    ctx.state.best = best.model_copy(update={"checkpoint": checkpoint})
    ctx.log.emit("best_checkpoint", step=best.step, checkpoint=checkpoint)
    if ctx.reporter is not None:
        ctx.reporter.update(TrainerStatus(best=ctx.state.best), urgent=True)


def history_status(ctx: RunContext) -> TrainerStatus:
    """The status keys holding the run's evaluation history: the latest evaluations and the best result."""
    history = TrainerStatus(evaluations=ctx.state.evaluations[-MAX_EVALUATIONS:])
    if ctx.state.best is not None:
        history.best = ctx.state.best
    return history


FULL = "full"
"""A checkpoint with optimizer, scheduler and RNG state: training resumes from it."""
WEIGHTS = "weights"
"""Only the weights of a new best (between ``checkpointIntervalSteps``): restoreBest reads it; never resumed from."""


def checkpoint_kind(path: Path) -> str | None:
    """FULL or WEIGHTS for a complete checkpoint (marker written last), None for an unfinished one."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return None
    words = marker.read_text().split()
    return WEIGHTS if words[1:] == [WEIGHTS] else FULL  # markers written before kinds existed are full


def complete_checkpoints(checkpoints_dir: Path, kind: str | None = None) -> list[tuple[int, Path]]:
    """(step, dir) of complete checkpoints (of ``kind``, if given), oldest first; unfinished writes are skipped."""
    found = []
    for path in checkpoints_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        found_kind = checkpoint_kind(path) if suffix.isdigit() else None
        if found_kind is not None and kind in (None, found_kind):
            found.append((int(suffix), path))
    return sorted(found)


def partial_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoint directories without the marker (written in place by an older trainer and interrupted)."""
    return [p for p in checkpoints_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_kind(p) is None]


def load_run_state(checkpoint: Path) -> RunState:
    path = checkpoint / RUN_STATE_FILE
    state = RunState.model_validate_json(path.read_text()) if path.is_file() else RunState()
    es_path = checkpoint / EARLY_STOPPING_FILE
    if es_path.is_file():
        state.early_stopping = EarlyStoppingState.model_validate_json(es_path.read_text())
    return state


class EarlyStoppingCallback(TrainerCallback):
    """Applies the shared pure rule on each evaluation; the state rides along in every checkpoint."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        raw = kwargs.get("metrics") or {}
        wanted = set(self.ctx.spec.evaluation.metrics) | {"loss"}
        metrics = {
            k.removeprefix("eval_"): float(v)
            for k, v in raw.items()
            if k.removeprefix("eval_") in wanted and isinstance(v, int | float) and math.isfinite(float(v))
        }
        step, epoch = state.global_step, float(state.epoch or 0.0)
        run = self.ctx.state
        # keyed by step: a resumed run replaces what the lost run had recorded past its checkpoint
        run.evaluations = [e for e in run.evaluations if e.step < step][-(MAX_EVALUATIONS - 1) :]
        # the mean training loss since the previous evaluation, whether or not the steps were logged
        train_loss = run.losses.close_window()
        run.evaluations.append(
            EvaluationRecord(step=step, epoch=epoch, metrics=metrics, time=utc_now(), train_loss=train_loss)
        )
        control.should_save = True  # every evaluation is a checkpoint: the best one must exist on disk
        rule = self.ctx.best_rule
        value = metrics.get(rule.metric)
        improved, fired = False, False
        if value is not None and self.ctx.spec.early_stopping is not None:
            previous = run.early_stopping or EarlyStoppingState()
            run.early_stopping = observe(rule, previous, Evaluated(step=step, value=value))
            improved = run.early_stopping.best_step == step and previous.best_step != step
            fired = run.early_stopping.triggered and not previous.triggered
        elif value is not None:
            improved = improves(rule, value, run.best.value if run.best else None)
        if self.ctx.spec.early_stopping is not None:
            fired = self._agree(args, step, fired)
        if fired:
            control.should_training_stop = True
        if improved and value is not None:
            run.best = BestResult(
                metric=rule.metric,
                value=value,
                step=step,
                epoch=epoch,
                checkpoint=self.ctx.best_checkpoint(step),
                majority_baseline=self.ctx.majority_baseline,
            )

    def _agree(self, args: TrainingArguments, step: int, fired: bool) -> bool:
        """Under DDP every rank stops at the same step: another rank's verdict becomes this one's.

        The metrics are gathered from all ranks, so verdicts differ only by accident; a rank left
        training alone would hang in its next all-reduce.
        """
        if not max_across_ranks(int(fired), args.device) or fired:
            return fired
        run = self.ctx.state
        run.early_stopping = (run.early_stopping or EarlyStoppingState()).model_copy(
            update={"triggered": True, "last_step": step}
        )
        self.ctx.log.emit("warning", message=f"early stopping fired on another rank at step {step}: stopping with it")
        return True


class CheckpointCallback(TrainerCallback):
    """Asks for saves: at evaluations (set by early stopping), every ``checkpointIntervalSteps``, and each epoch
    when nothing is evaluated. The trainer's save calls ``Checkpointer.save``."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        interval = self.ctx.spec.output.checkpoint_interval_steps
        if interval and state.global_step % interval == 0:
            control.should_save = True

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ctx.spec.evaluation.strategy == "no" and not self.ctx.spec.output.checkpoint_interval_steps:
            control.should_save = True


class Checkpointer:
    """Writes each checkpoint atomically (temp dir, our state and the marker last, one rename), once per step.

    Full state (optimizer, scheduler, RNG) goes into every checkpoint unless ``checkpointIntervalSteps`` is
    set; then only the interval, a stop and the end of training write it, and an evaluation in between
    writes the weights of a new best (or nothing: its record rides in the next checkpoint).
    Under DDP only the main process writes (the others' RNG state is not kept; resume warns and goes on).
    Sharded (FSDP), every rank writes its shards into the directory rank 0 chose; rank 0 waits for them all
    before it marks the checkpoint complete. On storage every node shares that is the whole checkpoint; with an
    ``s3://`` output each node's scratch holds its own ranks' shards, and every rank publishes its own files to
    the bucket, where rank 0's manifest completes the checkpoint (``finetune_trainer.s3.CheckpointMirror``).
    """

    def __init__(self, ctx: RunContext, write: Callable[[Path, bool], None], every_rank: bool = False) -> None:
        self.ctx = ctx
        self.write = write
        """Writes the Trainer's files into a directory; the flag asks for the full (resumable) state."""
        self.every_rank = every_rank
        """Each rank writes its part (sharded checkpoints); else the main process alone writes."""
        self.saved_step: int | None = None

    def kind(self, state: TrainerState, control: TrainerControl) -> str | None:
        interval = self.ctx.spec.output.checkpoint_interval_steps
        step = state.global_step
        ending = control.should_training_stop or self.ctx.stopped_by is not None or step >= state.max_steps
        if not interval or step % interval == 0 or ending:
            return FULL
        best = self.ctx.state.best
        return WEIGHTS if best is not None and best.step == step else None

    def save(self, state: TrainerState, control: TrainerControl) -> None:
        step = state.global_step
        kind = self.kind(state, control)
        if step == self.saved_step or kind is None or not (self.ctx.is_main or self.every_rank):
            return  # a stop saved this step, then the epoch ended on it: never write it twice
        self.saved_step = step
        if not self.ctx.is_main:  # a shard of a checkpoint rank 0 writes
            directory = Path(from_main(None))
            self.write(directory, kind == FULL)
            barrier()
            barrier()  # rank 0 has finished the checkpoint: renamed into place where storage is shared
            self.publish_shards(directory, step)
            return
        run = self.ctx.state
        with atomic_directory(self.ctx.checkpoint_dir(step)) as directory:
            token = directory.name
            if self.every_rank:
                from_main(str(directory))
            self.write(directory, kind == FULL)
            if self.every_rank:
                barrier()  # every rank's shards are in before the checkpoint is marked complete
            if run.early_stopping is not None:
                (directory / EARLY_STOPPING_FILE).write_text(
                    json.dumps(run.early_stopping.model_dump(mode="json", by_alias=True))
                )
            (directory / RUN_STATE_FILE).write_text(json.dumps(run.to_wire()))
            (directory / COMPLETE_MARKER).write_text(f"{step} {kind}\n")
        if self.every_rank:
            barrier()
        self.ctx.log.emit(
            "checkpoint", step=step, epoch=state.epoch, checkpoint=self.ctx.checkpoint_uri(step), kind=kind
        )
        mirror = self.ctx.mirror
        if mirror is not None:  # uploaded in the background, manifest last: training goes on
            only = sharding.files_of(0) if mirror.writers > 1 else None
            mirror.submit(
                self.ctx.checkpoint_dir(step), records=self.ctx.checkpoints_dir / OWNER_FILE, only=only, part=token
            )
        self.rotate()

    def publish_shards(self, written: Path, step: int) -> None:
        """A rank other than 0 (s3:// output): upload its own files of the checkpoint as its part. Where rank 0's
        directory is not on this node (``written``, its temporary name, never renamed here), from there, removed
        once uploaded; on shared storage from the finished checkpoint."""
        mirror = self.ctx.mirror
        if mirror is None:
            return
        final = self.ctx.checkpoint_dir(step)
        shared = final.exists()
        mirror.submit(
            final if shared else written,
            name=final.name,
            only=sharding.files_of(mirror.rank),
            part=written.name,
            discard=not shared,
        )

    def rotate(self) -> None:
        """Keep the newest ``keepCheckpoints`` full checkpoints and the best one; weights of a former best go."""
        keep = self.ctx.spec.output.keep_checkpoints
        best_step = self.ctx.state.best.step if self.ctx.state.best else None
        full = complete_checkpoints(self.ctx.checkpoints_dir, FULL)
        stale = full[:-keep] + complete_checkpoints(self.ctx.checkpoints_dir, WEIGHTS)
        for step, path in stale:
            if step != best_step:
                shutil.rmtree(path, ignore_errors=True)
        if self.ctx.mirror is not None:
            self.ctx.mirror.prune({path.name for _, path in complete_checkpoints(self.ctx.checkpoints_dir, None)})


class StopCallback(TrainerCallback):
    """SIGTERM or an operator stop request: checkpoint at the end of this step and leave the loop.

    Under DDP every rank must stop at the same step: the flag is max-reduced across ranks each step.
    """

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def _local_reason(self) -> str | None:
        if self.ctx.terminating:
            return "Terminated"
        reporter = self.ctx.reporter
        if reporter is not None and reporter.stop_request is not None:
            self.ctx.stop_message = reporter.stop_request.get("message", "")
            return "EarlyStopped" if reporter.stop_request.get("reason") == EARLY_STOPPED else "Stopped"
        return None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.ctx.stopped_by is not None:
            return
        codes = {None: 0, "Stopped": 1, "EarlyStopped": 2, "Terminated": 3}
        code = max_across_ranks(codes[self._local_reason()], args.device)
        reason = {v: k for k, v in codes.items()}[code]
        if reason is None:
            return
        self.ctx.stopped_by = reason
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False  # no evaluation inside the grace period
        self.ctx.log.emit("stopping", reason=reason, step=state.global_step, message=self.ctx.stop_message)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ctx.stopped_by is not None:
            control.should_evaluate = False  # no evaluation inside the grace period


class GradualUnfreezingCallback(TrainerCallback):
    """Thaws blocks top-down at the start of each scheduled epoch (the count is a pure function of the epoch)."""

    def __init__(self, ctx: RunContext, trainer: Any) -> None:
        self.ctx = ctx
        self.trainer = trainer

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epoch = math.floor(float(state.epoch or 0.0) + 1e-9) + 1
        names = self.trainer.thaw_for_epoch(epoch)
        if names:
            trainable, total = count_parameters(self.trainer.model)
            self.ctx.log.emit(
                "unfreeze",
                epoch=epoch,
                parameters=len(names),
                trainable=trainable,
                total=total,
                units=self.trainer.thawed,
            )


class ProgressCallback(TrainerCallback):
    """JSON lines always; status patches (throttled, urgent on evaluation and at the end) and gauges when enabled."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.start_time = time.monotonic()
        self.start_step = 0
        self.train_loss: float | None = None
        self.learning_rate: float | None = None
        self.batch = 1

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.start_time = time.monotonic()
        self.start_step = state.global_step
        self.batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)

    def progress(self, state: TrainerState) -> Progress:
        step, total = state.global_step, max(state.max_steps, 1)
        elapsed = max(time.monotonic() - self.start_time, 1e-9)
        done = step - self.start_step
        steps_per_second = done / elapsed if done > 0 else None
        eta = (total - step) / steps_per_second if steps_per_second else None
        return Progress(
            step=step,
            total_steps=state.max_steps,
            epoch=round(float(state.epoch or 0.0), 4),
            total_epochs=float(state.num_train_epochs),
            percent=round(100.0 * step / total, 2),
            eta_seconds=round(eta) if eta is not None else None,
            samples_per_second=round(steps_per_second * self.batch, 3) if steps_per_second else None,
            train_loss=self.train_loss,
            learning_rate=self.learning_rate,
            last_heartbeat_time=utc_now(),
        )

    def _publish(self, state: TrainerState, urgent: bool, with_evaluations: bool = False) -> Progress:
        progress = self.progress(state)
        if self.ctx.metrics is not None:
            self.ctx.metrics.update_progress(progress)
        if self.ctx.reporter is not None:
            status = history_status(self.ctx) if with_evaluations else TrainerStatus()
            status.progress = progress
            self.ctx.reporter.update(status, urgent=urgent)
        return progress

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.ctx.is_main:
            report_published_best(self.ctx)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        if not self.ctx.is_main or "loss" not in logs:
            return
        self.train_loss = float(logs["loss"])
        if "learning_rate" in logs:
            self.learning_rate = float(logs["learning_rate"])
        progress = self._publish(state, urgent=False)
        self.ctx.log.emit(
            "log",
            step=state.global_step,
            epoch=progress.epoch,
            loss=self.train_loss,
            learningRate=self.learning_rate,
            taskLoss=logs.get("task_loss"),
            l1Penalty=logs.get("l1_penalty"),
            gradNorm=logs.get("grad_norm"),
            samplesPerSecond=progress.samples_per_second,
            percent=progress.percent,
        )

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.ctx.is_main or not self.ctx.state.evaluations:
            return
        last = self.ctx.state.evaluations[-1]
        if self.ctx.metrics is not None:
            self.ctx.metrics.update_evaluation(last.metrics)
        self._publish(state, urgent=True, with_evaluations=True)
        es = self.ctx.state.early_stopping
        self.ctx.log.emit(
            "evaluation",
            step=last.step,
            epoch=last.epoch,
            metrics=last.metrics,
            trainLoss=last.train_loss,
            best=self.ctx.state.best.to_patch() if self.ctx.state.best else None,
            earlyStopping=es.model_dump(mode="json", by_alias=True) if es else None,
        )
        if es is not None and es.triggered and state.global_step == es.last_step:
            assert self.ctx.spec.early_stopping is not None
            self.ctx.log.emit(
                "early_stopping", step=state.global_step, message=explain(self.ctx.spec.early_stopping, es)
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ctx.is_main:
            self._publish(state, urgent=True, with_evaluations=bool(self.ctx.state.evaluations))
