"""Reading inputs and labels out of a classification batch, one convention for every family."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["clean_loader", "inputs_and_labels", "loader_batch_size"]

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


def loader_batch_size(loader: Any) -> int | None:
    """The batch size of a ``DataLoader``: its ``batch_size``, else its ``batch_sampler``'s; None for anything else
    (another iterable, no automatic batching)."""
    if not isinstance(loader, DataLoader):
        return None
    batch_size = (
        loader.batch_size if loader.batch_size is not None else getattr(loader.batch_sampler, "batch_size", None)
    )
    return batch_size if isinstance(batch_size, int) and batch_size >= 1 else None


def clean_loader(trainer: pl.Trainer, dataloader: Iterable[Any] | None, owner: str) -> Iterable[Any]:
    """The clean data a defense runs on: ``dataloader`` if given, else the fit's whole training set in order, read
    without the distributed sampler (rank 0 runs on all of it). ``owner`` names the callback in the error.

    The rebuilt loader keeps the fit loader's batch size, collate function and worker settings (``num_workers``,
    ``pin_memory``, ``worker_init_fn``, ``persistent_workers``, ``prefetch_factor``, ``timeout``,
    ``multiprocessing_context``, ...); only the order changes (a sequential sampler instead of the shuffling or
    distributed one, no ``drop_last``). A ``generator`` is copied (same state), so reading the clean data never
    advances the fit's own generator. A batch size given by a ``batch_sampler`` is kept.
    """
    if dataloader is not None:
        return dataloader
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise ValueError(
            f"{owner} reads the clean data from the fit's single training DataLoader; pass `dataloader=` explicitly"
            " for other setups."
        )
    batch_size = loader_batch_size(loader)
    if batch_size is None:
        raise ValueError(
            f"{owner} reads the fit's training set in order with the loader's batch size, but the training DataLoader"
            f" has none (batch_size={loader.batch_size!r}, batch_sampler={type(loader.batch_sampler).__name__});"
            " pass `dataloader=` with the clean data."
        )
    settings = {name: getattr(loader, name) for name in _LOADER_SETTINGS if hasattr(loader, name)}
    settings = {name: value for name, value in settings.items() if name in _dataloader_arguments()}
    if settings.get("generator") is not None:  # a copy: iterating draws worker seeds from it
        generator = torch.Generator(device=settings["generator"].device)
        generator.set_state(settings["generator"].get_state())
        settings["generator"] = generator
    if not settings.get("num_workers"):  # DataLoader refuses these without workers
        settings.pop("persistent_workers", None)
        settings.pop("prefetch_factor", None)
    return DataLoader(loader.dataset, batch_size=batch_size, shuffle=False, drop_last=False, **settings)


_LOADER_SETTINGS = (
    "collate_fn",
    "num_workers",
    "pin_memory",
    "pin_memory_device",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "in_order",
)
"""The training loader's settings the clean loader keeps (those this torch's ``DataLoader`` accepts)."""


def _dataloader_arguments() -> set[str]:
    return set(inspect.signature(DataLoader.__init__).parameters)
