"""The transformers Trainer with what it lacks: our optimizer groups, the L1 penalty, perplexity, thawing."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any

import torch
from accelerate.data_loader import BatchSamplerShard
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME

from finetune_trainer import sharding
from finetune_trainer.activation_cache import EXAMPLE_INDEX, ActivationCache, FixedShardSampler
from finetune_trainer.callbacks import Checkpointer, RunContext
from finetune_trainer.distributed import average_gradients
from finetune_trainer.freeze import FreezePlan, LayerMap, thawed_units
from finetune_trainer.optim import l1_norm, param_groups
from finetune_trainer.spec import TrainingSpec


class FineTuneTrainer(Trainer):
    """Only trainable parameters reach the optimizer; thawed ones join later as new parameter groups."""

    def __init__(
        self,
        *args: Any,
        spec: TrainingSpec,
        layers: LayerMap | None,
        plan: FreezePlan,
        run: RunContext | None = None,
        activation_cache: ActivationCache | None = None,
        thaw_on_create: int = 0,
        **kwargs: Any,
    ) -> None:
        """``run`` routes checkpoint saves through our atomic Checkpointer (without it: the Trainer's own);
        ``thaw_on_create`` units are thawed while building the optimizer (those thawed when the resumed
        checkpoint was saved)."""
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.layers = layers
        self.plan = plan
        self.thawed = 0
        self.thaw_on_create = thaw_on_create
        self.want_perplexity = "perplexity" in spec.evaluation.metrics
        self._l1_logged: torch.Tensor | None = None
        """The L1 term's share of the logged training loss since the last log (summed on the device: no sync)."""
        self._l1_logged_step = 0
        """The step the sum started after."""
        self._decay_names: set[str] | None = None
        self.checkpointer = Checkpointer(run, self.write_checkpoint) if run is not None else None
        self._eval_nll: tuple[torch.Tensor, torch.Tensor] | None = None
        self.activation_cache = activation_cache
        self.fixed_shard: FixedShardSampler | None = None
        """This rank's training examples when it caches activations among several ranks (see _get_train_sampler)."""
        self._step_loss: torch.Tensor | None = None
        """This optimizer step's loss so far (summed over its micro-batches on the device: no sync)."""
        self.unsynced: list[nn.Parameter] = []
        """Parameters thawed after DDP wrapped the model: DDP does not reduce their gradients; training_step does."""

    def _get_train_sampler(self, train_dataset: Dataset[Any] | None = None) -> Sampler[Any] | None:
        """Under several ranks with the activation cache, each rank trains (and caches) a fixed shard."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        cache = self.activation_cache
        if cache is None or not cache.active or self.args.world_size <= 1 or not isinstance(dataset, Sized):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        self.fixed_shard = FixedShardSampler(len(dataset), self.args.process_index, self.args.world_size, seed)
        return self.fixed_shard

    def get_train_dataloader(self) -> DataLoader[Any]:
        """A fixed shard is this rank's already: accelerate must not deal its batches out to the ranks again."""
        self.fixed_shard = None
        loader = super().get_train_dataloader()
        if self.fixed_shard is not None:
            dealer = getattr(loader, "batch_sampler", None)
            if not isinstance(dealer, BatchSamplerShard) or getattr(dealer.batch_sampler, "sampler", None) is not (
                self.fixed_shard
            ):
                raise RuntimeError(f"cannot train fixed shards: accelerate prepared {type(dealer).__name__}")
            dealer.num_processes, dealer.process_index = 1, 0
        return loader

    def _run_epoch(self, model: nn.Module, epoch: int, *args: Any, **kwargs: Any) -> Any:
        """The shard's order for ``epoch`` also on a resume mid-epoch (accelerate's skipping loader hides the sampler
        from its ``set_epoch``)."""
        if self.fixed_shard is not None:
            self.fixed_shard.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)  # type: ignore[no-untyped-call]

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Saves go through the Checkpointer (atomic, once per step, full or weights-only), never in place."""
        if self.activation_cache is not None:  # on every rank (only the main one writes checkpoints): a resume
            self.activation_cache.persist()  # finds what each rank had cached so far
        if self.checkpointer is None:
            super()._save_checkpoint(model, trial)
        else:
            self.store_flos()
            self.checkpointer.save(self.state, self.control)

    @property
    def sharded(self) -> bool:
        """The model is sharded with FSDP2 (``distributed.strategy: fsdp``): every rank takes part in saves."""
        return self.model is not None and sharding.is_sharded(self.model)

    def write_checkpoint(self, directory: Path, full: bool) -> None:
        """The Trainer's own files, as its ``_save_checkpoint`` writes them; the optimizer etc. only if ``full``.

        Sharded: every rank writes its shards (a torch distributed checkpoint) and its RNG state."""
        if self.sharded:
            optimizer = self._bare_optimizer() if full else None
            sharding.save(directory, self._model(), optimizer)
            if full:
                self._save_rng_state(str(directory))
            if self.args.should_save:
                if full and self.lr_scheduler is not None:
                    torch.save(self.lr_scheduler.state_dict(), directory / SCHEDULER_NAME)
                self.state.save_to_json(str(directory / TRAINER_STATE_NAME))
            return
        self.save_model(str(directory), _internal_call=True)
        if full:
            self._save_optimizer_and_scheduler(str(directory))
            self._save_scaler(str(directory))
            self._save_rng_state(str(directory))
        self.state.save_to_json(str(directory / TRAINER_STATE_NAME))

    def _bare_optimizer(self) -> torch.optim.Optimizer:
        optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)
        if optimizer is None:
            raise RuntimeError("the trainer has no optimizer")
        bare: torch.optim.Optimizer = optimizer
        return bare

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Sharded: the weights come back with the optimizer state (``_load_optimizer_and_scheduler``)."""
        if not self.sharded:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Sharded: this rank's shards of the weights and the optimizer state, then the scheduler."""
        if not self.sharded or checkpoint is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        sharding.load(Path(checkpoint), self._model(), self._bare_optimizer())
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self) -> Iterator[None]:
        """Gradient accumulation on our sharded model (the Trainer's own reads a transformers DistributedConfig)."""
        with sharding.deferred_reduction(self._model()):
            yield

    def _model(self) -> nn.Module:
        """The bare model (``self.model``; the Trainer keeps DDP and other wrappers in ``model_wrapped``)."""
        if self.model is None:
            raise RuntimeError("the trainer has no model")
        model: nn.Module = self.model
        return model

    def _decay(self, model: nn.Module) -> set[str]:
        if self._decay_names is None:
            self._decay_names = set(self.get_decay_parameter_names(model))
        return self._decay_names

    def _groups(self, named: list[tuple[str, nn.Parameter]], model: nn.Module) -> list[dict[str, Any]]:
        hp = self.spec.hyperparameters
        return param_groups(
            named,
            self._decay(model),
            learning_rate=hp.learning_rate,
            weight_decay=hp.weight_decay,
            layers=self.layers,
            lr_decay=hp.layerwise_lr_decay,
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self._model() if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)  # type: ignore[arg-type]
            groups = self._groups(list(opt_model.named_parameters()), opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            self.thaw(self.thaw_on_create)
        return self.optimizer

    def thaw(self, units: int) -> list[str]:
        """Unfreeze the first ``units`` thaw units (top first) not yet thawed; their parameters become new groups."""
        model = self._model()
        named = dict(model.named_parameters())
        thawed: list[str] = []
        while self.thawed < min(units, len(self.plan.thaw_units)):
            names = self.plan.thaw_units[self.thawed]
            wrapped = self.model_wrapped is not self.model  # DDP (or another wrapper) already registered its set
            for name in names:
                named[name].requires_grad_(True)
                if wrapped:
                    self.unsynced.append(named[name])
            if self.optimizer is not None:
                for group in self._groups([(n, named[n]) for n in names], model):
                    self._add_group(group)
            thawed.extend(names)
            self.thawed += 1
        return thawed

    def thaw_for_epoch(self, epoch: int) -> list[str]:
        schedule = self.spec.freeze.gradual_unfreezing
        if schedule is None:
            return []
        target = thawed_units(epoch, schedule.start_epoch, schedule.layers_per_epoch, len(self.plan.thaw_units))
        return self.thaw(target)

    def _add_group(self, group: dict[str, Any]) -> None:
        optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        group["initial_lr"] = group["lr"]
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if scheduler is not None and lambdas:
            scheduler.base_lrs.append(group["lr"])
            lambdas.append(lambdas[0])
            group["lr"] = group["lr"] * lambdas[0](scheduler.last_epoch)
        optimizer.add_param_group(group)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Backward, then (on the micro-batch that steps the optimizer) sync what DDP does not: thawed parameters."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.unsynced and self.accelerator.sync_gradients:
            average_gradients(self.unsynced)
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        return loss

    def take_step_loss(self) -> float | None:
        """The loss of the optimizer step that just ended, as the Trainer logs it (its micro-batches' sum, the
        mean over ranks: the same value on every rank), then forgets it. One sync per step: the divergence
        rule judges every step, not only the logged ones."""
        loss, self._step_loss = self._step_loss, None
        if loss is None:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss = loss / torch.distributed.get_world_size()
        return float(loss)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch for the model: the activation cache takes the example indices out (see activation_cache)."""
        prepared = dict(super()._prepare_inputs(inputs))
        if self.activation_cache is not None:
            return self.activation_cache.begin(prepared)
        prepared.pop(EXAMPLE_INDEX, None)
        return prepared

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        l1 = self.spec.hyperparameters.l1_penalty
        if l1 <= 0 or not model.training:
            return result
        unpacked: tuple[Any, Any] = result if return_outputs else (result, None)  # type: ignore[assignment]
        loss, outputs = unpacked
        bare = self._model()
        decay = self._decay(bare)
        penalty = l1 * l1_norm(p for n, p in bare.named_parameters() if p.requires_grad and n in decay)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if scaled:  # the Trainer will not divide by the accumulation steps: spread the penalty over them
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + penalty.to(loss.device)
        # what the term adds to the logged loss (which the Trainer divides by the steps when not scaled)
        share = (penalty if scaled else penalty / self.current_gradient_accumulation_steps).detach()
        if self._l1_logged is None:
            self._l1_logged, self._l1_logged_step = share, self.state.global_step
        else:
            self._l1_logged = self._l1_logged + share
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """With an L1 penalty, the training loss is logged with it (``loss``) and without it (``task_loss``)."""
        if "loss" in logs and self._l1_logged is not None:
            steps = max(self.state.global_step - self._l1_logged_step, 1)
            penalty = float(self._l1_logged) / steps
            logs = {**logs, "task_loss": logs["loss"] - penalty, "l1_penalty": penalty}
            self._l1_logged = None
        super().log(logs, start_time)

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """Also sums the evaluation NLL ourselves (see ``evaluation_loop``); logits only if metrics need them."""
        loss, logits, labels = super().prediction_step(model, inputs, False, ignore_keys=ignore_keys)
        if labels is None or logits is None:
            return loss, (None if prediction_loss_only else logits), labels
        first = logits[0] if isinstance(logits, tuple | list) else logits
        total, count = summed_nll(first, labels, causal=self.spec.model.task == "causal-lm")
        if self._eval_nll is None:
            self._eval_nll = (total, count)
        else:
            self._eval_nll = (self._eval_nll[0] + total, self._eval_nll[1] + count)
        if prediction_loss_only:
            return loss, None, None
        return loss, logits, labels

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """The reported loss is the token (or example) NLL: summed losses over their count, never label-smoothed.

        The Trainer's own figure averages per-batch means (wrong for uneven batches) of the training loss
        (smoothed; and mis-scaled for models whose loss expects ``num_items_in_batch``).
        """
        self._eval_nll = None
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if self._eval_nll is not None and output.metrics is not None:
            total, count = self._eval_nll
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(total)
                torch.distributed.all_reduce(count)
            if int(count) > 0:
                output.metrics[f"{prefix}_loss"] = float(total) / int(count)
        self._eval_nll = None
        loss = (output.metrics or {}).get(f"{prefix}_loss")
        if self.want_perplexity and loss is not None and output.metrics is not None:
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(float(loss), 700.0))
        return output


def summed_nll(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token or example negative log-likelihoods, how many), labels -100 ignored; causal: next-token."""
    if causal:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    flat_labels = labels.reshape(-1).to(logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.reshape(flat_labels.numel(), -1).float(), flat_labels, ignore_index=-100, reduction="sum"
    )
    return total.double(), (flat_labels != -100).sum()
