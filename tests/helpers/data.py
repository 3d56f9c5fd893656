"""Data that ships with installed packages: pydoc text and scikit-learn digits."""

from __future__ import annotations

from typing import Any

from lightning_ft.demos.digits import DigitsDataModule, load_digits_tensors
from lightning_ft.demos.text import PydocTextDataModule

__all__ = ["digits", "digits_datamodule", "pydoc_datamodule", "small_digits_datamodule"]


def pydoc_datamodule(**overrides: Any) -> PydocTextDataModule:
    """Small pydoc fine-tuning data: 16 training chunks of 48 tokens, 16 validation chunks, batch 4, no shuffle."""
    kwargs: dict[str, Any] = {"seq_len": 48, "n_train": 16, "n_val": 16, "batch_size": 4, "shuffle": False}
    return PydocTextDataModule(**{**kwargs, **overrides})


def digits(image_size: int = 8):
    """All digits as ``(images (N, 1, s, s) in [0, 1], labels (N,))``."""
    return load_digits_tensors(image_size)


def digits_datamodule(**overrides: Any) -> DigitsDataModule:
    """Digits at 8x8 (or ``image_size``); defaults of :class:`DigitsDataModule` unless overridden."""
    return DigitsDataModule(**overrides)


def small_digits_datamodule(**overrides: Any) -> DigitsDataModule:
    """127 training digits at 8x8, batch 32, no shuffle (exact resume comparisons), 15% validation."""
    kwargs: dict[str, Any] = {"train_fraction": 0.1, "batch_size": 32, "shuffle": False}
    return DigitsDataModule(**{**kwargs, **overrides})
