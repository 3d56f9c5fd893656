"""The one runner for phases that run outside the fit loop (clean unlearning, mask recovery, statistics passes, probes).

It gives every family the same behaviour: a progress bar on rank 0 that follows the Trainer's
``enable_progress_bar`` (or an explicit ``progress``), one log line per epoch through ``rank_zero_info``, and the
Trainer's precision context (autocast under ``bf16-mixed``) around forward passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["OfflinePhase", "show_progress"]


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
        trainer: the fit's Trainer (progress bar and precision follow it); None outside a fit.
        progress: force the bar on or off; None follows ``trainer``.
        verbose: a ``rank_zero_info`` line per epoch with the metrics given to :meth:`log`.

    Example::

        phase = OfflinePhase("RNP unlearning", max_epochs, trainer)
        for epoch in phase:
            with phase.precision():
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

    def precision(self) -> contextlib.AbstractContextManager:
        """The Trainer's forward context (autocast under mixed precision); a no-op without a Trainer."""
        if self.trainer is None:
            return contextlib.nullcontext()
        return self.trainer.precision_plugin.forward_context()
