"""scikit-learn's digits (8x8 images, 10 classes), shipped inside the scikit-learn package (no download)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "load_digits_tensors"]


def load_digits_tensors(image_size: int = 8) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as float images ``(N, 1, image_size, image_size)`` in [0, 1] and int64 labels ``(N,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data ships with scikit-learn: pip install 'lightning-ft[demo]' (or scikit-learn)."
        ) from err
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear")
    return images, torch.tensor(data.target, dtype=torch.long)


class DigitsDataModule(pl.LightningDataModule):
    """Digits split into train / val / test with a fixed seed; images optionally upsampled for CNNs.

    Args:
        image_size: side of the (square) images; 8 is the native size.
        val_fraction: fraction of the samples held out for validation.
        test_fraction: fraction held out for testing.
        train_fraction: fraction of the remaining training samples kept (e.g. 0.05 for a small clean set).
        batch_size: batch size of every loader.
        seed: split seed.
        shuffle: shuffle the training loader (False: a fixed order, e.g. for exact resume comparisons).
    """

    def __init__(
        self,
        image_size: int = 8,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        train_fraction: float = 1.0,
        batch_size: int = 64,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError("`val_fraction + test_fraction` must leave training samples (< 1).")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"`train_fraction` must be in (0, 1], got {train_fraction}.")
        self.save_hyperparameters()
        self.image_size, self.batch_size, self.seed, self.shuffle = image_size, batch_size, seed, shuffle
        self.val_fraction, self.test_fraction, self.train_fraction = val_fraction, test_fraction, train_fraction
        self.train_dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        images, labels = load_digits_tensors(self.image_size)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val, n_test = int(len(labels) * self.val_fraction), int(len(labels) * self.test_fraction)
        val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        train = train[: max(1, int(len(train) * self.train_fraction))]
        self.train_dataset = TensorDataset(images[train], labels[train])
        self.val_dataset = TensorDataset(images[val], labels[val])
        self.test_dataset = TensorDataset(images[test], labels[test])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=self.shuffle)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=self.batch_size)
