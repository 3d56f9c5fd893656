"""What every demo shares: a quiet single-process CPU trainer and the demo process's logging and threads."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["cpu_trainer", "prepare_demo_process"]


def cpu_trainer(epochs: int, callbacks: list[pl.Callback] | None = None, **kwargs: Any) -> pl.Trainer:
    """A 1-device CPU trainer without logger, checkpoints, progress bar, model summary or sanity check."""
    defaults: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(callbacks=callbacks or [], **{**defaults, **kwargs})


def prepare_demo_process() -> None:
    """Keep a demo's output to its own table (Lightning's info lines off) and use the cores the machine has."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
