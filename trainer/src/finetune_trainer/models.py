"""Load the pretrained model with the spec's task head, and override its dropout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from finetune_trainer.config import RuntimeEnv, local_path
from finetune_trainer.errors import ConfigError, ModelError
from finetune_trainer.spec import ModelSpec

AUTO_CLASSES: dict[str, Any] = {
    "sequence-classification": AutoModelForSequenceClassification,
    "causal-lm": AutoModelForCausalLM,
    "image-classification": AutoModelForImageClassification,
}


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads from and with which hub options (the token never leaves this object)."""

    name_or_path: str
    revision: str | None = None
    token: str | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.revision:
            out["revision"] = self.revision
        if self.token:
            out["token"] = self.token
        return out

    def __repr__(self) -> str:  # keep the token out of tracebacks and logs
        return f"ModelSource({self.name_or_path!r}, revision={self.revision!r})"


def resolve_source(spec: ModelSpec, env: RuntimeEnv) -> ModelSource:
    """hf:// → hub id (+revision, token from env); pvc:// and file:// → a directory that must exist."""
    if spec.source.startswith("hf://"):
        return ModelSource(spec.source[len("hf://") :], spec.revision, env.hf_token)
    path = local_path(spec.source, env.pvc_root)
    if not path.is_dir():
        raise ModelError(f"model.source: {spec.source} not found ({path} is not a directory)")
    return ModelSource(str(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def override_config_dropout(config: PretrainedConfig, probability: float) -> None:
    """Set every dropout probability of a config (hidden_dropout_prob, resid_pdrop, attention_dropout...)."""
    for key, value in list(config.to_dict().items()):
        if (
            ("dropout" in key or key.endswith("pdrop"))
            and isinstance(value, float | int)
            and not isinstance(value, bool)
        ):
            setattr(config, key, probability)


def override_dropout(model: nn.Module, probability: float) -> None:
    """Set ``p`` of every dropout module and every float ``*dropout*`` attribute (functional attention dropout).

    Config fields alone are not enough: modules copy them at construction.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = probability
        for attr, value in list(vars(module).items()):
            if "dropout" in attr and isinstance(value, float):
                setattr(module, attr, probability)


def load_config(spec: ModelSpec, source: ModelSource, dropout: float | None) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(
            source.name_or_path, trust_remote_code=spec.trust_remote_code, **source.kwargs()
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model.source: cannot load the config of {spec.source}: {_first_line(exc)}") from exc
    num_labels = spec.effective_num_labels
    if spec.task != "causal-lm" and num_labels is not None:
        config.num_labels = num_labels
        names = spec.label_names or [f"LABEL_{i}" for i in range(num_labels)]
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    if dropout is not None:
        override_config_dropout(config, dropout)
    loaded: PretrainedConfig = config
    return loaded


def load_model(
    spec: ModelSpec,
    source: ModelSource,
    dropout: float | None = None,
    dtype: torch.dtype = torch.float32,
    quantized: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Weights in ``dtype``: fp32 unless all of them stay frozen (mixed precision is autocast); a new
    classification head when the label count differs. Attention is SDPA where the model supports it (the
    transformers default), else eager. ``quantized``: QLoRA's loading arguments (see qlora.load_kwargs)."""
    config = load_config(spec, source, dropout)
    auto = AUTO_CLASSES[spec.task]
    extra: dict[str, Any] = {"ignore_mismatched_sizes": True} if spec.task != "causal-lm" else {}
    try:
        model: PreTrainedModel = auto.from_pretrained(
            source.name_or_path,
            config=config,
            dtype=dtype,
            trust_remote_code=spec.trust_remote_code,
            **extra,
            **(quantized or {}),
            **source.kwargs(),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"model.source: cannot load {spec.source} for {spec.task}: {_first_line(exc)}") from exc
    if dropout is not None:
        override_dropout(model, dropout)
    return model


def load_processor(spec: ModelSpec, source: ModelSource) -> Any:
    """The tokenizer (text tasks) or image processor (image tasks) saved next to the weights."""
    try:
        if spec.task == "image-classification":
            return AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                source.name_or_path, trust_remote_code=spec.trust_remote_code, **source.kwargs()
            )
        tokenizer = AutoTokenizer.from_pretrained(
            source.name_or_path, trust_remote_code=spec.trust_remote_code, **source.kwargs()
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        kind = "image processor" if spec.task == "image-classification" else "tokenizer"
        raise ModelError(f"model.source: cannot load the {kind} of {spec.source}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError(f"model.source: the tokenizer of {spec.source} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def align_pad_token(model: PreTrainedModel, processor: Any) -> None:
    """Decoder-only classifiers find the last token through ``pad_token_id``; keep it equal to the tokenizer's."""
    pad_id = getattr(processor, "pad_token_id", None)
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
