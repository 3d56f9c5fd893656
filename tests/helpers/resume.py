"""Stop-and-resume helper: an uninterrupted fit vs a fit stopped after ``stop_epoch`` epochs and resumed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

__all__ = ["MidEpochResumable", "assert_same_weights", "fit_and_resume", "quiet_trainer"]


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
    root = tmp_path / "root"  # one default_root_dir for all three fits: callback states may name files in it
    quiet_trainer(max_epochs=max_epochs, callbacks=full_callbacks, default_root_dir=root).fit(full_module, make_data())

    pl.seed_everything(seed, verbose=False)
    ckpt_dir = tmp_path / "ckpt"
    first = make_module()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)
    quiet_trainer(
        max_epochs=stop_epoch,
        callbacks=[*make_callbacks(), checkpoint],
        enable_checkpointing=True,
        default_root_dir=root,
    ).fit(first, make_data())

    resumed_module, resumed_callbacks = make_module(), make_callbacks()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)  # same callback set as the first run
    callbacks = [*resumed_callbacks, checkpoint]
    trainer = quiet_trainer(
        max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=True, default_root_dir=root
    )
    trainer.fit(resumed_module, make_data(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    return (full_module, full_callbacks), (resumed_module, resumed_callbacks)


class _SkipFirst(Sampler):
    """A batch sampler that drops the first ``skip`` batches of ``batch_sampler``'s next epoch only."""

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batch_sampler):
            if i >= skip:
                yield batch

    def __len__(self) -> int:  # the epoch's full length: Lightning counts the resumed epoch's batches from its progress
        return len(self.batch_sampler)  # type: ignore[arg-type]


class MidEpochResumable(pl.LightningDataModule):
    """Wraps a data module so that a fit resumed from a mid-epoch checkpoint continues with the next batch of the
    interrupted epoch, as a stateful data loader would (Lightning alone restarts that epoch's data from its first
    batch). Only valid for data in a fixed order (no shuffling): the skipped batches are the ones already trained on."""

    def __init__(self, inner: pl.LightningDataModule) -> None:
        super().__init__()
        self.inner = inner

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str) -> None:
        self.inner.trainer = self.trainer
        self.inner.setup(stage)

    def train_dataloader(self) -> Any:
        loader = self.inner.train_dataloader()
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        done = progress.processed if self.trainer.fit_loop.restarting else 0
        if not done:
            return loader
        return DataLoader(
            loader.dataset,
            batch_sampler=_SkipFirst(loader.batch_sampler, done),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )

    def val_dataloader(self) -> Any:
        return self.inner.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The two modules hold the same state-dict keys, in order, with bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
