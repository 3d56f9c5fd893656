"""Stop-and-resume helper: an uninterrupted fit vs a fit stopped after ``stop_epoch`` epochs and resumed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["fit_and_resume", "quiet_trainer"]


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU trainer without progress bar, model summary, sanity check or logger (overridable)."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "enable_checkpointing": False,
        "deterministic": True,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def fit_and_resume(
    make_module: Callable[[], pl.LightningModule],
    make_data: Callable[[], pl.LightningDataModule],
    make_callbacks: Callable[[], list[pl.Callback]],
    max_epochs: int,
    stop_epoch: int,
    tmp_path: Path,
    seed: int = 0,
) -> tuple[tuple[pl.LightningModule, list[pl.Callback]], tuple[pl.LightningModule, list[pl.Callback]]]:
    """Train ``max_epochs`` in one go, and again stopping after ``stop_epoch`` epochs then resuming from the last
    checkpoint in a fresh Trainer with fresh callbacks. Returns ``((module, callbacks) full, (module, callbacks)
    resumed)`` for the caller to compare."""
    pl.seed_everything(seed, verbose=False)
    full_module, full_callbacks = make_module(), make_callbacks()
    quiet_trainer(max_epochs=max_epochs, callbacks=full_callbacks).fit(full_module, make_data())

    pl.seed_everything(seed, verbose=False)
    ckpt_dir = tmp_path / "ckpt"
    first = make_module()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)
    quiet_trainer(max_epochs=stop_epoch, callbacks=[*make_callbacks(), checkpoint], enable_checkpointing=True).fit(
        first, make_data()
    )

    resumed_module, resumed_callbacks = make_module(), make_callbacks()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)  # same callback set as the first run
    callbacks = [*resumed_callbacks, checkpoint]
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(resumed_module, make_data(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    return (full_module, full_callbacks), (resumed_module, resumed_callbacks)
