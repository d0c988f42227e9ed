"""What every rank of a multi-node (DDP) run must agree on, and the gradients DDP does not reduce.

A no-op in a single process: each helper returns its input when no process group is up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import distributed as dist


def multi_process() -> bool:
    """A process group of more than one rank is up (torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` any rank holds: one rank's stop (or early stop) becomes every rank's."""
    if not multi_process():
        return value
    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def same_on_every_rank(value: int, device: torch.device) -> bool:
    """Whether every rank holds the same ``value`` (always, in a single process)."""
    return max_across_ranks(value, device) == -max_across_ranks(-value, device)


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average these parameters' gradients across ranks, as DDP does for the ones it registered.

    DDP registers only the parameters that required grad when it wrapped the model; one thawed
    later (gradual unfreezing) would otherwise train on each rank's own batches and the replicas
    drift apart. One flat all-reduce for all of them. Every rank runs the same graph, so the same
    parameters have gradients on every rank.
    """
    if not multi_process():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def from_main(value: str | None) -> str:
    """Rank 0's ``value`` on every rank (a path only rank 0 could choose: a temporary directory's name)."""
    if not multi_process():
        if value is None:
            raise RuntimeError("from_main: rank 0 has no value")
        return value
    box: list[str | None] = [value]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise RuntimeError("from_main: rank 0 has no value")
    return box[0]


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if multi_process():
        dist.barrier()
