"""Activation checkpointing that never recomputes, or even back-propagates through, a frozen prefix.

transformers' ``activation_checkpointing_enable`` also calls ``enable_input_require_grads``: a hook that makes the
input embeddings' output require a gradient. Reentrant checkpointing needs it (a checkpointed block whose inputs
need no gradient would cut its parameters off the graph); non-reentrant checkpointing, which we always use, does
not. With frozen bottom layers the hook costs a full backward pass through every frozen block (2.4x slower steps
in the issue's BERT experiment) for gradients nobody reads. Frozen blocks are not checkpointed either: they run in
eval mode (see freeze.keep_frozen_in_eval) and transformers checkpoints only blocks in training mode, so a block
thawed by gradual unfreezing starts checkpointing when it starts training.
"""

from __future__ import annotations

from typing import Any

from torch import nn

NON_REENTRANT = {"use_reentrant": False}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint the training blocks, without forcing gradients into the (possibly frozen) input embeddings."""
    target: Any = model
    target.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(NON_REENTRANT))
    if hasattr(target, "disable_input_require_grads"):
        target.disable_input_require_grads()
