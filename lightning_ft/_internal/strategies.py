"""The strategies a callback cannot run under, refused at ``setup`` with one wording for every family."""

from __future__ import annotations

import lightning.pytorch as pl

__all__ = ["check_strategy", "sharded_strategies"]

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy")


def sharded_strategies() -> tuple[type, ...]:
    """Lightning's strategies that shard, offload or compile the model (the ones importable here)."""
    import lightning.pytorch.strategies as strategies

    return tuple(getattr(strategies, name) for name in _SHARDED if hasattr(strategies, name))


def check_strategy(trainer: pl.Trainer, owner: str, reason: str = "reads and edits whole weights") -> None:
    """Raise a ``ValueError`` naming ``owner``, the strategy and what to use instead when ``trainer`` runs a sharded
    strategy (FSDP, DeepSpeed, model parallel, XLA); DDP and single devices pass."""
    strategy = trainer.strategy
    if isinstance(strategy, sharded_strategies()):
        raise ValueError(
            f"{owner} {reason} and does not support {type(strategy).__name__}; use strategy='ddp' (or a single device)."
        )
