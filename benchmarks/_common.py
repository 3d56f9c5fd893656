"""Helpers shared by the benchmark scripts (imported as ``_common``: the scripts run as ``python benchmarks/x.py``)."""

from __future__ import annotations

import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

# two-sided 95% Student-t quantiles by sample size (degrees of freedom + 1)
_T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26, 12: 2.20, 16: 2.13}


def quiet() -> None:
    """No warnings and only Lightning's errors: a benchmark prints its own progress."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


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


class IterationTimer(pl.Callback):
    """Wall time of each training-loop iteration after an epoch's first: the interval between consecutive batch
    ends, so it holds the batch fetch (sampler and loading) as well as the step and every hook."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def write_into_card(card: Path, table: str, marker: str = "results") -> None:
    """Replace a method card's section between the ``<marker>:start`` / ``<marker>:end`` markers (default: the
    results section)."""
    text = card.read_text()
    start = text.index(f"<!-- {marker}:start")
    start = text.index("-->", start) + len("-->")
    end = text.index(f"<!-- {marker}:end -->")
    card.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def interleaved_step_times(
    variants: dict[str, Callable[[], list[pl.Callback]]],
    make_module: Callable[[], pl.LightningModule],
    loader: Any,
    epochs: int,
    rounds: int,
    baseline: str = "vanilla",
) -> dict[str, Any]:
    """Median training-step time of each variant's fit (same module factory and batches), interleaved over rounds.

    One thread (less scheduling noise on a shared 2-core machine); the first epoch warms up and is left out; each
    variant's ratio to ``baseline`` is taken per round and reported as the median with its range over rounds.
    """
    from lightning_ft.demos._common import cpu_trainer

    per_round: list[dict[str, float]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            medians = {}
            for name, make_callbacks in variants.items():
                timer = StepTimer()
                cpu_trainer(epochs, [*make_callbacks(), timer]).fit(make_module(), loader)
                medians[name] = statistics.median(timer.times[len(loader) :])
            per_round.append(medians)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {
        "threads": 1,
        "median_step_seconds": {name: statistics.median(r[name] for r in per_round) for name in variants},
        "per_round": per_round,
    }
    for name in variants:
        if name != baseline:
            ratios = [r[name] / r[baseline] for r in per_round]
            out[f"ratio_{name}"] = statistics.median(ratios)
            out[f"ratio_{name}_range"] = [min(ratios), max(ratios)]
    return out


def write_results(
    results: dict[str, Any], out: Path, markdown: Callable[[dict[str, Any]], str], card: Path | None
) -> str:
    """Write ``results`` as JSON to ``out`` and its markdown table next to it (``<stem>.md``) and, unless ``card`` is
    None (quick runs), into the method card's results section; returns the table."""
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    if card is not None:
        out.with_suffix(".md").write_text(table + "\n")
        write_into_card(card, table)
    return table


def put_mean_std(entry: dict[str, Any], metric: str, values: list[float]) -> None:
    """``entry[metric]``: the mean of ``values``; ``entry[metric + "_std"]``: their sample std (0 for one value)."""
    entry[metric] = statistics.fmean(values)
    entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
