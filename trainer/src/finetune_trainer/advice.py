"""Fine-tuning advice at apply time: valid specs that contradict good practice, stated once for two checkers.

Each ``Advice`` is a ``spec.Rule`` whose condition is the good practice. Its CEL form goes into a
``ValidatingAdmissionPolicy`` with ``validationActions: [Warn]`` (so ``kubectl apply`` and GitOps
tools print a ``Warning:`` line and never reject); its Python form runs in ``kubectl finetune
advise``. Torch-free: the operator generates the policy from this module.

CEL reads the object as stored: optional objects may be absent and nested defaults are not filled
in, so every field goes through ``_get``, which falls back to the pydantic default (one source).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel

from finetune_trainer.spec import (
    CLASSIFICATION_TASKS,
    EarlyStopping,
    FreezeSpec,
    Hyperparameters,
    Rule,
    TrainingSpec,
)

MAX_LEARNING_RATE: Final = 1e-3
"""Above this, full or partial fine-tuning tends to wash out what the pretrained weights know."""
MAX_LORA_LEARNING_RATE: Final = 5e-3
"""LoRA adapters start at zero and tolerate a higher rate, but not much higher than this."""
MAX_EPOCHS_WITHOUT_EARLY_STOPPING: Final = 3
"""Beyond this many epochs a small fine-tuning set is usually memorised: stop early and keep the best."""


def _default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].default


def _cel_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if "e" in repr(value) or "." in repr(value) else f"{value}.0"
    if isinstance(value, str):
        return f"'{value}'"
    return str(value)


def _has(path: str) -> str:
    """CEL: ``self.<path>`` and every object above it are present and not null (an explicit ``null`` on a
    nullable field is stored as such, and pydantic, like the trainer, reads it as absent)."""
    parts = [f"self.{'.'.join(path.split('.')[: i + 1])}" for i in range(path.count(".") + 1)]
    return "(" + " && ".join(f"has({p}) && {p} != null" for p in parts) + ")"


def _get(path: str, default: Any) -> str:
    """CEL for ``self.<path>``, or ``default`` when it (or an object above it) is absent."""
    return f"({_has(path)} ? self.{path} : {_cel_literal(default)})"


def _num(path: str, default: float) -> str:
    """A number field as a CEL double (YAML ``5`` arrives as an int)."""
    return f"double({_get(path, default)})"


_STRATEGY = _get("freeze.strategy", _default(FreezeSpec, "strategy"))
_EPOCHS = _num("hyperparameters.epochs", _default(Hyperparameters, "epochs"))
_LONG_RUN = f"{_EPOCHS} > {float(MAX_EPOCHS_WITHOUT_EARLY_STOPPING)} && !{_has('hyperparameters.maxSteps')}"
_CHECKPOINTING = _get("hyperparameters.gradientCheckpointing", _default(Hyperparameters, "gradient_checkpointing"))


def _long_run(t: TrainingSpec) -> bool:
    return t.hyperparameters.max_steps is None and t.hyperparameters.epochs > MAX_EPOCHS_WITHOUT_EARLY_STOPPING


def _max_rate(t: TrainingSpec) -> float:
    return MAX_LORA_LEARNING_RATE if t.freeze.strategy == "lora" else MAX_LEARNING_RATE


RULES: Final[tuple[Rule, ...]] = (
    Rule(
        "hyperparameters.learningRate",
        f"hyperparameters.learningRate is above {MAX_LEARNING_RATE:g} ({MAX_LORA_LEARNING_RATE:g} with LoRA): "
        "fine-tuning uses a lower rate than training from scratch, or it overwrites what the model knows",
        f"{_num('hyperparameters.learningRate', _default(Hyperparameters, 'learning_rate'))} <= "
        f"({_STRATEGY} == 'lora' ? {MAX_LORA_LEARNING_RATE!r} : {MAX_LEARNING_RATE!r})",
        lambda t: t.hyperparameters.learning_rate <= _max_rate(t),
        reason="HighLearningRate",
    ),
    Rule(
        "dataset.validation",
        "dataset has neither validation nor validationFraction: nothing is monitored, "
        "and there is no best checkpoint to revert to",
        f"{_has('dataset.validation')} || {_has('dataset.validationFraction')}",
        lambda t: t.dataset.validation is not None or t.dataset.validation_fraction is not None,
        reason="NoValidationData",
    ),
    Rule(
        "earlyStopping",
        f"earlyStopping is not set with more than {MAX_EPOCHS_WITHOUT_EARLY_STOPPING} epochs: "
        "stop when the validation metric stalls instead of training into overfitting",
        f"{_has('earlyStopping')} || !({_LONG_RUN})",
        lambda t: t.early_stopping is not None or not _long_run(t),
        reason="NoEarlyStopping",
    ),
    Rule(
        "earlyStopping.restoreBest",
        f"earlyStopping.restoreBest is false with more than {MAX_EPOCHS_WITHOUT_EARLY_STOPPING} epochs: "
        "the saved model is the last one, not the best one the run found",
        f"!{_has('earlyStopping')} || {_get('earlyStopping.restoreBest', _default(EarlyStopping, 'restore_best'))}"
        f" || !({_LONG_RUN})",
        lambda t: t.early_stopping is None or t.early_stopping.restore_best or not _long_run(t),
        reason="NoRestoreBest",
    ),
    Rule(
        "augmentation",
        "augmentation is not set for image-classification: augmenting images is the cheapest regularizer "
        "against overfitting a small image set",
        "self.model.task != 'image-classification' || has(self.augmentation)",
        lambda t: t.model.task != "image-classification" or t.augmentation is not None,
        reason="NoAugmentation",
    ),
    Rule(
        "freeze.embeddings",
        "freeze.embeddings is true with strategy none and gradientCheckpointing: strategy none means everything "
        "trains, yet the embeddings are frozen and checkpointing must then force gradients through them",
        f"!({_STRATEGY} == 'none' && {_get('freeze.embeddings', _default(FreezeSpec, 'embeddings'))}"
        f" && {_CHECKPOINTING})",
        lambda t: (
            not (t.freeze.strategy == "none" and t.freeze.embeddings and t.hyperparameters.gradient_checkpointing)
        ),
        reason="ContradictoryFreeze",
    ),
    Rule(
        "hyperparameters.gradientCheckpointing",
        "hyperparameters.gradientCheckpointing is true with strategy head-only: no gradient flows below the "
        "head, so recomputing activations costs time and saves no memory",
        f"!({_STRATEGY} == 'head-only' && {_CHECKPOINTING} && !{_has('freeze.gradualUnfreezing')})",
        lambda t: (
            not (
                t.freeze.strategy == "head-only"
                and t.hyperparameters.gradient_checkpointing
                and t.freeze.gradual_unfreezing is None
            )
        ),
        reason="UselessCheckpointing",
    ),
    Rule(
        "earlyStopping.metric",
        "earlyStopping.metric is loss with labelSmoothing: the smoothed loss rewards under-confident "
        "predictions; stop on accuracy or f1",
        f"!{_has('earlyStopping')} || "
        f"{_get('earlyStopping.metric', _default(EarlyStopping, 'metric'))} != 'loss' || "
        f"{_num('hyperparameters.labelSmoothing', _default(Hyperparameters, 'label_smoothing'))} == 0.0 || "
        f"!(self.model.task in {sorted(CLASSIFICATION_TASKS)!r})",
        lambda t: (
            t.early_stopping is None
            or t.early_stopping.metric != "loss"
            or t.hyperparameters.label_smoothing == 0
            or t.model.task not in CLASSIFICATION_TASKS
        ),
        reason="SmoothedLossForStopping",
    ),
)
"""Every apply-time warning; ``docs/advice.md`` explains each."""


@dataclass(frozen=True)
class Advice:
    """One warning: the field it is about, a CamelCase reason, and the sentence naming the practice."""

    field: str
    reason: str
    message: str


def advise(spec: TrainingSpec) -> list[Advice]:
    """The warnings for a valid spec. Never raises: a rule that cannot be evaluated is skipped."""
    found = []
    for rule in RULES:
        try:
            holds = rule.holds is None or rule.holds(spec)
        except Exception:  # advice must never break a valid spec
            continue
        if not holds:
            found.append(Advice(rule.field, rule.reason or "", rule.message))
    return found


def admission_expression(rule: Rule, root: str = "object.spec") -> str:
    """The rule's CEL over an admission request (``self`` is the spec there)."""
    return re.sub(r"\bself\b", root, rule.cel)
