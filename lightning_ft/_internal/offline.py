"""The one runner for phases that run outside the fit loop (clean unlearning, mask recovery, statistics passes, probes).

It gives every family the same behaviour: a progress bar on rank 0 that follows the Trainer's
``enable_progress_bar`` (or an explicit ``progress``), one log line per epoch through ``rank_zero_info``, and the
Trainer's precision context (autocast under ``bf16-mixed``) around forward passes.

Phases that *train* a throwaway copy of the model on rank 0 alone (TSBD's clean unlearning, RNP's unlearning and mask
recovery) take it from :func:`working_copy` and run its forwards under :func:`forward_context`:

- the copy is a deep copy (the user's model is untouched), in float32 when the model's floating parameters are
  float16/bfloat16 (``16-true``/``bf16-true``: SGD steps in half precision would round most updates away), with every
  ``nn.SyncBatchNorm`` reverted to a plain BatchNorm that keeps its weights and running statistics
  (``sync_batchnorm=True``: a train-mode forward of a SyncBatchNorm is a collective the other ranks, waiting in the
  broadcast of the result, would never join, so the fit would hang);
- the forward context is the Trainer's (autocast under ``*-mixed``, the default dtype under ``64-true``) for a model
  in the dtype the Trainer trains in, and none for the float32 copy of a low-precision model (the ``*-true``
  context would set the default dtype back to half precision); none without a Trainer.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_ft._internal.forward import model_dtype

__all__ = ["LOW_PRECISION", "OfflinePhase", "copy_forward_context", "forward_context", "show_progress", "working_copy"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Floating dtypes whose models get a float32 :func:`working_copy`."""

ContextFactory = Callable[[], contextlib.AbstractContextManager]


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` to train offline on one process: float32 when ``model``'s floating parameters are
    float16/bfloat16, every ``nn.SyncBatchNorm`` reverted to a plain BatchNorm (weights, biases and running
    statistics kept). ``model`` itself is left as it is. Run the copy's forwards under :func:`forward_context`."""
    work = copy.deepcopy(model)
    # rank 0 trains the copy alone: a train-mode SyncBatchNorm would wait for the other ranks' statistics
    work = TorchSyncBatchNorm().revert(work)
    if model_dtype(work) in LOW_PRECISION:
        work = work.float()
    return work


def forward_context(trainer: pl.Trainer | None, model: nn.Module) -> ContextFactory:
    """The forward context for offline passes through ``model`` (a factory: call it for each ``with``).

    The Trainer's precision context (autocast under ``*-mixed``) when ``model`` is in the dtype the Trainer trains in;
    none for the float32 :func:`working_copy` of a float16/bfloat16 module (``*-true`` precisions), and none without a
    Trainer.
    """
    if trainer is None:
        return contextlib.nullcontext
    trained = trainer.lightning_module
    if trained is not None and model_dtype(trained) in LOW_PRECISION and model_dtype(model) not in LOW_PRECISION:
        return contextlib.nullcontext
    return trainer.precision_plugin.forward_context


def copy_forward_context(trainer: pl.Trainer | None, model: nn.Module) -> ContextFactory:
    """:func:`forward_context` for the :func:`working_copy` of ``model``, decided without making the copy (for phases
    that make many copies, e.g. repair probes): none when the copy is the float32 copy of a low-precision model."""
    if model_dtype(model) in LOW_PRECISION:
        return contextlib.nullcontext
    return forward_context(trainer, model)


def show_progress(trainer: pl.Trainer | None, progress: bool | None = None) -> bool:
    """Whether to draw a progress bar: ``progress`` when given, else rank 0 of a Trainer that has a progress bar."""
    if trainer is not None and not trainer.is_global_zero:
        return False
    if progress is not None:
        return bool(progress)
    return trainer is not None and trainer.progress_bar_callback is not None


class OfflinePhase:
    """An offline loop of ``total`` epochs named ``desc``.

    Args:
        desc: what runs, e.g. ``"TSBD clean unlearning"`` (the bar's label and the log lines' prefix).
        total: the epoch cap.
        trainer: the fit's Trainer (the progress bar follows it); None outside a fit.
        progress: force the bar on or off; None follows ``trainer``.
        verbose: a ``rank_zero_info`` line per epoch with the metrics given to :meth:`log`.

    Example::

        phase, context = OfflinePhase("RNP unlearning", max_epochs, trainer), forward_context(trainer, copy)
        for epoch in phase:
            with context():
                ...
            phase.log(epoch, acc=acc)
    """

    def __init__(
        self,
        desc: str,
        total: int,
        trainer: pl.Trainer | None = None,
        progress: bool | None = None,
        verbose: bool = False,
    ) -> None:
        self.desc, self.total, self.trainer, self.verbose = desc, total, trainer, verbose
        self._bar: Any = None
        if show_progress(trainer, progress):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="epoch", leave=False)

    def __iter__(self) -> Iterator[int]:
        try:
            for epoch in range(1, self.total + 1):
                yield epoch
                if self._bar is not None:
                    self._bar.update(1)
        finally:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, epoch: int, **metrics: float) -> None:
        """Show ``metrics`` on the bar and, when ``verbose``, in a log line."""
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        if self.verbose:
            rank_zero_info(f"{self.desc}: epoch {epoch}/{self.total} {text}")
