"""One training run: load, freeze, train (resuming if possible), restore the best, save, report."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import datasets
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedModel, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from finetune_trainer import data as data_mod
from finetune_trainer import exitcodes, qlora, sharding, tracking
from finetune_trainer.accelerator import require_accelerator, require_cuda_for_quantization
from finetune_trainer.activation_cache import CACHE_DIR as ACTIVATION_CACHE_DIR
from finetune_trainer.activation_cache import FixedShardSampler, memory_budget
from finetune_trainer.activation_cache import install as install_activation_cache
from finetune_trainer.atomic import atomic_file, remove_leftovers
from finetune_trainer.baseline import validation_baseline
from finetune_trainer.callbacks import (
    FULL,
    CheckpointCallback,
    EarlyStoppingCallback,
    GradualUnfreezingCallback,
    ProgressCallback,
    RunContext,
    StopCallback,
    complete_checkpoints,
    history_status,
    load_run_state,
    partial_checkpoints,
    report_published_best,
)
from finetune_trainer.checkpointing import enable_activation_checkpointing
from finetune_trainer.config import RuntimeEnv, local_path, location_uri
from finetune_trainer.contract import (
    GPU_MEMORY_ENV,
    Artifact,
    ArtifactKind,
    BaseModelLineage,
    MemoryPlan,
    Progress,
    TrainerStatus,
)
from finetune_trainer.distributed import same_on_every_rank
from finetune_trainer.divergence import DivergenceCallback
from finetune_trainer.errors import ConfigError
from finetune_trainer.export import (
    ADAPTER_DIR,
    MODEL_DIR,
    base_revision,
    export_dtype,
    merged,
    save_adapter,
    save_model,
)
from finetune_trainer.freeze import FreezePlan, apply_freeze, layer_map
from finetune_trainer.loss_watch import chance_loss
from finetune_trainer.memory_plan import Gpus, Plan, check_fits
from finetune_trainer.memory_plan import plan as plan_memory
from finetune_trainer.metrics import classification_metrics, probabilities
from finetune_trainer.models import (
    ModelSource,
    align_pad_token,
    load_config,
    load_model,
    load_processor,
    resolve_source,
)
from finetune_trainer.ownership import claim_checkpoints
from finetune_trainer.preflight import Checked, preflight
from finetune_trainer.reporting import (
    JsonLines,
    PrometheusMetrics,
    StatusReporter,
    heartbeats,
    load_kube_api,
    start_reporter,
)
from finetune_trainer.s3 import CheckpointMirror, is_s3, publish, upload_file
from finetune_trainer.spec import CLASSIFICATION_METRICS, CLASSIFICATION_TASKS, TrainingSpec, export_plan
from finetune_trainer.speed import (
    Device,
    Precision,
    available_cpus,
    base_dtype,
    data_loading,
    detect_device,
    pad_for_tensor_cores,
    resolve_precision,
    upcast_trainable,
    use_tf32,
)
from finetune_trainer.trainer import FineTuneTrainer

SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "cosine-with-restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
    "constant": "constant",
    "constant-with-warmup": "constant_with_warmup",
}


@dataclass
class RunResult:
    """What ``result.json`` says, plus the process exit code."""

    exit_code: int
    reason: str
    final_step: int
    best: dict[str, Any] | None
    metrics: dict[str, float]


def training_arguments(
    spec: TrainingSpec, checkpoints_dir: Path, log_every: int, device: Device, precision: Precision
) -> TrainingArguments:
    """The spec's hyperparameters, evaluation and precision as TrainingArguments (saving is ours: see callbacks)."""
    hp = spec.hyperparameters
    loading = data_loading(available_cpus(), device)
    warmup: float = hp.warmup_steps if hp.warmup_steps is not None else (hp.warmup_ratio or 0)
    evaluation = spec.evaluation
    classify = bool(set(CLASSIFICATION_METRICS) & set(evaluation.metrics))
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        learning_rate=hp.learning_rate,
        lr_scheduler_type=SCHEDULERS[hp.scheduler],
        warmup_steps=warmup,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.eval_batch_size or hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        weight_decay=hp.weight_decay,
        label_smoothing_factor=hp.label_smoothing,
        max_grad_norm=hp.max_grad_norm or 0.0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        tf32=True if use_tf32(precision, device) else None,
        torch_compile=hp.compile,
        use_cpu=not device.cuda,
        activation_checkpointing=False,  # enabled by run() itself: see checkpointing.py
        seed=hp.seed,
        data_seed=hp.seed,
        eval_strategy=evaluation.strategy,
        eval_steps=evaluation.interval,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=log_every,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the logged mean stays true (DivergenceCallback stops on a NaN step first)
        prediction_loss_only=not classify,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=loading.workers,
        dataloader_pin_memory=loading.pin_memory,
        dataloader_persistent_workers=loading.persistent_workers,
        train_sampling_strategy="group_by_length"
        if device.cuda and spec.model.task != "image-classification"
        else "random",
    )


def check_precision(precision: str) -> None:
    """bf16 needs a GPU that has it (or the CPU); checked before minutes go into loading the model."""
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise ConfigError(f"hyperparameters.precision: bf16 is not supported by {name}; use fp16 or fp32")


def load_weights(model: Any, directory: Path) -> None:
    """Put the weights a checkpoint holds into ``model`` (a LoRA model: its adapters), with public APIs only."""
    if sharding.is_sharded(model):  # every rank reads its shards
        sharding.load(directory, model, None)
        return
    if isinstance(model, PeftModel):
        model.load_adapter(str(directory), adapter_name=model.active_adapter, is_trainable=True)
        return
    device = str(next(model.parameters()).device)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model*.safetensors")):  # model.safetensors, or model-0000i-of-0000n
        state.update(load_file(str(shard), device=device))
    if not state:
        raise FileNotFoundError(f"no model*.safetensors in {directory}")
    result = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[name].data_ptr() for name in state if name in own}
    missing = [name for name in result.missing_keys if own[name].data_ptr() not in loaded]  # tied: saved once
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"{directory.name} does not match the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def _install_sigterm(ctx: RunContext) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        ctx.terminating = True  # only a flag: logging here could deadlock on a lock the interrupted code holds

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use): the caller handles signals
        return None


def _final_metrics(ctx: RunContext, trainer: FineTuneTrainer, restored: bool, has_eval: bool) -> dict[str, float]:
    run = ctx.state
    if restored and run.best is not None:
        match = [e for e in run.evaluations if e.step == run.best.step]
        if match:
            return match[-1].metrics
    if run.evaluations and run.evaluations[-1].step == trainer.state.global_step:
        return run.evaluations[-1].metrics
    if has_eval and ctx.spec.evaluation.strategy != "no" and ctx.stopped_by is None:  # no evaluation in a grace period
        trainer.evaluate()
        if run.evaluations:
            return run.evaluations[-1].metrics
    return {}


def final_model(trainer: FineTuneTrainer) -> Any:
    """The model to save: the trained one, or (sharded) one plain model gathered on rank 0 (None elsewhere)."""
    model: Any = trainer.model
    if not trainer.sharded:
        return model
    state = sharding.full_state_dict(model)  # every rank sends its shards
    return sharding.unsharded(model, state) if state is not None else None


def _save_final(ctx: RunContext, trainer: FineTuneTrainer, loaded: Loaded, precision: Precision) -> list[Artifact]:
    """Publish the final model as ``output.export`` asks (rank 0): each directory whole or absent, its manifest
    last, listed with its identity and lineage (the base's revision, the data's fingerprint)."""
    model: Any = final_model(trainer)  # sharded: every rank sends its shards to rank 0
    if not ctx.is_main or model is None:
        return []
    formats, requested = export_plan(ctx.spec)
    dtype = export_dtype(requested, precision)
    lora = isinstance(model, PeftModel)
    published = []
    if lora and "adapter" in formats:  # before the merge, which folds the adapters into the base in place
        published.append(save_adapter(model, loaded.processor, ctx.output_dir / ADAPTER_DIR, dtype))
    if "merged" in formats:
        plain = qlora.merged(model) if getattr(model, "is_loaded_in_4bit", False) else merged(model, dtype)
        kind: ArtifactKind = "merged" if lora else "model"
        published.append(save_model(plain, loaded.processor, ctx.output_dir / MODEL_DIR, kind, dtype))
    base = BaseModelLineage(
        source=ctx.spec.model.written_source, revision=base_revision(loaded.source.name_or_path, loaded.commit)
    )
    artifacts = []
    for item in published:
        uri = location_uri(item.path, ctx.spec.output.location, ctx.pvc_root)
        if is_s3(uri):  # every file uploaded, then the manifest: a cut upload leaves nothing that looks complete
            uri = publish(item.path, uri, ctx.spec.output.s3 or ctx.spec.storage.s3, manifest=item.manifest)
        artifacts.append(
            Artifact(
                uri=uri,
                kind=item.kind,
                size_bytes=item.manifest.total_size,
                sha256=item.manifest.sha256,
                dtype=item.dtype,
                base_model=base,
                dataset_fingerprint=loaded.prepared.fingerprint,
            )
        )
    return artifacts


def _start_reporter(env: RuntimeEnv, log: JsonLines) -> StatusReporter | None:
    return start_reporter(env, log, load_kube_api)  # this module's name: tests replace it


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its rank among ``ranks``, the device and the precision it resolved to."""

    rank: int
    ranks: int
    device: Device
    precision: Precision

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Loaded:
    """The model, its processor and the encoded data (the model's unused input columns dropped)."""

    model: PreTrainedModel
    processor: Any
    prepared: data_mod.PreparedData
    source: ModelSource
    commit: str | None
    """The Hub commit the weights were read at (None for a directory)."""
    memory: Plan
    """The memory plan: per-GPU estimates and the strategy ``distributed.strategy`` resolves to."""


@dataclass
class Frozen:
    """The model as it trains (wrapped for LoRA), what the freeze policy trains, and the activation cache."""

    model: Any
    plan: FreezePlan
    layers: Any
    activation_cache: Any
    prepared: data_mod.PreparedData
    """The data the trainer reads: replaced by the activation cache's, when it caches."""


def run(spec: TrainingSpec, env: RuntimeEnv, log: JsonLines | None = None, checked: Checked | None = None) -> RunResult:
    """Train per ``spec``; raises TrainerError subclasses for bad input (the CLI maps them to exit codes).

    ``checked``: what `preflight` read and checked (the CLI runs it before importing torch); run here if not given.
    """
    checked = checked if checked is not None else preflight(spec, env)
    log = log or JsonLines()
    output_dir = local_path(spec.output.location, env.pvc_root)
    where = _placement(spec, log)
    reporter = _start_reporter(env, log) if where.is_main else None
    tracker = tracking.start(spec, env, reporter, log) if where.is_main else None
    try:
        loaded = _load(spec, env, log, checked, reporter, where)
        has_eval = loaded.prepared.validation is not None
        spec = _without_validation(spec, has_eval, log)
        frozen = _freeze(spec, env, log, loaded, output_dir, where)
        tracking.log_freeze(tracker, frozen.plan.trainable, frozen.plan.total)
        ctx = _context(spec, env, log, loaded.model, frozen.prepared, output_dir, reporter, where)
        resume = _find_resume(ctx, env)
        trainer = _trainer(ctx, env, frozen, loaded.processor, resume, where, loaded.memory.strategy)
        if tracker is not None:
            trainer.add_callback(tracking.TrackingCallback(tracker, lambda: ctx.state.evaluations))
        train_loss = _train(ctx, trainer, resume, frozen.prepared)
        return _finish(ctx, trainer, loaded, where.precision, train_loss, has_eval, tracker)
    except BaseException as error:
        reason = getattr(error, "reason", type(error).__name__)
        tracking.finish(tracker, reporter, str(reason), None, None, {}, failed=True, wait=TRACKING_FAILURE_WAIT)
        raise


TRACKING_FAILURE_WAIT = 15.0
"""How long a failing trainer waits for MLflow to take its outcome (a retry or a resume logs on regardless)."""


def _lineage(spec: TrainingSpec, artifacts: list[Artifact]) -> dict[str, str]:
    """Tags of a registered model version: the base model and its revision, the training data's fingerprint
    (as ``status.artifacts`` records them)."""
    if spec.tracking is None or spec.tracking.register_as is None or not artifacts:
        return {}
    first = artifacts[0]
    lineage = {"base.model": spec.model.written_source, "dataset.source": spec.dataset.written_source}
    if first.base_model is not None and first.base_model.revision is not None:
        lineage["base.revision"] = first.base_model.revision
    if first.dataset_fingerprint is not None:
        lineage["dataset.fingerprint"] = first.dataset_fingerprint
    return lineage


def _placement(spec: TrainingSpec, log: JsonLines) -> Placement:
    """Rank, device and precision; a GPU pod without CUDA or bf16 without support fails before anything loads."""
    require_accelerator(os.environ, torch.cuda.is_available())
    lora = spec.freeze.lora
    require_cuda_for_quantization(lora.quantization if lora is not None else None, torch.cuda.is_available())
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    hp = spec.hyperparameters
    rank = int(os.environ.get("RANK", "0"))
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    check_precision(hp.precision)
    set_seed(hp.seed)
    device = detect_device()
    precision, precision_warning = resolve_precision(hp.precision, device)
    if precision_warning:
        log.emit("warning", message=precision_warning)
    return Placement(rank, ranks, device, precision)


def _load(
    spec: TrainingSpec,
    env: RuntimeEnv,
    log: JsonLines,
    checked: Checked,
    reporter: StatusReporter | None,
    where: Placement,
) -> Loaded:
    """The processor, the encoded data, then the weights (heartbeats meanwhile: downloads and tokenizing are long)."""
    hp = spec.hyperparameters
    with heartbeats(reporter):  # downloads and tokenizing can outlast the stall timeout
        source = resolve_source(spec.model, env)
        config = load_config(spec.model, source, hp.dropout)
        memory = _memory_plan(spec, env, config.to_dict(), where, reporter)  # no weights loaded when it fails
        processor = load_processor(spec.model, source)
        # The data (read and checked by preflight) is encoded before the weights load: minutes sooner on errors.
        prepared = data_mod.prepare(spec, env, processor, config, checked)
        if prepared.cached_splits:
            log.emit("tokenized_cache", reused=list(prepared.cached_splits))
        model: PreTrainedModel = load_model(
            spec.model,
            source,
            hp.dropout,
            base_dtype(spec.freeze.strategy, where.precision),
            qlora.load_kwargs(spec.freeze, where.device.cuda),
        )
    align_pad_token(model, processor)
    commit = getattr(model.config, "_commit_hash", None)
    return Loaded(model, processor, data_mod.drop_unused_inputs(prepared, model), source, commit, memory)


def _memory_plan(
    spec: TrainingSpec, env: RuntimeEnv, config: dict[str, Any], where: Placement, reporter: StatusReporter | None
) -> Plan:
    """The memory plan for this world size and GPU (the device's own memory on CUDA, else the operator's hint);
    InvalidConfig with the numbers when the GPU memory is known and no strategy fits."""
    gpu_memory = (
        torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if where.device.cuda else None
    )
    memory = gpu_memory or env.gpu_memory
    source = "the GPU" if gpu_memory else (GPU_MEMORY_ENV if memory else "unknown GPU memory")
    found = plan_memory(spec, config, Gpus(where.ranks, memory, source), where.precision)
    check_fits(found)
    if reporter is not None:
        reporter.update(TrainerStatus(memory_plan=MemoryPlan.model_validate(found.summary())))
    return found


def _without_validation(spec: TrainingSpec, has_eval: bool, log: JsonLines) -> TrainingSpec:
    """No validation data: evaluation is off (preflight refused earlyStopping without validation)."""
    if has_eval or spec.evaluation.strategy == "no":
        return spec
    log.emit("warning", message="no validation data: evaluation disabled")
    return spec.model_copy(
        update={"evaluation": spec.evaluation.model_copy(update={"strategy": "no", "interval": None})}
    )


def _freeze(
    spec: TrainingSpec, env: RuntimeEnv, log: JsonLines, loaded: Loaded, output_dir: Path, where: Placement
) -> Frozen:
    """Apply the freeze policy (and activation checkpointing, the activation cache); report what trains."""
    hp = spec.hyperparameters
    model, prepared, rank, ranks = loaded.model, loaded.prepared, where.rank, where.ranks
    wrapped, plan = apply_freeze(qlora.prepare(model, spec.freeze), spec.freeze, spec.model.task)
    if plan.trainable == 0:
        raise ConfigError(
            f"freeze: strategy {spec.freeze.strategy} leaves no trainable parameter "
            f"(0 of {plan.total}; tied embeddings are frozen with the embeddings): train more of the model"
        )
    upcast_trainable(wrapped)
    if hp.gradient_checkpointing:
        enable_activation_checkpointing(wrapped)
    layers = layer_map(wrapped) if hp.layerwise_lr_decay is not None else None
    activation_cache, cache_report = None, None
    if spec.freeze.cache_activations:
        hidden = getattr(model.config.get_text_config(), "hidden_size", None)
        spill = output_dir / ACTIVATION_CACHE_DIR / f"rank-{rank}"
        activation_cache, prepared, cache_report = install_activation_cache(
            wrapped,
            prepared,
            hidden,
            lambda message: log.emit("warning", message=message),
            memory_budget(),
            spill=spill,
            identity=spec.model.model_dump_json(),
            ranks=ranks,
        )
        if cache_report.get("storage") == "disk":
            cache_report["location"] = location_uri(spill, spec.output.location, env.pvc_root)
        if activation_cache is None:
            log.emit("warning", message=f"freeze.cacheActivations: not caching: {cache_report['reason']}")
        elif ranks > 1:  # FineTuneTrainer deals each rank a fixed shard
            shard = FixedShardSampler(len(prepared.train), rank, ranks, hp.seed)
            cache_report["rankShard"] = {"rank": rank, "ranks": ranks, "trainExamples": len(shard)}
    log.emit(
        "freeze",
        **({"activationCache": cache_report} if cache_report is not None else {}),
        strategy=spec.freeze.strategy,
        trainable=plan.trainable,
        total=plan.total,
        percent=round(plan.percent, 3),
        thawUnits=len(plan.thaw_units),
        untiedEmbeddings=plan.untied,
        memoryPlan=loaded.memory.summary(),
    )
    return Frozen(wrapped, plan, layers, activation_cache, prepared)


def _context(
    spec: TrainingSpec,
    env: RuntimeEnv,
    log: JsonLines,
    model: PreTrainedModel,
    prepared: data_mod.PreparedData,
    output_dir: Path,
    reporter: StatusReporter | None,
    where: Placement,
) -> RunContext:
    """What the callbacks share: the spec, the locations, the reporter, /metrics, the majority baseline and
    the loss of a chance predictor (the divergence rule's floor)."""
    ctx = RunContext(spec, output_dir, output_dir / "checkpoints", env.pvc_root, log, is_main=where.is_main)
    if spec.model.task in CLASSIFICATION_TASKS:
        ctx.majority_baseline = validation_baseline(prepared.validation)
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    ctx.chance_loss = chance_loss(spec.model.task, spec.model.effective_num_labels, vocab)
    ctx.reporter = reporter
    if where.is_main:
        ctx.metrics = PrometheusMetrics(env.metrics_port, log, env.metrics_address)
        if is_s3(spec.output.location):
            ctx.mirror = _checkpoint_mirror(spec, log)
            ctx.mirror.uploaded.extend(ctx.mirror.published_names())  # a resumed best may name one of these
    return ctx


def _find_resume(ctx: RunContext, env: RuntimeEnv) -> Path | None:
    """The latest complete checkpoint of this job (its run state loaded into ``ctx``), after cleaning up
    another job's checkpoints, partial checkpoints and an interrupted final save (rank 0 only)."""
    spec, log, is_main, output_dir, checkpoints_dir = (
        ctx.spec,
        ctx.log,
        ctx.is_main,
        ctx.output_dir,
        ctx.checkpoints_dir,
    )
    resume: Path | None = None
    foreign = claim_checkpoints(checkpoints_dir, env.job_uid, remove=is_main)
    if is_main:
        remove_leftovers(output_dir)  # an interrupted final save
        if foreign:
            log.emit(
                "warning",
                message=f"output.location {spec.output.location} held another FineTuneJob's checkpoints: removed "
                "them and starting fresh (its final model stays until this job's replaces it)",
            )
    if is_main:
        for partial in partial_checkpoints(checkpoints_dir) + remove_leftovers(checkpoints_dir):
            shutil.rmtree(partial, ignore_errors=True)
            log.emit("warning", message=f"removed partial checkpoint {partial.name}")
    complete = [] if foreign else complete_checkpoints(checkpoints_dir, FULL)
    if complete:
        resume = complete[-1][1]
        ctx.state = load_run_state(resume)
    return resume


def _trainer(
    ctx: RunContext,
    env: RuntimeEnv,
    frozen: Frozen,
    processor: Any,
    resume: Path | None,
    where: Placement,
    chosen: sharding.Strategy,
) -> FineTuneTrainer:
    """The Trainer with our callbacks (every rank checked to resume from the same step); ``chosen``: the strategy
    the memory plan resolved ``distributed.strategy`` to."""
    spec, log, prepared = ctx.spec, ctx.log, frozen.prepared
    compute_metrics = classification_metrics(spec.evaluation.metrics, spec.model.effective_num_labels or 0)
    args = training_arguments(spec, ctx.checkpoints_dir, env.log_every_steps, where.device, where.precision)
    strategy = _shard(ctx, frozen.model, where, chosen)  # after the arguments: they start the process group
    if resume is not None:
        sharding.check_resumable(resume, strategy, where.ranks)
    trainer = FineTuneTrainer(
        model=frozen.model,
        args=args,
        data_collator=pad_for_tensor_cores(prepared.collator, where.device),
        train_dataset=prepared.train,
        eval_dataset=prepared.validation,
        processing_class=processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=probabilities if compute_metrics is not None else None,
        spec=spec,
        layers=frozen.layers,
        plan=frozen.plan,
        run=ctx,
        activation_cache=frozen.activation_cache,
        thaw_on_create=ctx.state.thawed_units,
    )
    _check_same_checkpoint(resume, where.rank, trainer.args.device)
    if trainer.checkpointer is not None:
        trainer.checkpointer.every_rank = strategy == "fsdp"  # sharded: each rank writes its shards
        if strategy == "fsdp" and is_s3(spec.output.location):  # ... and publishes them to the bucket
            _mirror_shards(ctx, where)
    trainer.remove_callback(PrinterCallback)  # our JSON lines replace its prints
    for callback in (
        DivergenceCallback(ctx, trainer.take_step_loss),  # first: stops before anything is published or saved
        EarlyStoppingCallback(ctx),
        CheckpointCallback(ctx),
        StopCallback(ctx),
        GradualUnfreezingCallback(ctx, trainer),
        ProgressCallback(ctx),
    ):
        trainer.add_callback(callback)
    if resume is not None:
        es = ctx.state.early_stopping
        log.emit(
            "resume",
            checkpoint=location_uri(resume, spec.output.location, env.pvc_root),
            step=int(resume.name.removeprefix("checkpoint-")),
            earlyStopping=es.model_dump(mode="json", by_alias=True) if es else None,
            thawedUnits=ctx.state.thawed_units,
        )
    return trainer


def _checkpoint_mirror(spec: TrainingSpec, log: JsonLines) -> CheckpointMirror:
    """The uploader of an s3:// output's checkpoints, with the output's own storage settings or the job's."""
    return CheckpointMirror(spec.output.location, spec.output.s3 or spec.storage.s3, log.emit)


def _mirror_shards(ctx: RunContext, where: Placement) -> None:
    """Sharded checkpoints to an s3:// output: every rank uploads its own files (each node's scratch holds only
    its ranks' shards) and rank 0 merges their parts into the manifest. Every rank rather than one per node: a rank
    knows its own files by name, wherever the others run, and uploads them in parallel with the others."""
    if ctx.mirror is None:
        ctx.mirror = _checkpoint_mirror(ctx.spec, ctx.log)
    ctx.mirror.rank = where.rank
    ctx.mirror.writers = where.ranks


def _shard(ctx: RunContext, model: Any, where: Placement, strategy: sharding.Strategy) -> sharding.Strategy:
    """The strategy trained with; fsdp shards ``model`` across the ranks (one process: nothing to shard)."""
    if strategy != "fsdp":
        return strategy
    if not torch.distributed.is_initialized():
        ctx.log.emit("warning", message="distributed.strategy: fsdp in a single process: the model is not sharded")
        return "ddp"
    if where.precision == "fp16":
        raise ConfigError(
            "hyperparameters.precision: fp16 with distributed.strategy fsdp is not supported (its loss scaling "
            "does not cover sharded gradients); use bf16 or fp32"
        )
    compute = torch.bfloat16 if where.device.cuda and where.precision == "bf16" else None
    blocks = sharding.shard(model, compute)
    ctx.log.emit(
        "sharding",
        strategy="fsdp",
        ranks=where.ranks,
        blocks=blocks,
        mixedPrecision=str(compute).removeprefix("torch.") if compute is not None else None,
    )
    return strategy


def _train(
    ctx: RunContext, trainer: FineTuneTrainer, resume: Path | None, prepared: data_mod.PreparedData
) -> float | None:
    """Train (from ``resume``) with SIGTERM turned into a flag; the training loss, None when nothing trained."""
    log = ctx.log
    previous_handler = _install_sigterm(ctx)
    train_loss: float | None = None
    try:
        if resume is not None and ctx.state.early_stopping is not None and ctx.state.early_stopping.triggered:
            # Early stopping had already fired (e.g. the pod died while saving the final model): finish only.
            load_weights(trainer.model, resume)
            trainer.state.global_step = int(resume.name.removeprefix("checkpoint-"))
            _publish_history(ctx)
        else:
            log.emit("train_begin", trainSamples=len(prepared.train), validationSamples=len(prepared.validation or []))
            train_loss = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None).training_loss
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return train_loss


def _finish(
    ctx: RunContext,
    trainer: FineTuneTrainer,
    loaded: Loaded,
    precision: Precision,
    train_loss: float | None,
    has_eval: bool,
    tracker: tracking.Tracker | None = None,
) -> RunResult:
    """Terminated: report the checkpoint. Otherwise restore the best, save the model, write ``result.json``."""
    spec, log, is_main, output_dir = ctx.spec, ctx.log, ctx.is_main, ctx.output_dir
    final_step = trainer.state.global_step
    if ctx.mirror is not None:
        ctx.mirror.drain()  # the last checkpoint (a stop's included) is published before the run ends
        report_published_best(ctx)
    if ctx.stopped_by == "Terminated":
        tracking.finish(tracker, ctx.reporter, "Terminated", _best(ctx), None, {}, wait=TRACKING_FAILURE_WAIT)
        _close(ctx)
        log.emit(
            "terminated", step=final_step, checkpoint=ctx.checkpoint_uri(final_step), exitCode=exitcodes.TERMINATED.code
        )
        return RunResult(exitcodes.TERMINATED.code, exitcodes.TERMINATED.reason, final_step, _best(ctx), {})

    es_state = ctx.state.early_stopping
    if ctx.stopped_by is not None:
        reason = ctx.stopped_by
    elif es_state is not None and es_state.triggered:
        reason = "EarlyStopped"
    else:
        reason = "Succeeded"

    _report_finalizing(ctx, True)
    restored = False
    rule = spec.early_stopping
    best = ctx.state.best
    if rule is not None and rule.restore_best and best is not None and best.step != final_step:
        best_dir = ctx.checkpoint_dir(best.step)
        if best_dir.is_dir():
            load_weights(trainer.model, best_dir)
            restored = True
            log.emit("restore_best", step=best.step, metric=best.metric, value=best.value, checkpoint=best.checkpoint)
    metrics = _final_metrics(ctx, trainer, restored, has_eval)
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    artifacts = _save_final(ctx, trainer, loaded, precision) if spec.output.save_final_model else []
    model_uri = next((a.uri for a in artifacts if a.kind != "adapter"), None)
    if artifacts and ctx.reporter is not None:
        ctx.reporter.update(TrainerStatus(artifacts=artifacts), urgent=True)

    result = RunResult(exitcodes.OK.code, reason, final_step, _best(ctx), metrics)
    if is_main:
        body = {
            "reason": reason,
            "best": result.best,
            "finalStep": final_step,
            "metrics": metrics,
            "trainLoss": train_loss,
            "model": model_uri,
            "artifacts": [artifact.to_wire() for artifact in artifacts],
            "restoredBest": restored,
            "message": ctx.stop_message or None,
        }
        atomic_file(output_dir / "result.json", (json.dumps(body, indent=2) + "\n").encode())
        if ctx.mirror is not None:
            upload_file(
                output_dir / "result.json", f"{spec.output.location.rstrip('/')}/result.json", ctx.mirror.settings
            )
        log.emit("result", **body)
    _report_finalizing(ctx, False)
    lineage = _lineage(spec, artifacts)
    tracking.finish(tracker, ctx.reporter, reason, result.best, model_uri, lineage, ctx.state.evaluations)
    _close(ctx)
    return result


def _check_same_checkpoint(resume: Path | None, rank: int, device: torch.device) -> None:
    """Every rank must resume from the same step: ranks that see different checkpoints would train
    different numbers of steps and hang (or crash) in an all-reduce. Only rank 0 writes checkpoints,
    so they differ when the output location is not storage that every node shares."""
    step = int(resume.name.removeprefix("checkpoint-")) if resume is not None else 0
    if not same_on_every_rank(step, device):
        raise ConfigError(
            f"output.location: the ranks see different checkpoints (rank {rank} would resume from step {step}): "
            "a multi-node job needs an output location that every node shares (a ReadWriteMany pvc://, or s3://)"
        )


def _report_finalizing(ctx: RunContext, finalizing: bool) -> None:
    """Tell the operator the final save (restore best, write the model) is under way, so that a stop
    request does not cut it short; cleared (merge-patch null) once the result is written."""
    if ctx.reporter is not None:
        ctx.reporter.update(TrainerStatus(progress=Progress(finalizing=True if finalizing else None)), urgent=True)


def _publish_history(ctx: RunContext) -> None:
    """The finish-only path trains no step, so no callback reports: send the evaluations and the best
    result it resumed with, which the operator's early-stopping verdict (and the reason) is read from."""
    if ctx.reporter is not None:
        ctx.reporter.update(history_status(ctx), urgent=True)


def _best(ctx: RunContext) -> dict[str, Any] | None:
    return ctx.state.best.to_patch() if ctx.state.best is not None else None


def _close(ctx: RunContext) -> None:
    if ctx.mirror is not None:
        ctx.mirror.close()
    if ctx.reporter is not None:
        ctx.reporter.close()
