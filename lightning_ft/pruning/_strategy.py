"""Strategy checks shared by the pruning callbacks."""

from __future__ import annotations

from typing import Any

__all__ = ["check_strategy"]

# strategies that shard the parameters (gates, masks and RNP's whole-model copy need whole, local weights)
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy")


def _sharded_strategies() -> tuple[type, ...]:
    try:
        import lightning.pytorch.strategies as strategies
    except ImportError:  # pragma: no cover - lightning is a dependency
        return ()
    return tuple(getattr(strategies, name) for name in _SHARDED if hasattr(strategies, name))


def check_strategy(trainer: Any, owner: str) -> None:
    """Raise a clear error when ``trainer`` runs a sharded strategy (FSDP, DeepSpeed), which ``owner`` does not
    support."""
    strategy = getattr(trainer, "strategy", None)
    sharded = _sharded_strategies()
    if strategy is not None and sharded and isinstance(strategy, sharded):
        raise ValueError(
            f"{owner} does not support the {type(strategy).__name__} strategy: it edits whole weights and adds"
            " per-channel gates or masks, which sharded parameters do not allow. Use strategy='ddp' (or a single"
            " device) for the fit with this callback."
        )
