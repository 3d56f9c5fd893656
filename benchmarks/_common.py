"""Helpers shared by the benchmark scripts (imported as ``_common``: the scripts run as ``python benchmarks/x.py``)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

# two-sided 95% Student-t quantiles by sample size (degrees of freedom + 1)
_T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26, 12: 2.20, 16: 2.13}


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% t-interval ``(mean, low, high)``."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, mean, mean
    t = _T95.get(len(diffs), 2.0)
    half = t * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


class StepTimer(pl.Callback):
    """Wall time of each training step (forward, backward, hooks, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter() - self._start)


def write_into_card(card: Path, table: str) -> None:
    """Replace a method card's results section (between the ``results:start`` / ``results:end`` markers)."""
    text = card.read_text()
    start = text.index("<!-- results:start")
    start = text.index("-->", start) + len("-->")
    end = text.index("<!-- results:end -->")
    card.write_text(text[:start] + "\n" + table + "\n" + text[end:])
