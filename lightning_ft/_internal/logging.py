"""One place for logging from callbacks.

Scalars go through every logger of the trainer (``log_metrics``), so W&B, TensorBoard and CSV all receive them.
Rich artefacts (tables, histograms, bar charts) go to W&B when the logger is a
:class:`~lightning.pytorch.loggers.WandbLogger`; other loggers receive a plain fallback (a markdown/text rendering for
TensorBoard, nothing for CSV), never an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["is_wandb_logger", "log_bar_chart", "log_histogram", "log_scalars", "log_table"]


def is_wandb_logger(logger: object) -> bool:
    """Whether ``logger`` is Lightning's ``WandbLogger`` (checked without importing wandb)."""
    return type(logger).__name__ == "WandbLogger" and hasattr(logger, "log_table")


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log plain scalars to every logger of ``trainer`` at ``step`` (default: the trainer's global step), and put
    them in ``trainer.callback_metrics`` on every rank so that ``EarlyStopping``/``ModelCheckpoint`` can monitor them.

    Use this from hooks where ``LightningModule.log`` is not allowed (``setup``, ``on_fit_start``,
    ``on_train_start`` for a step-0 value); elsewhere prefer ``pl_module.log``. Call it on every rank with values
    already reduced across ranks (only rank 0 writes to the loggers).
    """
    values = {k: float(v) for k, v in metrics.items()}
    for key, value in values.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    _log_to_loggers(trainer, values, trainer.global_step if step is None else step)


@rank_zero_only
def _log_to_loggers(trainer: pl.Trainer, values: Mapping[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(dict(values), step=step)


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@rank_zero_only
def log_table(
    trainer: pl.Trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
) -> None:
    """Log a table: a W&B table for ``WandbLogger``, markdown text for TensorBoard, nothing for other loggers."""
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        if is_wandb_logger(logger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, _markdown_table(columns, rows), global_step=step)


@rank_zero_only
def log_histogram(trainer: pl.Trainer, key: str, values: Any, step: int | None = None) -> None:
    """Log a histogram of ``values`` (a tensor): ``wandb.Histogram`` for W&B, ``add_histogram`` for TensorBoard,
    nothing for other loggers (log summary scalars alongside for those)."""
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        if is_wandb_logger(logger):
            import wandb

            logger.experiment.log({key: wandb.Histogram(values.detach().cpu().numpy()), "trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(key, values.detach().cpu(), global_step=step)


@rank_zero_only
def log_bar_chart(
    trainer: pl.Trainer, key: str, labels: Sequence[str], values: Sequence[float], step: int | None = None
) -> None:
    """Log a bar chart: ``wandb.plot.bar`` for W&B, a markdown table for TensorBoard, nothing for other loggers (log
    the values as scalars alongside for those)."""
    step = trainer.global_step if step is None else step
    rows = [[str(label), float(value)] for label, value in zip(labels, values, strict=True)]
    for logger in trainer.loggers:
        if is_wandb_logger(logger):
            import wandb

            table = wandb.Table(data=rows, columns=["label", "value"])
            chart = wandb.plot.bar(table, "label", "value", title=key)
            logger.experiment.log({key: chart, "trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, _markdown_table(["label", "value"], rows), global_step=step)
