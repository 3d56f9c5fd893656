"""Reading inputs and labels out of a classification batch, one convention for every family."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["clean_loader", "inputs_and_labels"]

_KEY_PAIRS = (("image", "label"), ("pixel_values", "labels"), ("x", "y"))


def inputs_and_labels(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of a batch: the first two elements of a tuple/list, or the ``image``/``label``,
    ``pixel_values``/``labels`` or ``x``/``y`` entries of a mapping."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for x_key, y_key in _KEY_PAIRS:
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
    keys = f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""
    raise ValueError(
        "classification batches must be (inputs, labels, ...) tuples or mappings with image/label, pixel_values/labels"
        f" or x/y entries; got a {type(batch).__name__}{keys}."
    )


def clean_loader(trainer: pl.Trainer, dataloader: Iterable[Any] | None, owner: str) -> Iterable[Any]:
    """The clean data a defense runs on: ``dataloader`` if given, else the fit's whole training set in order, read
    without the distributed sampler (rank 0 runs on all of it). ``owner`` names the callback in the error."""
    if dataloader is not None:
        return dataloader
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise ValueError(
            f"{owner} reads the clean data from the fit's single training DataLoader; pass `dataloader=` explicitly"
            " for other setups."
        )
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn)
