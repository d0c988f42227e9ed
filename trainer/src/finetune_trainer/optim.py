"""Optimizer parameter groups: only trainable parameters, L2 split, layer-wise LR decay; and the L1 penalty."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from finetune_trainer.freeze import LayerMap


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    decay_names: set[str],
    *,
    learning_rate: float,
    weight_decay: float,
    layers: LayerMap | None,
    lr_decay: float | None,
) -> list[dict[str, Any]]:
    """One group per (depth, decays) pair over parameters that require grad; frozen ones get no state.

    Weight decay skips biases and norms (``decay_names`` comes from the Trainer); with layer-wise decay
    block ``i`` from the top gets ``learning_rate * lr_decay**i``.
    """
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        depth = layers.depth(name) if (layers is not None and lr_decay is not None) else 0
        decays = name in decay_names
        key = (depth, decays)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": learning_rate * (lr_decay**depth if lr_decay is not None else 1.0),
                "weight_decay": weight_decay if decays else 0.0,
                "depth": depth,
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def l1_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """Sum of absolute values; the caller passes trainable weights (no biases, no norms)."""
    terms = [p.abs().sum() for p in params]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
