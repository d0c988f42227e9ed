"""The transformers Trainer with what it lacks: our optimizer groups, the L1 penalty, perplexity, thawing."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from finetune_trainer.activation_cache import EXAMPLE_INDEX, ActivationCache
from finetune_trainer.freeze import FreezePlan, LayerMap, thawed_units
from finetune_trainer.optim import l1_norm, param_groups
from finetune_trainer.spec import TrainingSpec


class FineTuneTrainer(Trainer):
    """Only trainable parameters reach the optimizer; thawed ones join later as new parameter groups."""

    def __init__(
        self, *args: Any, spec: TrainingSpec, layers: LayerMap | None, plan: FreezePlan, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.layers = layers
        self.plan = plan
        self.thawed = 0
        self.thaw_on_create = 0
        """Units to thaw while building the optimizer: those thawed when the resumed checkpoint was saved."""
        self.want_perplexity = "perplexity" in spec.evaluation.metrics
        self.last_l1_penalty: float | None = None
        self._decay_names: set[str] | None = None
        self.activation_cache: ActivationCache | None = None

    def _unwrapped(self) -> nn.Module:
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
            opt_model = self._unwrapped() if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)  # type: ignore[arg-type]
            groups = self._groups(list(opt_model.named_parameters()), opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            self.thaw(self.thaw_on_create)
        return self.optimizer

    def thaw(self, units: int) -> list[str]:
        """Unfreeze the first ``units`` thaw units (top first) not yet thawed; their parameters become new groups."""
        model = self._unwrapped()
        named = dict(model.named_parameters())
        thawed: list[str] = []
        while self.thawed < min(units, len(self.plan.thaw_units)):
            names = self.plan.thaw_units[self.thawed]
            for name in names:
                named[name].requires_grad_(True)
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
        unwrapped = self._unwrapped()
        decay = self._decay(unwrapped)
        penalty = l1 * l1_norm(p for n, p in unwrapped.named_parameters() if p.requires_grad and n in decay)
        self.last_l1_penalty = float(penalty.detach())
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if scaled:  # the Trainer will not divide by the accumulation steps: spread the penalty over them
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + penalty.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        loss = (output.metrics or {}).get(f"{prefix}_loss")
        if self.want_perplexity and loss is not None and output.metrics is not None:
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(float(loss), 700.0))
        return output
