"""Module helpers shared by every family."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode", "training_mode"]


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train (``training=True``) or eval mode and restore each submodule's own train/eval flag
    afterwards (frozen parts stay)."""
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in modes.items():
            module.training = flag


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Put ``model`` in eval mode and restore each submodule's own train/eval flag afterwards (frozen parts stay)."""
    return training_mode(model, False)
