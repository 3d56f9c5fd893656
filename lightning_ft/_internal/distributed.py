"""Helpers for sharding work across ranks and gathering uneven per-sample results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lightning_ft._internal.batches import loader_batch_size

__all__ = ["OfflineGroup", "all_gather_rows", "broadcast_from_rank_zero", "gather_uneven", "shard_indices"]

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


class OfflineGroup:
    """The processes that run an offline phase (TSBD's clean unlearning, its calibration probes) together.

    With a Trainer under an initialised process group and more than one rank, every rank works on its own shard of
    the clean data and the ranks meet in ``all_reduce`` calls: summed counts (:meth:`sum`), averaged gradients
    (:meth:`average_gradients_`), each carrying a failure flag so that an error on one rank is raised on every rank
    instead of leaving the others waiting. Otherwise (no Trainer, one process) every method is a local no-op.

    Sharding (:meth:`shard`) keeps the single-process arithmetic: rank ``r`` reads samples ``r, r + W, ...`` of the
    ordered clean set with a per-rank batch of ``ceil(batch_size / W)``, so the ranks' batch ``k`` together hold the
    single-process batch ``k`` and the averaged gradient is its gradient (exactly when ``W`` divides the batch size and
    the set). The shards are padded to equal length (as ``DistributedSampler`` does) so that every rank steps the
    same number of times; :meth:`shard` with ``pad=False`` gives the unpadded shard for counting.
    """

    def __init__(self, trainer: Any | None) -> None:
        ready = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if ready and trainer is not None else 1
        self.rank = dist.get_rank() if self.world_size > 1 else 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def can_shard(self, loader: Any) -> bool:
        """Whether ``loader`` is a ``DataLoader`` over a map-style dataset with a batch size (else: rank 0 alone)."""
        return loader_batch_size(loader) is not None and hasattr(loader.dataset, "__len__")

    def shard(self, loader: Any, pad: bool = True) -> Any:
        """This rank's ordered shard of ``loader`` (unchanged with one rank)."""
        if not self.distributed:
            return loader
        from torch.utils.data import DataLoader, Subset

        n = len(loader.dataset)
        indices = list(range(self.rank, n, self.world_size))
        per_rank = -(-n // self.world_size)
        if pad and len(indices) < per_rank:
            indices += list(range(per_rank - len(indices)))  # repeat the first samples, as DistributedSampler pads
        batch_size = -(-loader_batch_size(loader) // self.world_size)  # type: ignore[operator]
        return DataLoader(Subset(loader.dataset, indices), batch_size=batch_size, collate_fn=loader.collate_fn)

    def sum(self, values: torch.Tensor, failed: BaseException | None = None) -> torch.Tensor:
        """``values`` summed over ranks; raises on every rank when any rank passed ``failed``."""
        if not self.distributed:
            if failed is not None:
                raise failed
            return values
        flag = torch.tensor([1.0 if failed is not None else 0.0], dtype=values.dtype, device=values.device)
        buffer = torch.cat([values.flatten(), flag])
        dist.all_reduce(buffer)
        self._raise_if_failed(buffer[-1], failed)
        return buffer[:-1].view_as(values)

    def average_gradients_(self, params: list[torch.nn.Parameter], failed: BaseException | None = None) -> None:
        """Average the gradients of ``params`` over ranks in place (a missing gradient counts as zero); raises on every
        rank when any rank passed ``failed``."""
        if not self.distributed:
            if failed is not None:
                raise failed
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        device = params[0].device
        flat = torch.cat([g.detach().flatten().float() for g in grads] + [torch.zeros(1, device=device)])
        if failed is not None:
            flat.zero_()
            flat[-1] = 1.0
        dist.all_reduce(flat)
        self._raise_if_failed(flat[-1], failed)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def _raise_if_failed(self, flag: torch.Tensor, failed: BaseException | None) -> None:
        if float(flag) > 0:
            if failed is not None:
                raise failed
            raise RuntimeError("another rank failed in this offline phase (its error is raised there)")
