"""Helpers for sharding work across ranks and gathering uneven per-sample results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["all_gather_rows", "broadcast_from_rank_zero", "gather_uneven", "shard_indices"]

T = TypeVar("T")


def shard_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices ``rank, rank + world_size, ...`` of ``range(n)``: disjoint shards that cover every index once."""
    return torch.arange(rank, n, world_size)


def gather_uneven(values: torch.Tensor, n_total: int, world_size: int) -> torch.Tensor:
    """Gather per-sample ``values`` sharded with :func:`shard_indices` back into the original order.

    Every rank passes its shard (first dimension = its shard size); the result has ``n_total`` rows on every rank.
    Without an initialised process group (or with one rank) ``values`` is returned unchanged.
    """
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return values
    per_rank = -(-n_total // world_size)
    padded = values.new_zeros((per_rank, *values.shape[1:]))
    padded[: values.shape[0]] = values
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded.contiguous())
    out = values.new_empty((n_total, *values.shape[1:]))
    for rank, chunk in enumerate(gathered):
        idx = shard_indices(n_total, rank, world_size)
        out[idx] = chunk[: idx.numel()]
    return out


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (row counts may differ); unchanged without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts, strict=True)])


_FAILED = "__lightning_ft_rank_zero_error__"


def broadcast_from_rank_zero(trainer: Any, compute: Callable[[], T]) -> T:
    """``compute()`` on global rank 0, its result broadcast to every rank.

    An exception on rank 0 is broadcast too and raised on every rank (the same type when it can be rebuilt from its
    message, else a ``RuntimeError`` naming it), so the other ranks fail with rank 0 instead of waiting in the
    broadcast until the process-group timeout.
    """
    payload: Any = None
    error: BaseException | None = None
    if trainer.is_global_zero:
        try:
            payload = compute()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
            payload = {_FAILED: (type(exc), str(exc))}
    payload = trainer.strategy.broadcast(payload, src=0)
    if error is not None:
        raise error
    if isinstance(payload, dict) and _FAILED in payload:
        kind, message = payload[_FAILED]
        try:
            rebuilt = kind(f"(raised on rank 0) {message}")
        except Exception:
            rebuilt = RuntimeError(f"rank 0 raised {kind.__name__}: {message}")
        raise rebuilt
    return payload
