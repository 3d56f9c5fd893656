"""Data that ships with installed packages: pydoc text and scikit-learn digits."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.demos.digits import DigitsDataModule, load_digits_tensors
from lightning_ft.demos.text import PydocTextDataModule, pydoc_chunks
from lightning_ft.rehearsal import ReferenceStatistics, RehearsalDataModule, WithSampleIds

__all__ = [
    "VariableLengthText",
    "digits",
    "digits_datamodule",
    "flow_datamodule",
    "pad_collate",
    "pydoc_datamodule",
    "rehearsal_datamodule",
    "small_digits_datamodule",
    "token_budget_datamodule",
    "variable_length_chunks",
]


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
    (8x8), or ``pool=``; mix-cd with 4 pool samples per batch."""
    x, y = load_digits_tensors(8)
    xb, yb = 1 - x, (y + 3) % 10
    finetune = pl.LightningDataModule.from_datasets(
        train_dataset=TensorDataset(xb[:128], yb[:128]),
        val_dataset=TensorDataset(xb[1500:1564], yb[1500:1564]),
        batch_size=16,
    )
    kwargs: dict[str, Any] = {"replay_per_step": 4, "num_bins": 4, "pool": TensorDataset(x[200:400], y[200:400])}
    return RehearsalDataModule(finetune, **{**kwargs, **overrides})


def variable_length_chunks(
    domain: str, n: int, seed: int, min_len: int = 4, max_len: int = 32
) -> list[dict[str, Tensor]]:
    """``n`` pydoc chunks of ``domain`` cut to random lengths in [min_len, max_len]: ``{"input_ids", "labels"}``."""
    chunks = pydoc_chunks(max_len, domain)[:n]
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": c[:k], "labels": c[:k]} for c, k in zip(chunks, lengths, strict=True)]


def pad_collate(samples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Right-pads ``input_ids`` (0) and ``labels`` (-100) and adds the ``attention_mask``; stacks other entries."""
    width = max(s["input_ids"].numel() for s in samples)
    out: dict[str, Tensor] = {
        "input_ids": torch.zeros(len(samples), width, dtype=torch.long),
        "labels": torch.full((len(samples), width), -100, dtype=torch.long),
        "attention_mask": torch.zeros(len(samples), width, dtype=torch.long),
    }
    for i, s in enumerate(samples):
        k = s["input_ids"].numel()
        out["input_ids"][i, :k], out["labels"][i, :k], out["attention_mask"][i, :k] = s["input_ids"], s["labels"], 1
    for key in samples[0].keys() - out.keys():
        out[key] = torch.as_tensor([s[key] for s in samples])
    return out


class VariableLengthText(pl.LightningDataModule):
    """Causal-LM fine-tuning data of variable length (:func:`variable_length_chunks` of the "finetune" pydoc topics),
    padded per batch; no validation data."""

    def __init__(self, n: int = 24, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.samples, self.batch_size = variable_length_chunks("finetune", n, seed), batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size, collate_fn=pad_collate)  # type: ignore[arg-type]


class _Loaders(pl.LightningDataModule):
    def __init__(self, train: Any, val: Any, batch_size: int) -> None:
        super().__init__()
        self.train, self.val, self.batch_size = train, val, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=64)


def flow_datamodule(batch_size: int = 16) -> pl.LightningDataModule:
    """The task B of :func:`rehearsal_datamodule` (128 inverted digits, labels shifted by 3) with sample ids appended
    (:class:`WithSampleIds`), in order (exact resume comparisons); 64 validation samples."""
    x, y = load_digits_tensors(8)
    xb, yb = 1 - x, (y + 3) % 10
    train = WithSampleIds(TensorDataset(xb[:128], yb[:128]))
    return _Loaders(train, TensorDataset(xb[1500:1564], yb[1500:1564]), batch_size)


def token_budget_datamodule(module: Any, n_train: int = 24, replay_ratio: float = 0.25) -> RehearsalDataModule:
    """Token-budget mix-cd rehearsal for a causal LM: :class:`VariableLengthText` fine-tuning data (batch 4) and 40
    variable-length "pretrain" pool chunks, ``replay_ratio`` of each batch's tokens rehearsed, 4 bins. A random
    ``module`` gets no chunk right at the default threshold, so the pool statistics count every chunk as
    prior-correct."""
    pool = variable_length_chunks("pretrain", 40, seed=1)
    loader = DataLoader(WithSampleIds(pool), batch_size=16, collate_fn=pad_collate)  # type: ignore[arg-type]
    stats = ReferenceStatistics.compute(module, loader, task="causal_lm", lm_correct_threshold=0.0)
    return RehearsalDataModule(
        VariableLengthText(n=n_train, batch_size=4),
        pool,
        strategy="mixcd",
        num_bins=4,
        budget="tokens",
        replay_ratio=replay_ratio,
        task="causal_lm",
        pool_statistics=stats,
    )
