"""Data that ships with installed packages: pydoc text and scikit-learn digits."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import TensorDataset

from lightning_ft.demos.digits import DigitsDataModule, load_digits_tensors
from lightning_ft.demos.text import PydocTextDataModule
from lightning_ft.rehearsal import RehearsalDataModule

__all__ = ["digits", "digits_datamodule", "pydoc_datamodule", "rehearsal_datamodule", "small_digits_datamodule"]


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


def rehearsal_datamodule(**overrides: Any) -> RehearsalDataModule:
    """Task B = 128 inverted digits with labels shifted by 3 (batch 16, 64 for validation); pool = 200 task-A digits
    (8x8); mix-cd with 4 pool samples per batch."""
    x, y = load_digits_tensors(8)
    xb, yb = 1 - x, (y + 3) % 10
    finetune = pl.LightningDataModule.from_datasets(
        train_dataset=TensorDataset(xb[:128], yb[:128]),
        val_dataset=TensorDataset(xb[1500:1564], yb[1500:1564]),
        batch_size=16,
    )
    kwargs: dict[str, Any] = {"replay_per_step": 4, "num_bins": 4}
    return RehearsalDataModule(finetune, TensorDataset(x[200:400], y[200:400]), **{**kwargs, **overrides})
